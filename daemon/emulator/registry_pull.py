"""The registry side of the emulator's ``/api/pull``: fetch a model from a registry as
Ollama does (``server/images.go``, ``server/download.go``).

1. ``GET <base>/v2/<ns>/<name>/manifests/<tag>`` with Ollama's ``Accept`` header; the bytes
   are kept as they came (the model's digest is their sha256).
2. For each blob not on disk: ``HEAD`` (the size, from ``Content-Length``: required), then a
   ``GET`` that follows redirects only within the same host name and must end in a ``307``
   to another host or a ``200`` carrying a ``Location`` header (else "no Location header
   in response"); the parts are then fetched with parallel ``Range`` requests from that
   location and the whole blob checked against its sha256.
3. The manifest is written under the name asked for.

``base`` is ``http://`` + the name's host for an insecure pull (``https://`` otherwise), or
the emulator's ``registry`` for a name without a host. Blob bytes are not kept: the
emulator remembers which digests it holds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

__all__ = ["RegistryPullError", "pull_from_registry", "registry_base"]

ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"
_MIN_PART = 64 * 1024
_PARTS = 4
_MAX_REDIRECTS = 10

Emit = Callable[[dict[str, Any], bool], Awaitable[None]]


class RegistryPullError(Exception):
    """A pull that failed; the message is Ollama's words for it."""


def registry_base(name: str, insecure: bool, default: str) -> tuple[str, str] | None:
    """(base URL, ``ns/name:tag``) for ``name``, or None when the name has no host and the
    emulator has no registry (it then pulls from nowhere, as before)."""
    parts = name.split("/")
    if len(parts) == 3:
        return f"{'http' if insecure else 'https'}://{parts[0]}", "/".join(parts[1:])
    if not default:
        return None
    rest = name if len(parts) == 2 else f"library/{name}"
    return default.rstrip("/"), rest


async def pull_from_registry(
    base: str, path: str, have: set[str], emit: Emit
) -> tuple[bytes, list[str]]:
    """The manifest's bytes and every blob digest it names, blobs fetched as Ollama does."""
    repo, _, tag = path.rpartition(":")
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        url = f"{base}/v2/{repo}/manifests/{tag}"
        try:
            async with session.get(url, headers={"Accept": ACCEPT}) as response:
                if response.status == 404:
                    raise RegistryPullError("pull model manifest: file does not exist")
                if response.status != 200:
                    raise RegistryPullError(
                        f"pull model manifest: unexpected status code {response.status}"
                    )
                raw = await response.read()
        except aiohttp.ClientError as exc:
            raise RegistryPullError(f'pull model manifest: Get "{url}": {exc}') from exc
        manifest = json.loads(raw)
        blobs = [*manifest["layers"], manifest["config"]]
        for blob in blobs:
            digest, size = blob["digest"], int(blob["size"])
            if digest in have:
                await emit(_progress(digest, size, size), False)
                continue
            await _blob(session, f"{base}/v2/{repo}/blobs/{digest}", digest, size, emit)
            have.add(digest)
        return raw, [b["digest"] for b in blobs]


async def _blob(
    session: aiohttp.ClientSession, url: str, digest: str, size: int, emit: Emit
) -> None:
    try:
        async with session.head(url, allow_redirects=True) as head:
            if head.status != 200:
                raise RegistryPullError(f"unexpected status code {head.status}")
            if head.content_length is None:
                raise RegistryPullError("HEAD of the blob gave no Content-Length")
            total = head.content_length
        direct = await _direct_url(session, url)
        data = bytearray(total)
        done = [0]
        await emit(_progress(digest, total, 0), False)
        part = max(_MIN_PART, -(-total // _PARTS))

        async def fetch(start: int) -> None:
            stop = min(total, start + part)
            headers = {"Range": f"bytes={start}-{stop - 1}"}
            async with session.get(direct, headers=headers) as response:
                if response.status not in (200, 206):
                    raise RegistryPullError(f"unexpected status code {response.status}")
                at = start
                async for chunk in response.content.iter_chunked(256 * 1024):
                    data[at : at + len(chunk)] = chunk
                    at += len(chunk)
                    done[0] += len(chunk)
                if at != stop:
                    raise RegistryPullError("unexpected EOF")
            await emit(_progress(digest, total, done[0]), False)

        await asyncio.gather(*(fetch(s) for s in range(0, total, part)))
    except aiohttp.ClientError as exc:
        raise RegistryPullError(f'Get "{url}": {exc}') from exc
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if got != digest or total != size:
        raise RegistryPullError(
            f"digest mismatch, file must be downloaded again: want {digest}, got {got}"
        )


async def _direct_url(session: aiohttp.ClientSession, url: str) -> str:
    """Where the blob's bytes are: Ollama's rule (``download.go``)."""
    host = urlsplit(url).hostname
    for _ in range(_MAX_REDIRECTS):
        async with session.get(url, allow_redirects=False) as response:
            location = response.headers.get("Location")
            if response.status in (301, 302, 303, 307, 308) and location:
                target = urljoin(url, location)
                if urlsplit(target).hostname == host:
                    url = target  # the same host name: Go's client follows it
                    continue
                if response.status != 307:
                    raise RegistryPullError(f"unexpected status code {response.status}")
                return target
            if response.status != 200:
                raise RegistryPullError(f"unexpected status code {response.status}")
            if not location:
                raise RegistryPullError("http: no Location header in response")
            return urljoin(url, location)
    raise RegistryPullError("maximum redirects exceeded (10) for directURL")


def _progress(digest: str, total: int, completed: int) -> dict[str, Any]:
    line: dict[str, Any] = {"status": f"pulling {digest[7:19]}", "digest": digest}
    line["total"] = total
    if completed:
        line["completed"] = completed
    return line
