"""What a request must pass before any handler: path rules, keys, tokens, JSON errors.

Routes are judged on the normalised path (percent-decoding repeated, backslashes, ``//``,
``.`` and ``..`` resolved, case folded), so ``//api/pull``, ``/api/./pull`` or
``/api%2Fpull`` are refused like ``/api/pull``. Keys are compared in constant time and
never logged; the client's ``Authorization`` (or Anthropic's ``x-api-key``, read when
there is no ``Authorization``) is never forwarded (see ``wire.SKIP_REQUEST``). Refusals
come in the route's dialect: Anthropic's shape on ``/v1/messages``, OpenAI's on the rest
of ``/v1``, Ollama's elsewhere. ``GET /api/version`` answers without a key (the version
alone): clients check it before they send one.

The status page (``/ui``) takes the admin token, as a Bearer header or as the session
cookie ``/ui/login`` sets after checking it; with no admin token set it answers clients
on loopback only. The cookie is not the token: it is an expiry time and an HMAC of it
keyed by the token, so changing the token ends every session, and it is sent only to
``/ui`` (``Path=/ui``, ``HttpOnly``, ``SameSite=Strict``). It opens nothing but the page
and its read-only JSON; ``/admin`` still takes the Bearer token only.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import posixpath
import re
import time
from urllib.parse import unquote

from aiohttp import web

from daemon.gateway.dialects import Dialect, ErrorReply, dialect_of, error_for
from daemon.gateway.tenants import TENANCY, identify
from daemon.gateway.wire import ANONYMOUS, json_error
from daemon.runtime import RUNTIME, Runtime

MANAGEMENT = frozenset({"/api/pull", "/api/push", "/api/create", "/api/delete", "/api/copy"})
OPEN = frozenset({"/", "/healthz", "/readyz", "/metrics"})
VERSION = frozenset({"/api/version"})
UI_LOGIN = "/ui/login"
UI_OPEN = frozenset({UI_LOGIN, "/ui/logout"})  # they check (or drop) the token themselves
UI_COOKIE = "olmd_ui"
UI_SESSION_SECONDS = 12 * 3600
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
    """The client's key: a Bearer token, or Anthropic's ``x-api-key`` (its SDK's way)
    when there is no ``Authorization`` header."""
    authorization = request.headers.get("Authorization")
    if authorization is None:
        key = request.headers.get("x-api-key", "").strip()
        return key.encode() if key else None
    scheme, _, token = authorization.partition(" ")
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


def is_registry(path: str) -> bool:
    """Whether this (normalised) path is one of the registry routes nodes pull from."""
    return path == "/v2" or path.startswith("/v2/")


def is_ui(path: str) -> bool:
    return path == "/ui" or path.startswith("/ui/")


def is_admin(request: web.Request) -> bool:
    admin = request.app[RUNTIME].admin_token
    return admin is not None and _matches(_bearer(request), (admin,))


def reads_allowed(request: web.Request) -> bool:
    """Whether ``request`` may read the admin views (nodes, sync, usage): with the admin
    token; with no token set, from loopback (as the status page, which shows the same)."""
    if request.method not in ("GET", "HEAD"):
        return is_admin(request)
    if request.app[RUNTIME].admin_token is None:
        return is_loopback(request)
    return is_admin(request)


def is_loopback(request: web.Request) -> bool:
    try:
        address = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False  # a Unix socket or no peer: not provably this machine
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _session_mac(token: bytes, expires: str) -> str:
    return hmac.new(token, f"olmd-ui:{expires}".encode(), hashlib.sha256).hexdigest()


def ui_session(token: bytes, now: float | None = None) -> str:
    """A session cookie value for the status page, valid for ``UI_SESSION_SECONDS``."""
    expires = str(int(now if now is not None else time.time()) + UI_SESSION_SECONDS)
    return f"{expires}.{_session_mac(token, expires)}"


def _session_valid(value: str, token: bytes, now: float) -> bool:
    expires, _, mac = value.partition(".")
    if not expires.isdigit() or int(expires) < now:
        return False
    return hmac.compare_digest(mac.encode(), _session_mac(token, expires).encode())


def token_matches(candidate: str, runtime: Runtime) -> bool:
    """Whether ``candidate`` is the admin token (constant time)."""
    token = runtime.admin_token
    return token is not None and _matches(candidate.strip().encode() or None, (token,))


def ui_allowed(request: web.Request, runtime: Runtime) -> bool:
    """Whether ``request`` may see the status page."""
    token = runtime.admin_token
    if token is None:
        return is_loopback(request)
    if _matches(_bearer(request), (token,)):
        return True
    cookie = request.cookies.get(UI_COOKIE)
    return cookie is not None and _session_valid(cookie, token, time.time())


def _ui_refusal(request: web.Request, runtime: Runtime) -> web.Response:
    if runtime.admin_token is None:
        return json_error(
            403, "the status page answers on loopback only while OLMD_ADMIN_TOKEN is unset"
        )
    if request.method in ("GET", "HEAD") and normalise(request.rel_url.raw_path) == "/ui":
        # A person at a browser: to the login form (a ?token= goes along, to be checked).
        query = f"?{request.query_string}" if request.query_string else ""
        return web.Response(status=303, headers={"Location": f"{UI_LOGIN}{query}"})
    return json_error(401, f"the status page needs the admin token: log in at {UI_LOGIN}")


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
    if all(is_registry(p) for p in paths):
        # Ollama sends no credentials when it pulls: the registry routes let only the
        # nodes' addresses and loopback in, and serve only what the cache holds.
        return None
    error = error_for(_dialect(paths))
    if any(is_management(p) or p == "/admin" or p.startswith("/admin/") for p in paths):
        if runtime.admin_token is None:
            if not any(is_management(p) for p in paths) and reads_allowed(request):
                return None  # the read-only views, on loopback (their handlers check too)
            return error(403, "model management and /admin are disabled: set OLMD_ADMIN_TOKEN")
        if not _matches(_bearer(request), (runtime.admin_token,)):
            return error(403, "this route needs the admin token")
        return None
    if any(is_ui(p) for p in paths):
        if not all(is_ui(p) for p in paths):  # read one way a page, the other way not
            return error(400, "ambiguous path")
        if paths <= UI_OPEN or ui_allowed(request, runtime):
            return None
        return _ui_refusal(request, runtime)
    refusal = _keys(request, runtime, error)
    if refusal is not None and paths <= VERSION and request.method in ("GET", "HEAD"):
        request[ANONYMOUS] = True  # the version alone, without the node map
        return None
    return refusal


def _keys(request: web.Request, runtime: Runtime, error: ErrorReply) -> web.Response | None:
    """The refusal for a request without a valid key, while keys (or tenants) are on."""
    tenancy = request.app.get(TENANCY)
    if tenancy is not None and tenancy.enabled:
        admin = (runtime.admin_token,) if runtime.admin_token is not None else ()
        return identify(request, tenancy, _bearer(request), lambda t: _matches(t, admin), error)
    keys = runtime.api_keys
    if keys:
        token = _bearer(request)
        admin = (runtime.admin_token,) if runtime.admin_token is not None else ()
        if not (_matches(token, keys) or _matches(token, admin)):
            return error(
                401, "missing or invalid API key", **{"WWW-Authenticate": 'Bearer realm="olmd"'}
            )
    return None


def _dialect(paths: set[str]) -> Dialect:
    """The dialect of a request read as ``paths``: Anthropic's or OpenAI's if any reading
    is theirs."""
    dialects = {dialect_of(p) for p in paths}
    for dialect in ("anthropic", "openai"):
        if dialect in dialects:
            return dialect
    return "ollama"


def _http_error(exc: web.HTTPException, runtime: Runtime) -> tuple[str, dict[str, str]]:
    message = exc.reason.lower()
    if exc.status == 413:
        limit = runtime.server.max_body_bytes
        message = f"request body larger than the limit of {limit} bytes"
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    return message, headers


def as_json(exc: web.HTTPException, runtime: Runtime) -> web.Response | None:
    """Ollama's error shape for an error aiohttp raised itself (404, 405, 413, ...)."""
    if exc.status < 400 or exc.content_type == "application/json":
        return None
    message, headers = _http_error(exc, runtime)
    return json_error(exc.status, message, **headers)


def as_dialect(exc: web.HTTPException, runtime: Runtime, dialect: Dialect) -> web.Response | None:
    """The dialect's error shape for an error aiohttp raised itself (routes under ``/v1``;
    Ollama's is :func:`as_json`)."""
    if dialect == "ollama":
        return as_json(exc, runtime)
    if exc.status < 400:
        return None
    message, headers = _http_error(exc, runtime)
    return error_for(dialect)(exc.status, message, **headers)
