"""HTTP for Basidia: ``@http_endpoint`` routes, the management API and health probes.

Needs the ``http`` extra (``pip install 'basidia[http]'``: Starlette and uvicorn).
See ``docs/http.md``.
"""

from basidia.http.errors import BodyTooLarge, MalformedJson
from basidia.http.routing import Request
from basidia.http.server import HttpServer, HttpSettings, build_app, serve

__all__ = [
    "BodyTooLarge",
    "HttpServer",
    "HttpSettings",
    "MalformedJson",
    "Request",
    "build_app",
    "serve",
]
