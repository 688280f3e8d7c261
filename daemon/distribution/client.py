"""The registry client: manifests and blobs fetched as Ollama fetches them.

A manifest is one ``GET`` with Ollama's ``Accept`` header; its bytes are returned as
served. A blob: the ``GET`` is followed through its redirects (the public registry sends
clients to a CDN) with ``Range: bytes=0-0``, so resolving the location costs one byte; the
blob is then fetched from there in parts, several at once, each a ``Range`` request
written to a file of its own under the blob's partial folder. A part cut short resumes
from the bytes its file holds (also in the next run); one that shows no byte for
``stall_timeout`` is abandoned and retried; failures are retried with growing waits. The
parts are then read in order through sha256: only a blob whose digest matches leaves the
partial folder, and a mismatch deletes the parts and names the digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urljoin

import aiohttp

from daemon.domain import ModelRef

__all__ = ["ACCEPT", "RegistryClient", "RegistryError", "manifest_url"]

ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"
_MAX_REDIRECTS = 10
_CHUNK = 1024 * 1024
_BACKOFF_CAP = 30.0


class RegistryError(Exception):
    """A manifest or blob that could not be fetched; the message names the URL or the
    digest. ``retryable``: trying again later may help."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


def manifest_url(base: str, ref: ModelRef) -> str:
    return f"{base}/v2/{ref.namespace}/{ref.model}/manifests/{ref.tag}"


def blob_url(base: str, ref: ModelRef, digest: str) -> str:
    return f"{base}/v2/{ref.namespace}/{ref.model}/blobs/{digest}"


Progress = Callable[[int], None]
"""Called with the number of new bytes each time some arrive."""


