"""The services of a traced chain: HTTP → RPC → nested RPC, and an event the RPC dispatches.

``chain_services(suffix)`` makes them with names of their own (the brokers are shared);
``basidia run tests.telemetry.chain:ApiService ...`` runs the ones named by
``CHAIN_SUFFIX`` in the environment.
"""

from __future__ import annotations

import os
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from basidia import Dependency, Service, event_handler, http_endpoint, rpc
from basidia.dependencies import EventDispatcher


def chain_services(suffix: str) -> dict[str, type[Service]]:
    """The api, users, db and notify services, named ``chain_<role>_<suffix>``."""
    users_name, db_name = f"chain_users_{suffix}", f"chain_db_{suffix}"
    event = f"chain.greeted.{suffix}"

    class ApiService(Service):
        name = f"chain_api_{suffix}"
        users = Dependency(users_name)

        @http_endpoint("GET", "/chain/{user_id}")
        async def greet(self, request: Request) -> JSONResponse:
            text = await self.users.greet(int(request.path_params["user_id"]))
            return JSONResponse({"message": text})

    class UsersService(Service):
        name = users_name
        db = Dependency(db_name)
        dispatch = EventDispatcher()

        @rpc
        async def greet(self, user_id: int) -> str:
            user = await self.db.get_user(user_id)
            await self.dispatch(event, {"user_id": user_id})
            return f"Hello, {user['name']}!"

    class DbService(Service):
        name = db_name

        @rpc
        async def get_user(self, user_id: int) -> dict[str, Any]:
            return {"id": user_id, "name": f"User {user_id}"}

        @rpc
        async def fail(self) -> None:
            raise LookupError("no such user")

    class NotifyService(Service):
        name = f"chain_notify_{suffix}"

        @event_handler(event)
        async def on_greeted(self, data: dict[str, Any]) -> None:
            assert data["user_id"] > 0

    return {
        "api": ApiService,
        "users": UsersService,
        "db": DbService,
        "notify": NotifyService,
    }


_RUN = chain_services(os.environ.get("CHAIN_SUFFIX", "local"))
ApiService = _RUN["api"]
UsersService = _RUN["users"]
DbService = _RUN["db"]
NotifyService = _RUN["notify"]
