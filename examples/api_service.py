"""The HTTP front door of the examples: ``GET /users/{user_id}`` answered over RPC.

``basidia run examples/`` serves it on http://127.0.0.1:8000::

    curl http://127.0.0.1:8000/users/1
    {"message":"Hello, User 1!"}
"""

from starlette.responses import JSONResponse

from basidia import Dependency, Service, http_endpoint


class ApiService(Service):
    name = "api_service"
    user_service = Dependency("user_service")

    @http_endpoint("GET", "/users/{user_id}")
    async def get_user(self, request):
        user = await self.user_service.get_user_greeting(int(request.path_params["user_id"]))
        return JSONResponse({"message": user})