class RegistryClient:
    """Fetches from one or more registries over ``session`` (owned by the caller)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        parts: int = 8,
        part_size: int = 100 * 1024 * 1024,
        stall_timeout: float = 30.0,
        max_attempts: int = 3,
        backoff_seconds: float = 1.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self._session = session
        self._parts = parts
        self._part_size = part_size
        self._stall = stall_timeout
        self._attempts = max_attempts
        self._backoff = backoff_seconds
        self._connect = connect_timeout

    def _timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, sock_connect=self._connect, sock_read=self._stall)

    async def _wait(self, attempt: int) -> None:
        await asyncio.sleep(min(_BACKOFF_CAP, self._backoff * 2.0 ** (attempt - 1)))

    async def manifest(self, base: str, ref: ModelRef) -> bytes:
        """The manifest's bytes, exactly as served."""
        url = manifest_url(base, ref)
        for attempt in range(1, self._attempts + 1):
            try:
                async with self._session.get(
                    url, headers={"Accept": ACCEPT}, timeout=self._timeout()
                ) as response:
                    if response.status == 404:
                        raise RegistryError(
                            f"{ref.name}: the registry has no such model (404 from {url}); "
                            "file does not exist",
                            retryable=False,
                        )
                    if response.status != 200:
                        raise RegistryError(f"{ref.name}: {url} answered HTTP {response.status}")
                    return await response.read()
            except RegistryError as exc:
                if not exc.retryable or attempt == self._attempts:
                    raise
            except (aiohttp.ClientError, TimeoutError) as exc:
                if attempt == self._attempts:
                    reason = str(exc) or type(exc).__name__
                    raise RegistryError(f"{ref.name}: cannot fetch {url}: {reason}") from exc
            await self._wait(attempt)
        raise AssertionError("unreachable")

    async def blob(
        self, base: str, ref: ModelRef, digest: str, size: int, workdir: Path, progress: Progress
    ) -> Path:
        """Download blob ``digest`` into ``workdir`` (resuming what is there) and check
        it; the path of the verified file, to be committed to the cache."""
        url = blob_url(base, ref, digest)
        _make_folder(workdir)
        direct = await self._direct(url, digest)
        step = max(1, min(self._part_size, -(-size // self._parts) if size else 1))
        spans = [
            (i, start, min(size, start + step)) for i, start in enumerate(range(0, size, step))
        ]
        have = sum(_held(workdir / f"part-{i}") for i, _, _ in spans)
        if have:
            progress(have)
        gate = asyncio.Semaphore(self._parts)

        async def one(i: int, start: int, stop: int) -> None:
            async with gate:
                await self._part(direct, workdir / f"part-{i}", start, stop, digest, progress)

        tasks = [asyncio.create_task(one(*span)) for span in spans]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # Reading a large blob through sha256 takes a while: off the event loop.
        return await asyncio.to_thread(_assemble, workdir, len(spans), digest, size, ref)

    async def _direct(self, url: str, digest: str) -> str:
        """Where the blob's bytes are, after every redirect."""
        for attempt in range(1, self._attempts + 1):
            try:
                target = url
                for _ in range(_MAX_REDIRECTS):
                    async with self._session.get(
                        target,
                        headers={"Range": "bytes=0-0"},
                        allow_redirects=False,
                        timeout=self._timeout(),
                    ) as response:
                        location = response.headers.get("Location")
                        if response.status in (301, 302, 303, 307, 308) and location:
                            target = urljoin(target, location)
                            continue
                        if response.status in (200, 206):
                            return target
                        raise RegistryError(
                            f"blob {digest}: {target} answered HTTP {response.status}",
                            retryable=response.status >= 500,
                        )
                raise RegistryError(f"blob {digest}: more than {_MAX_REDIRECTS} redirects")
            except RegistryError as exc:
                if not exc.retryable or attempt == self._attempts:
                    raise
            except (aiohttp.ClientError, TimeoutError) as exc:
                if attempt == self._attempts:
                    reason = str(exc) or type(exc).__name__
                    raise RegistryError(f"blob {digest}: cannot fetch {url}: {reason}") from exc
            await self._wait(attempt)
        raise AssertionError("unreachable")

    async def _part(
        self, url: str, path: Path, start: int, stop: int, digest: str, progress: Progress
    ) -> None:
        failures = 0
        while True:  # bounded: each pass adds bytes or counts a failure
            at = start + _held(path)
            if at >= stop:
                return
            before = at
            try:
                async with self._session.get(
                    url, headers={"Range": f"bytes={at}-{stop - 1}"}, timeout=self._timeout()
                ) as response:
                    if response.status not in (200, 206):
                        raise RegistryError(f"blob {digest}: {url} answered HTTP {response.status}")
                    if response.status == 200 and at:
                        raise RegistryError(f"blob {digest}: {url} ignored the Range header")
                    with _append(path) as out:
                        async for chunk in response.content.iter_chunked(_CHUNK):
                            chunk = chunk[: stop - at]
                            out.write(chunk)
                            at += len(chunk)
                            progress(len(chunk))
                            if at >= stop:
                                break
                if at >= stop:
                    return
                raise aiohttp.ClientPayloadError("the connection closed early")
            except (aiohttp.ClientError, TimeoutError, RegistryError) as exc:
                failures = 0 if at > before else failures + 1  # progress resets the count
                if failures >= self._attempts:
                    reason = str(exc) or type(exc).__name__
                    raise RegistryError(
                        f"blob {digest}: download from {url} failed: {reason}"
                    ) from exc
                if failures:
                    await self._wait(failures)


def _make_folder(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


def _append(path: Path) -> BinaryIO:
    # Local disk writes of at most a megabyte each: not worth a thread per chunk.
    return path.open("ab")


def _held(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _assemble(workdir: Path, count: int, digest: str, size: int, ref: ModelRef) -> Path:
    hasher = hashlib.sha256()
    whole = workdir / "blob"
    with whole.open("wb") as out:
        for i in range(count):
            with (workdir / f"part-{i}").open("rb") as part:
                while chunk := part.read(_CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
    got = "sha256:" + hasher.hexdigest()
    written = whole.stat().st_size
    if got != digest or written != size:
        shutil.rmtree(workdir, ignore_errors=True)
        raise RegistryError(
            f"{ref.name}: blob {digest} failed its sha256 check (got {got}, {written} bytes); "
            "it was not cached and no node received it"
        )
    for i in range(count):
        (workdir / f"part-{i}").unlink()
    return whole
