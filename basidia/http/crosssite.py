"""Refusing cross-site requests to the management API when it has no token.

Without a token, the management API trusts whoever reaches it on loopback. A web
page open in a browser on the same machine reaches loopback too, so the API must
tell such a page's requests from a local client's (curl, a script):

- **Host**: a DNS-rebinding page (``http://evil.example:8000`` whose name now
  resolves to 127.0.0.1) is same-origin for the browser, so it could read
  ``/services``; its requests carry ``Host: evil.example:8000``. Only loopback
  names (``localhost``, 127.0.0.0/8, ``::1``) and the names in
  ``http.allowed_hosts`` are answered; others get 421.
- **Origin** / **Sec-Fetch-Site**: a request a browser sends for another site's
  page says so. An ``Origin`` other than the server's own (the request's Host, or
  a name in ``http.allowed_hosts``), and a ``Sec-Fetch-Site`` other than
  ``same-origin`` or ``none``, get 403.
- **Content-Type**: a page may send a "simple" cross-site POST (``text/plain``,
  a form) without asking the server first; a request that changes state must
  say ``Content-Type: application/json``, which a browser sends cross-site only
  after a CORS preflight that this server never approves. Others get 415. This
  also holds when a browser or an extension leaves out ``Origin``.

With a token none of this applies: a page on another site cannot send the
``Authorization`` header without a preflight, and does not know the token.
The health probes, ``/openapi.json`` and the services' own endpoints are not
checked (probes arrive with ``Host: <pod-ip>:<port>``).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable

from starlette.requests import Request
from starlette.responses import Response

from basidia.http.errors import error_response

__all__ = ["CrossSiteGuard", "normalize_host", "split_authority"]

logger = logging.getLogger("basidia.http.management")

_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")
_PORT = re.compile(r"[0-9]{1,5}")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Methods that do not change state; every other one needs a JSON content type.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# What Sec-Fetch-Site says for a request made by the page's own origin, or by the
# user (typed address, bookmark); "same-site" is another port of localhost too.
_OWN_FETCHES = frozenset({"same-origin", "none"})


def split_authority(value: str) -> tuple[str, int | None] | None:
    """``"host[:port]"`` (``"[::1]:8000"``) → (lower-case host without brackets,
    port or None); None when malformed."""
    text = value.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not _is_ipv6(text[1:end]):
            return None
        host, rest = text[1:end], text[end + 1 :]
    else:
        host, colon, port = text.partition(":")
        rest = colon + port
        if not _NAME.fullmatch(host):
            return None
    if not rest:
        return host, None
    if rest[0] != ":" or not _PORT.fullmatch(rest[1:]) or int(rest[1:]) > 65535:
        return None
    return host, int(rest[1:])


def normalize_host(value: str) -> str:
    """An ``http.allowed_hosts`` entry as compared: lower case, IPv6 without brackets.

    Raises ``ValueError`` for anything but a host name or an IP address (no port,
    no scheme, no wildcard).
    """
    text = value.strip().lower()
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if _is_ipv6(bare) or (":" not in bare and _NAME.fullmatch(bare)):
        return bare
    raise ValueError(
        f"http.allowed_hosts takes host names or IP addresses without a port, got {value!r}"
    )


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CrossSiteGuard:
    """Decides whether a management request comes from this machine's own clients.

    ``allowed_hosts``: names (besides the loopback ones) that clients, or a
    reverse proxy, use to reach the server; pages served under them may call it.
    """

    def __init__(self, allowed_hosts: Iterable[str] = ()) -> None:
        self.allowed_hosts = frozenset(normalize_host(host) for host in allowed_hosts)

    def refusal(self, request: Request) -> Response | None:
        """The error response for a request to refuse, None for one to serve."""
        hosts = request.headers.getlist("host")
        host = split_authority(hosts[0]) if len(hosts) == 1 else None
        if host is None or not (_is_loopback(host[0]) or host[0] in self.allowed_hosts):
            return self._refuse(
                request,
                421,
                "this server answers management requests only for localhost, loopback "
                "addresses and the names in http.allowed_hosts (Host header refused)",
            )
        fetch_site = request.headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site.strip().lower() not in _OWN_FETCHES:
            return self._refuse(
                request, 403, "the management API refuses requests made by other sites' pages"
            )
        for origin in request.headers.getlist("origin"):
            if not self._own_origin(origin, host):
                return self._refuse(
                    request,
                    403,
                    "the management API refuses requests from other origins (Origin header)",
                )
        if request.method not in _SAFE_METHODS:
            types = request.headers.getlist("content-type")
            if len(types) != 1 or types[0].split(";")[0].strip().lower() != "application/json":
                return self._refuse(
                    request,
                    415,
                    "a management request that changes state needs "
                    "'Content-Type: application/json' (a body is optional)",
                )
        return None

    def _own_origin(self, origin: str, host: tuple[str, int | None]) -> bool:
        """Whether ``origin`` is the server's own: the request's Host, or an allowed name."""
        scheme, sep, authority = origin.strip().lower().partition("://")
        default = _DEFAULT_PORTS.get(scheme)
        parsed = split_authority(authority) if sep else None
        if default is None or parsed is None:  # "null", file://, an extension's page...
            return False
        if parsed[0] in self.allowed_hosts:
            return True
        # Same origin: same host and port, a missing port meaning the scheme's default
        # (a TLS proxy in front may serve https for this plain-HTTP server).
        return parsed[0] == host[0] and (parsed[1] or default) == (host[1] or default)

    @staticmethod
    def _refuse(request: Request, status: int, detail: str) -> Response:
        logger.warning(
            "refused %s %s from a possible cross-site caller (Host %.100r, Origin %.100r, "
            "Sec-Fetch-Site %.40r, Content-Type %.100r): %s",
            request.method,
            request.scope.get("path"),
            request.headers.get("host"),
            request.headers.get("origin"),
            request.headers.get("sec-fetch-site"),
            request.headers.get("content-type"),
            status,
        )
        return error_response(status, detail)
