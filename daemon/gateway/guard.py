"""What a request must pass before any handler: path rules, keys, tokens, JSON errors.

Routes are judged on the normalised path (percent-decoding repeated, backslashes, ``//``,
``.`` and ``..`` resolved, case folded), so ``//api/pull``, ``/api/./pull`` or
``/api%2Fpull`` are refused like ``/api/pull``. Keys are compared in constant time and
never logged; the client's ``Authorization`` is never forwarded (see proxy.HOP_BY_HOP).
"""

from __future__ import annotations

import functools
import hmac
import posixpath
import re
from urllib.parse import unquote

from aiohttp import web

from daemon.runtime import RUNTIME, Runtime

MANAGEMENT = frozenset({"/api/pull", "/api/push", "/api/create", "/api/delete", "/api/copy"})
OPEN = frozenset({"/", "/healthz", "/readyz", "/metrics"})
_SLASHES = re.compile(r"/+")


@functools.lru_cache(maxsize=1024)
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


def _bearer(request: web.Request) -> bytes | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    return token.encode() if token and scheme.lower() == "bearer" else None


def _matches(token: bytes | None, secrets: tuple[bytes, ...]) -> bool:
    if token is None:
        return False
    # Compare against every key, so timing says nothing about which one matched.
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(token, secret)
    return found


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def is_admin(request: web.Request) -> bool:
    admin = request.app[RUNTIME].admin_token
    return admin is not None and _matches(_bearer(request), (admin,))


def check(request: web.Request, runtime: Runtime) -> web.Response | None:
    """The refusal for a request that may not proceed, or None to let it through."""
    # rel_url, not raw_path: an absolute-form request line ("GET http://h/admin HTTP/1.1")
    # has the whole URL in raw_path, while the router matches rel_url's path. The route the
    # router matched is judged too: normalising may read a path differently from it.
    paths = {normalise(request.rel_url.raw_path)}
    resource = request.match_info.route.resource
    if resource is not None:
        paths.add(resource.canonical.lower())
    if paths <= OPEN:
        return None
    if any(is_management(p) or p == "/admin" or p.startswith("/admin/") for p in paths):
        if runtime.admin_token is None:
            return _error(403, "model management and /admin are disabled: set OLMD_ADMIN_TOKEN")
        if not _matches(_bearer(request), (runtime.admin_token,)):
            return _error(403, "this route needs the admin token")
        return None
    keys = runtime.api_keys
    if keys:
        token = _bearer(request)
        admin = (runtime.admin_token,) if runtime.admin_token is not None else ()
        if not (_matches(token, keys) or _matches(token, admin)):
            return _error(
                401, "missing or invalid API key", **{"WWW-Authenticate": 'Bearer realm="olmd"'}
            )
    return None


def as_json(exc: web.HTTPException, runtime: Runtime) -> web.Response | None:
    """Ollama's error shape for an error aiohttp raised itself (404, 405, 413, ...)."""
    if exc.status < 400 or exc.content_type == "application/json":
        return None
    message = exc.reason.lower()
    if exc.status == 413:
        limit = runtime.server.max_body_bytes
        message = f"request body larger than the limit of {limit} bytes"
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    return _error(exc.status, message, **headers)
