"""The registry the nodes pull from: ``/v2/<ns>/<name>/manifests/<tag>`` and blobs.

What Ollama's ``pull`` needs of a registry (``server/download.go``): a manifest ``GET``; a
``HEAD`` of each blob with its ``Content-Length``; a blob ``GET`` that answers ``307`` to
another host or ``200`` with a ``Location`` header (a plain 200 fails with "no Location
header in response"): olmd answers 200 and points ``Location`` at the same URL, which
Ollama then fetches in parallel ``Range`` parts (206). Bytes are streamed from disk.

Ollama sends no credentials, so these routes answer only the configured nodes' addresses
and loopback (403 otherwise), and only what the cache holds: a digest is checked against
``sha256:<64 hex>`` and a name against Ollama's grammar before any path is built.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from typing import BinaryIO

from aiohttp import web

from daemon.distribution.cache import is_digest
from daemon.distribution.component import DISTRIBUTION
from daemon.distribution.mirror import Distributor
from daemon.gateway.guard import is_loopback
from daemon.logs import get_logger
from daemon.runtime import RUNTIME

__all__ = ["add_routes"]

log = get_logger("olmd.registry")

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
_CHUNK = 1024 * 1024
_RESOLVE_TTL = 60.0


class _NodeAddresses:
    """The nodes' addresses as last resolved, for which settings, until when."""

    def __init__(self) -> None:
        self.settings: object = None
        self.until = 0.0
        self.addresses: set[str] = set()


_ADDRESSES = web.AppKey("olmd_node_addresses", _NodeAddresses)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"errors": [{"code": code, "message": message}]}, status=status)


async def _node_addresses(request: web.Request) -> set[str]:
    """The configured nodes' IP addresses (names resolved, kept for a minute)."""
    app = request.app
    settings = app[RUNTIME].settings
    cache = app[_ADDRESSES]
    now = time.monotonic()
    if cache.settings is settings and cache.until > now:
        return cache.addresses
    found: set[str] = set()
    loop = asyncio.get_running_loop()
    for node in settings.nodes():
        hosts = [node.host, node.ssh_host] if node.ssh_host else [node.host]
        for host in hosts:
            try:
                found.add(str(ipaddress.ip_address(host)))
                continue
            except ValueError:
                pass
            try:
                async with asyncio.timeout(2.0):
                    infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except (OSError, TimeoutError):
                continue
            found.update(str(info[4][0]) for info in infos)
    cache.settings, cache.until, cache.addresses = settings, now + _RESOLVE_TTL, found
    return found


async def _allowed(request: web.Request) -> bool:
    if is_loopback(request):
        return True
    try:
        remote = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    if isinstance(remote, ipaddress.IPv6Address) and remote.ipv4_mapped is not None:
        remote = remote.ipv4_mapped
    return str(remote) in await _node_addresses(request)


def _distributor(request: web.Request) -> Distributor | None:
    return request.app.get(DISTRIBUTION)


async def _refusal(request: web.Request) -> web.Response | None:
    if not await _allowed(request):
        log.warning("registry.refused", remote=request.remote, path=request.path)
        return _error(403, "DENIED", "olmd's registry answers the fleet's nodes only")
    if _distributor(request) is None:
        return _error(404, "UNSUPPORTED", "this olmd has no blob cache")
    return None


async def manifest(request: web.Request) -> web.StreamResponse:
    refusal = await _refusal(request)
    if refusal is not None:
        return refusal
    dist = _distributor(request)
    assert dist is not None
    m = request.match_info
    found = dist.cache.find(m["ns"], m["name"], m["tag"])
    if found is None:
        return _error(404, "MANIFEST_UNKNOWN", "manifest unknown to olmd's cache")
    headers = {"Docker-Content-Digest": found.digest}
    return web.Response(body=found.raw, content_type=MANIFEST_TYPE, headers=headers)


async def blob(request: web.Request) -> web.StreamResponse:
    refusal = await _refusal(request)
    if refusal is not None:
        return refusal
    dist = _distributor(request)
    assert dist is not None
    digest = request.match_info["digest"]
    if not is_digest(digest) or not dist.cache.has_blob(digest):
        return _error(404, "BLOB_UNKNOWN", "blob unknown to olmd's cache")
    path = dist.cache.blob_path(digest)
    try:
        handle = path.open("rb")
    except OSError:  # evicted since the check
        return _error(404, "BLOB_UNKNOWN", "blob unknown to olmd's cache")
    with handle:
        return await _send(request, dist, handle, digest)


async def _send(
    request: web.Request, dist: Distributor, handle: BinaryIO, digest: str
) -> web.StreamResponse:
    size = handle.seek(0, 2)
    try:
        wanted = request.http_range
    except ValueError:
        return _error(416, "RANGE_INVALID", "bad Range header")
    start, stop, status = 0, size, 200
    if wanted.start is not None or wanted.stop is not None:
        start = wanted.start or 0
        if start < 0:  # "bytes=-N": the last N bytes
            start = max(0, size + start)
        stop = min(size, wanted.stop if wanted.stop is not None else size)
        if start >= stop:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
        status = 206
    response = web.StreamResponse(status=status)
    response.content_type = "application/octet-stream"
    response.content_length = stop - start
    response.headers["Accept-Ranges"] = "bytes"
    response.headers["Docker-Content-Digest"] = digest
    # Ollama takes the blob's location from this header on a 200 (or from a 307 to
    # another host); here it is this very URL, which answers Range requests.
    response.headers["Location"] = str(request.rel_url.with_query(None))
    if status == 206:
        response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    dist.cache.touch(digest)
    handle.seek(start)
    sent = 0
    try:
        while sent < stop - start:  # bounded: every pass sends bytes or ends
            chunk = await asyncio.to_thread(handle.read, min(_CHUNK, stop - start - sent))
            if not chunk:
                break
            await response.write(chunk)
            sent += len(chunk)
    except (ConnectionResetError, ConnectionError):
        pass  # the node hung up (Ollama's location probe does, after the headers)
    finally:
        dist.served(sent)
    return response


def add_routes(app: web.Application) -> None:
    app[_ADDRESSES] = _NodeAddresses()
    router = app.router
    router.add_get("/v2/{ns}/{name}/manifests/{tag}", manifest)  # GET also answers HEAD
    router.add_get("/v2/{ns}/{name}/blobs/{digest}", blob)
