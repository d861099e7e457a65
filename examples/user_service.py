"""A user service that calls a database service and announces new users with an event."""

from __future__ import annotations

import itertools

from basidia import ConfigDependency, Dependency, EventDispatcher, Service, rpc


class DatabaseService(Service):
    name = "database_service"

    @rpc
    async def get_user(self, user_id: int) -> dict:
        return {"id": user_id, "name": f"User {user_id}"}


_ids = itertools.count(1000)


class UserService(Service):
    name = "user_service"
    db = Dependency("database_service")  # by name: an RPC proxy
    dsn = ConfigDependency("database.url")  # a config value
    dispatch = EventDispatcher()  # publishes events

    @rpc
    async def get_user_greeting(self, user_id: int) -> str:
        user = await self.db.get_user(user_id)
        return f"Hello, {user['name']}!"

    @rpc
    async def create_user(self, email: str) -> int:
        user_id = next(_ids)
        await self.dispatch("user.created", {"id": user_id, "email": email})
        return user_id
