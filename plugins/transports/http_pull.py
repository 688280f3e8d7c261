"""Pull a model through the node's own API: ``POST /api/pull``, progress streamed as lines."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from daemon.domain import ModelRef
from daemon.ports import PullError, PullProgress, PullTarget

# Statuses that mean Ollama will never accept the request as sent; retrying is useless.
_FINAL_STATUSES = frozenset({400, 401, 403, 404, 405, 413, 422})


class HttpPullTransport:
    """Streams Ollama's ``/api/pull`` and reports its progress. Satisfies ``PullTransport``.

    All pulls of a run share one ``aiohttp.ClientSession`` (a keep-alive pool per node),
    made on first use and closed by :meth:`aclose`; one passed in is used as is and left
    open. Ollama answers HTTP 200 and then may report failure inside the stream as an
    ``{"error": ...}`` line: that is a failure too, as is a stream that ends without
    ``{"status": "success"}``. There is no read timeout here: the engine's stall watchdog
    cancels a pull whose progress stops, which closes the response.
    """

    def __init__(self, session: aiohttp.ClientSession | None = None) -> None:
        self._session = session
        self._owns_session = session is None

    async def pull(self, target: PullTarget, model: str, progress: PullProgress) -> None:
        """One attempt at pulling ``model`` onto ``target``."""
        await self.pull_from(target, model, progress, insecure=False)

    async def pull_from(
        self, target: PullTarget, model: str, progress: PullProgress, *, insecure: bool
    ) -> None:
        """One attempt; ``insecure`` lets the node fetch over plain HTTP (olmd's endpoint)."""
        name = ModelRef.parse(model).name  # before anything is sent
        timeout = _timeout(target)
        # Both keys: "model" is current, "name" is what Ollama before 0.1.x read.
        body: dict[str, object] = {"model": name, "name": name, "stream": True}
        if insecure:
            body["insecure"] = True
        try:
            async with self._client().post(
                f"{target.url}/api/pull", json=body, timeout=timeout
            ) as response:
                if response.status != 200:
                    detail = await _error_text(response)
                    raise PullError(
                        f"{target.name}: /api/pull answered HTTP {response.status}: {detail}",
                        retryable=response.status not in _FINAL_STATUSES,
                    )
                await _follow(response, target, progress)
        except aiohttp.ClientConnectorError as exc:
            raise PullError(f"{target.name}: cannot connect to {target.url}: {exc}") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise PullError(f"{target.name}: connection lost during the pull: {reason}") from exc

    async def copy(self, target: PullTarget, source: str, destination: str) -> None:
        body = {
            "source": ModelRef.parse(source).name,
            "destination": ModelRef.parse(destination).name,
        }
        await self._call(target, "POST", "/api/copy", body, missing_ok=False)

    async def delete(self, target: PullTarget, model: str) -> None:
        body = {"model": ModelRef.parse(model).name}
        await self._call(target, "DELETE", "/api/delete", body, missing_ok=True)

    async def _call(
        self, target: PullTarget, method: str, path: str, body: dict[str, str], *, missing_ok: bool
    ) -> None:
        try:
            async with self._client().request(
                method, f"{target.url}{path}", json=body, timeout=_timeout(target)
            ) as response:
                if response.status == 404 and missing_ok:
                    return
                if response.status != 200:
                    detail = await _error_text(response)
                    raise PullError(
                        f"{target.name}: {path} answered HTTP {response.status}: {detail}",
                        retryable=response.status not in _FINAL_STATUSES,
                    )
        except aiohttp.ClientConnectorError as exc:
            raise PullError(f"{target.name}: cannot connect to {target.url}: {exc}") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise PullError(f"{target.name}: {path} failed: {reason}") from exc

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await session.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        return self._session


def _timeout(target: PullTarget) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(
        total=None, connect=target.connect_timeout, sock_connect=target.connect_timeout
    )


async def _follow(
    response: aiohttp.ClientResponse, target: PullTarget, progress: PullProgress
) -> None:
    layers: dict[str, tuple[int, int]] = {}  # digest → (completed, total)
    async for raw in response.content:
        line = raw.strip()
        if not line:
            continue
        event = _event(line, target)
        if "error" in event:
            raise PullError(f"{target.name}: Ollama reported: {event['error']}")
        status = str(event.get("status", ""))
        digest, total = event.get("digest"), event.get("total")
        if isinstance(digest, str) and isinstance(total, int):
            completed = event.get("completed")
            layers[digest] = (completed if isinstance(completed, int) else 0, total)
        progress(
            status,
            sum(done for done, _ in layers.values()),
            sum(size for _, size in layers.values()),
        )
        if status == "success":
            return
        # Progress lines come every 60 ms per layer; yield so a busy stream cannot
        # starve the engine's watchdog and the other pulls.
        await asyncio.sleep(0)
    raise PullError(f"{target.name}: the pull stream ended before Ollama reported success")


def _event(line: bytes, target: PullTarget) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        shown = line[:120].decode("utf-8", "replace")
        raise PullError(f"{target.name}: /api/pull sent a line that is not a JSON object: {shown}")
    return event


async def _error_text(response: aiohttp.ClientResponse) -> str:
    text = (await response.text(errors="replace")).strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:200] or response.reason or "no details"
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])
    return text[:200]
