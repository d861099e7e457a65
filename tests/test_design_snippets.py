"""The snippets of docs/architecture.md (the public API), verbatim: the public API must work as written."""

from __future__ import annotations

import ast
from typing import Any

import pytest

from basidia.testing import ServiceTestCase

pytestmark = pytest.mark.timeout(30)

# ---- docs/architecture.md (the public API), first snippet (verbatim) ---------------------------------------------
from basidia import Service, rpc, event_handler, http_endpoint, Dependency, ConfigDependency, Config
from starlette.responses import JSONResponse

class GreetingService(Service):
    name = "greeting_service"

    @rpc
    async def hello(self, name: str) -> str:
        return f"Hello, {name}!"

class DatabaseService(Service):
    name = "database_service"

    @rpc
    async def get_user(self, user_id: int) -> dict:
        return {"id": user_id, "name": f"User {user_id}"}

class UserService(Service):
    name = "user_service"
    db = Dependency("database_service")          # by name: an RPC proxy
    dsn = ConfigDependency("database.url")       # a config value

    @rpc
    async def get_user_greeting(self, user_id: int) -> str:
        user = await self.db.get_user(user_id)
        return f"Hello, {user['name']}!"

class NotificationService(Service):
    name = "notification_service"

    @event_handler("user.created")
    async def on_user_created(self, user_data: dict) -> None: ...

class ApiService(Service):
    name = "api_service"
    user_service = Dependency("user_service")

    @http_endpoint("GET", "/users/{user_id}")
    async def get_user(self, request):
        user = await self.user_service.get_user_greeting(int(request.path_params["user_id"]))
        return JSONResponse({"message": user})

config = Config({"AMQP_URI": "amqp://guest:guest@localhost:5672/", "LOG_LEVEL": "INFO", "SERVICE_TIMEOUT": 30})
# ---- end of the first snippet ---------------------------------------------------------------

# ---- docs/architecture.md (the public API), the embedding snippet (verbatim; top-level await) ------------------------
EMBEDDING = '''
from basidia import ServiceRunner, connect

runner = ServiceRunner([GreetingService], broker="nats://127.0.0.1:4222")  # "memory://" in-process
await runner.start()
async with connect("nats://127.0.0.1:4222") as cluster:      # a standalone client
    print(await cluster.rpc.greeting_service.hello("World"))
    await cluster.dispatch("user.created", {"email": "ada@example.com"})
await runner.stop()
'''


async def run_embedding(namespace: dict[str, Any], url: str | None = None) -> None:
    source = EMBEDDING if url is None else EMBEDDING.replace("nats://127.0.0.1:4222", url)
    code = compile(source, "<docs/architecture.md embedding>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, namespace)
    if result is not None:
        await result


# ---- docs/architecture.md (the public API), the testing snippet (verbatim) -------------------------------------------
class TestGreetingService(ServiceTestCase):
    services = [GreetingService]

    async def test_hello(self):
        assert await self.rpc.greeting_service.hello("Test") == "Hello, Test!"
# ---- end of the snippets ----------------------------------------------------------------


async def test_first_snippet_services_answer(memory_url: str) -> None:
    from basidia import ServiceRunner, connect

    services = [GreetingService, DatabaseService, UserService, NotificationService]
    async with ServiceRunner(services, broker=memory_url, config={"database": {"url": "x"}}):
        async with connect(memory_url) as cluster:
            assert await cluster.rpc.greeting_service.hello("World") == "Hello, World!"
            assert await cluster.rpc.user_service.get_user_greeting(1) == "Hello, User 1!"
            await cluster.dispatch("user.created", {"email": "ada@example.com"})


def test_config_snippet_reads_nameko_style_keys() -> None:
    settings = config.settings
    assert settings.broker == "amqp://guest:guest@localhost:5672/"
    assert settings.rpc_timeout == 30
    assert settings.log_level == "INFO"
    assert "guest:guest" not in repr(config)


async def test_embedding_snippet_on_the_memory_broker(capsys: pytest.CaptureFixture[str]) -> None:
    await run_embedding({"GreetingService": GreetingService}, "memory://")
    assert capsys.readouterr().out == "Hello, World!\n"


@pytest.mark.nats
async def test_embedding_snippet_as_written_on_nats(
    nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await run_embedding({"GreetingService": GreetingService})
    assert capsys.readouterr().out == "Hello, World!\n"
