"""The node calls a fan-out makes: ``/api/pull`` (streamed), ``/api/copy``, ``/api/delete``.

Each raises :class:`NodeError` with the node's own words, so the merged answer can say
which node failed and why. Ollama answers a pull with HTTP 200 and may then report a
failure in the stream as an ``{"error": ...}`` line: that is a failure too.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

__all__ = ["NodeError", "copy_model", "delete_model", "pull_lines"]


class NodeError(Exception):
    """A node call that failed; ``status`` is the node's HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def _timeout(connect: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, sock_connect=connect)


async def _error(response: aiohttp.ClientResponse) -> str:
    text = (await response.text(errors="replace")).strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:200] or f"HTTP {response.status}"
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])
    return text[:200]


async def pull_lines(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    *,
    insecure: bool = False,
    connect_timeout: float = 10.0,
) -> AsyncIterator[dict[str, Any]]:
    """The node's progress lines for a pull of ``model``, up to its ``success``."""
    body = {"model": model, "insecure": insecure, "stream": True}
    try:
        async with session.post(
            f"{url}/api/pull", json=body, timeout=_timeout(connect_timeout)
        ) as response:
            if response.status != 200:
                raise NodeError(await _error(response), response.status)
            async for raw in response.content:
                line = raw.strip()
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(event, dict):
                    continue
                if "error" in event:
                    raise NodeError(str(event["error"]))
                yield event
                if event.get("status") == "success":
                    return
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise NodeError(f"cannot reach {url}: {str(exc) or type(exc).__name__}") from exc
    raise NodeError("the pull stream ended before the node reported success")


async def copy_model(
    session: aiohttp.ClientSession, url: str, source: str, destination: str
) -> None:
    body = {"source": source, "destination": destination}
    try:
        async with session.post(f"{url}/api/copy", json=body) as response:
            if response.status != 200:
                raise NodeError(await _error(response), response.status)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise NodeError(f"cannot reach {url}: {str(exc) or type(exc).__name__}") from exc


async def delete_model(session: aiohttp.ClientSession, url: str, model: str) -> None:
    try:
        async with session.delete(f"{url}/api/delete", json={"model": model}) as response:
            if response.status != 200:
                raise NodeError(await _error(response), response.status)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise NodeError(f"cannot reach {url}: {str(exc) or type(exc).__name__}") from exc
