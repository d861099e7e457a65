"""The greeting service of the tutorial: one RPC method."""

from basidia import Service, rpc


class GreetingService(Service):
    name = "greeting_service"

    @rpc
    async def hello(self, name: str) -> str:
        return f"Hello, {name}!"
