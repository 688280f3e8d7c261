"""An emulated model registry with the public registry's behaviour, for tests and benchmarks.

What Ollama's registry does and this one does too: ``GET``/``HEAD
/v2/<ns>/<name>/manifests/<tag>`` answers the manifest's bytes
(``application/vnd.docker.distribution.manifest.v2+json``); ``HEAD
/v2/<ns>/<name>/blobs/<digest>`` answers the size; ``GET`` of a blob answers ``307`` to
another host name (the public registry sends clients to its CDN): a request to
``127.0.0.1`` goes to ``localhost`` and the other way round, where the bytes are served
with ``Range`` (``206``). Faults for tests: a blob served corrupt (one byte flipped), a
blob whose next download is cut, or stalls, after some bytes. :attr:`EmulatedRegistry.stats`
counts the bytes served per blob. Imports nothing of olmd.

    async with EmulatedRegistry() as registry:
        digest = registry.add_model("llama3.1:8b", [3_000_000, 1_000])
        ...  # registry.url, registry.stats.blob_bytes
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import random
import re
from typing import Literal

from aiohttp import web

__all__ = ["MANIFEST_TYPE", "EmulatedRegistry", "RegistryStats", "split_name"]

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
_LAYER_TYPE = "application/vnd.ollama.image.model"
_CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_CHUNK = 256 * 1024


def split_name(name: str) -> tuple[str, str, str]:
    """``llama3.1:8b`` → (``library``, ``llama3.1``, ``8b``); ``ns/m:t`` keeps ``ns``."""
    rest, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "")
    parts = rest.split("/")
    namespace = parts[-2] if len(parts) > 1 else "library"
    return namespace.lower(), parts[-1].lower(), (tag or "latest").lower()


@dataclasses.dataclass
class RegistryStats:
    """What the registry served: manifests, blob bytes and blob downloads per digest."""

    manifests: int = 0
    blob_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    blob_gets: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.blob_bytes.values())


class EmulatedRegistry:
    """The registry on ``host:port`` (port 0: a free one)."""

    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 0, link_bytes_per_second: float = 0.0
    ) -> None:
        self.host = host
        self.link = link_bytes_per_second
        """The site's internet link, shared by every download (0: unlimited)."""
        self._free_at = 0.0
        self._port = port
        self.manifests: dict[tuple[str, str, str], bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.corrupt: set[str] = set()
        """Digests served with one byte flipped (the digest no longer matches)."""
        self.cut: dict[str, int] = {}
        """Digest → bytes after which its next download is cut (once)."""
        self.stall: dict[str, int] = {}
        """Digest → bytes after which its next download sends nothing more (once)."""
        self.blob_answer: Literal["redirect", "location", "plain"] = "redirect"
        """How a blob GET is answered: 307 to another host name (the public registry),
        200 with a Location header (olmd's own answer), or a plain 200 (Ollama refuses)."""
        self.stats = RegistryStats()
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the registry has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def add_model(self, name: str, sizes: list[int], *, seed: int = 0) -> str:
        """Publish ``name`` with one layer per size (random bytes from ``seed``) and a
        small config blob; returns the manifest's digest, as ``/api/tags`` shows it."""
        rng = random.Random(f"{name}/{seed}")
        config = json.dumps({"model_format": "gguf", "model_family": name, "seed": seed}).encode()
        layers = []
        for size in sizes:
            data = rng.randbytes(size)
            layers.append(self._blob(data, _LAYER_TYPE))
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": self._blob(config, _CONFIG_TYPE),
            "layers": layers,
        }
        # Not re-serialised by clients: the bytes, spaces and all, are the digest.
        raw = json.dumps(manifest, indent=1).encode()
        self.manifests[split_name(name)] = raw
        return hashlib.sha256(raw).hexdigest()

    def model_bytes(self, name: str) -> int:
        """The size of every blob of ``name``: what one download of it costs."""
        manifest = json.loads(self.manifests[split_name(name)])
        return sum(b["size"] for b in [manifest["config"], *manifest["layers"]])

    def _blob(self, data: bytes, media_type: str) -> dict[str, object]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    # ------------------------------------------------------------ serving

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("GET", "/v2/{ns}/{name}/manifests/{tag}", self._manifest)
        app.router.add_route("HEAD", "/v2/{ns}/{name}/manifests/{tag}", self._manifest)
        app.router.add_route("HEAD", "/v2/{ns}/{name}/blobs/{digest}", self._head_blob)
        app.router.add_route("GET", "/v2/{ns}/{name}/blobs/{digest}", self._redirect)
        app.router.add_route("GET", "/direct/{digest}", self._direct)
        return app

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        m = request.match_info
        raw = self.manifests.get((m["ns"].lower(), m["name"].lower(), m["tag"].lower()))
        if raw is None:
            return _error(404, "MANIFEST_UNKNOWN", "manifest unknown")
        self.stats.manifests += 1
        headers = {"Docker-Content-Digest": "sha256:" + hashlib.sha256(raw).hexdigest()}
        return web.Response(body=raw, content_type=MANIFEST_TYPE, headers=headers)

    def _find(self, digest: str) -> bytes | None:
        return self.blobs.get(digest) if _DIGEST.fullmatch(digest) else None

    async def _head_blob(self, request: web.Request) -> web.StreamResponse:
        data = self._find(request.match_info["digest"])
        if data is None:
            return _error(404, "BLOB_UNKNOWN", "blob unknown")
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(data)
        await response.prepare(request)
        await response.write_eof()
        return response

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        if self._find(digest) is None:
            return _error(404, "BLOB_UNKNOWN", "blob unknown")
        if self.blob_answer != "redirect":
            return await self._direct(request)
        other = "localhost" if request.url.host != "localhost" else "127.0.0.1"
        location = f"http://{other}:{self.port}/direct/{digest}"
        return web.Response(status=307, headers={"Location": location})

    async def _direct(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        data = self._find(digest)
        if data is None:
            return _error(404, "BLOB_UNKNOWN", "blob unknown")
        if digest in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start, stop = 0, len(data)
        try:
            wanted = request.http_range
        except ValueError:
            return _error(416, "RANGE_INVALID", "bad range")
        status = 200
        if wanted.start is not None or wanted.stop is not None:
            start = wanted.start or 0
            stop = min(wanted.stop if wanted.stop is not None else len(data), len(data))
            if start >= stop:
                return _error(416, "RANGE_INVALID", "range not satisfiable")
            status = 206
        self.stats.blob_gets[digest] = self.stats.blob_gets.get(digest, 0) + 1
        response = web.StreamResponse(status=status)
        response.content_type = "application/octet-stream"
        if self.blob_answer == "location" and "/v2/" in request.path:
            response.headers["Location"] = f"/direct/{digest}"
        response.content_length = stop - start
        if status == 206:
            response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
        await response.prepare(request)
        cut_after = self.cut.get(digest)
        if cut_after is not None and stop - start > cut_after:
            del self.cut[digest]  # this download is the one cut
        else:
            cut_after = None
        stall_after = self.stall.get(digest)
        if stall_after is not None and stop - start > stall_after:
            del self.stall[digest]
            await self._send(response, data, start, start + stall_after, digest)
            await asyncio.sleep(3600)  # until the client gives up (or the registry stops)
        offset = start
        while offset < stop:
            end = min(stop, offset + _CHUNK)
            if cut_after is not None and end - start > cut_after:
                end = start + cut_after
                await self._send(response, data, offset, end, digest)
                if request.transport is not None:
                    request.transport.abort()
                return response
            await self._send(response, data, offset, end, digest)
            offset = end
        await response.write_eof()
        return response

    async def _send(
        self, response: web.StreamResponse, data: bytes, start: int, end: int, digest: str
    ) -> None:
        if end > start:
            if self.link:
                loop = asyncio.get_running_loop()
                now = loop.time()
                self._free_at = max(now, self._free_at) + (end - start) / self.link
                await asyncio.sleep(self._free_at - now)
            await response.write(data[start:end])
            self.stats.blob_bytes[digest] = self.stats.blob_bytes.get(digest, 0) + end - start

    async def start(self) -> None:
        if self._runner is not None:
            return
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=0.01)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._port = self._port or int(runner.addresses[0][1])
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> EmulatedRegistry:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _error(status: int, code: str, message: str) -> web.Response:
    body = {"errors": [{"code": code, "message": message}]}
    return web.json_response(body, status=status)
