"""What a request must pass before any handler: path rules, keys, tokens, JSON errors.

Routes are judged on the normalised path (percent-decoding repeated, backslashes, ``//``,
``.`` and ``..`` resolved, case folded), so ``//api/pull``, ``/api/./pull`` or
``/api%2Fpull`` are refused like ``/api/pull``. Keys are compared in constant time and
never logged; the client's ``Authorization`` is never forwarded (see proxy.HOP_BY_HOP).
"""

from __future__ import annotations

import hmac
import posixpath
import re
from collections.abc import Awaitable, Callable
from urllib.parse import unquote

from aiohttp import web

from daemon.runtime import RUNTIME

MANAGEMENT = frozenset({"/api/pull", "/api/push", "/api/create", "/api/delete", "/api/copy"})
OPEN = frozenset({"/", "/healthz", "/readyz", "/metrics"})
_SLASHES = re.compile(r"/+")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def normalise(raw_path: str) -> str:
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    for _ in range(4):  # %252F → %2F → /
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    path = path.split(";", 1)[0].replace("\\", "/")
    path = posixpath.normpath("/" + _SLASHES.sub("/", path))
    return _SLASHES.sub("/", path).lower()


def is_management(path: str) -> bool:
    return path in MANAGEMENT or path == "/api/blobs" or path.startswith("/api/blobs/")


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str | None, secrets: list[str]) -> bool:
    if token is None:
        return False
    # Compare against every key, so timing says nothing about which one matched.
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(token.encode(), secret.encode())
    return found


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def is_admin(request: web.Request) -> bool:
    admin = request.app[RUNTIME].settings.admin_token
    return admin is not None and _matches(_bearer(request), [admin.get_secret_value()])


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = normalise(request.raw_path)
    if path in OPEN:
        return await handler(request)
    settings = request.app[RUNTIME].settings
    if is_management(path) or path == "/admin" or path.startswith("/admin/"):
        if settings.admin_token is None:
            return _error(403, "model management and /admin are disabled: set OLMD_ADMIN_TOKEN")
        if not is_admin(request):
            return _error(403, "this route needs the admin token")
        return await handler(request)
    keys = [k.get_secret_value() for k in settings.api_keys]
    if keys and not (_matches(_bearer(request), keys) or is_admin(request)):
        return _error(
            401, "missing or invalid API key", **{"WWW-Authenticate": 'Bearer realm="olmd"'}
        )
    return await handler(request)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Ollama's error shape for the errors aiohttp raises itself (404, 405, 413, ...)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        message = exc.reason.lower()
        if exc.status == 413:
            limit = request.app[RUNTIME].settings.server.max_body_bytes
            message = f"request body larger than the limit of {limit} bytes"
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return _error(exc.status, message, **headers)
