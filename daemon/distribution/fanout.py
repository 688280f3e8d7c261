"""A pull, copy or delete on many nodes at once, answered as one.

:func:`fleet_pull` pulls a model onto every node given (in gateway mode by the name that
points at olmd's registry endpoint, then copied to the short name and the long one
deleted) and yields Ollama's progress lines merged across the nodes: per layer, bytes
completed and total summed over the nodes; each other status once; then one ``success``,
or one ``error`` naming each node that failed. :func:`on_each` runs a call on every node
and says which failed. Tasks belong to the generator: a client that leaves cancels them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from daemon.distribution.nodeapi import NodeError, copy_model, delete_model, pull_lines

__all__ = ["Mirror", "NodeRef", "fleet_pull", "on_each"]

Line = dict[str, Any]


def _same(text: str) -> str:
    return text


@dataclass(frozen=True)
class NodeRef:
    """A node to act on. ``redact`` takes a secret address out of its error messages."""

    name: str
    url: str
    redact: Callable[[str], str] = _same


@dataclass(frozen=True)
class Mirror:
    """Gateway mode: the nodes pull ``source`` (``host:port/ns/name:tag``, olmd's
    endpoint) insecurely; ``manifest_url`` is what they fetch first, for error messages."""

    source: str
    manifest_url: str


async def _pull_one(
    session: aiohttp.ClientSession,
    node: NodeRef,
    model: str,
    mirror: Mirror | None,
    out: asyncio.Queue[tuple[str, Line | str | None]],
    connect_timeout: float,
) -> None:
    name = mirror.source if mirror is not None else model
    try:
        async for event in pull_lines(
            session, node.url, name, insecure=mirror is not None, connect_timeout=connect_timeout
        ):
            if event.get("status") != "success":
                await out.put((node.name, event))
        if mirror is not None:
            await copy_model(session, node.url, mirror.source, model)
            await delete_model(session, node.url, mirror.source)
    except NodeError as exc:
        detail = str(exc)
        if mirror is not None:
            detail = f"pulling from olmd at {mirror.manifest_url} failed: {detail}"
        await out.put((node.name, node.redact(detail)))
        return
    await out.put((node.name, None))


async def fleet_pull(
    session: aiohttp.ClientSession,
    nodes: Sequence[NodeRef],
    model: str,
    *,
    mirror: Mirror | None = None,
    connect_timeout: float = 10.0,
) -> AsyncIterator[Line]:
    """Merged progress of ``model`` pulled onto ``nodes``; ends with success or error."""
    out: asyncio.Queue[tuple[str, Line | str | None]] = asyncio.Queue()
    tasks = [
        asyncio.create_task(
            _pull_one(session, node, model, mirror, out, connect_timeout),
            name=f"olmd-fleet-pull {node.name}",
        )
        for node in nodes
    ]
    layers: dict[str, dict[str, tuple[int, int]]] = {}
    said: set[str] = set()
    failed: dict[str, str] = {}
    left = len(tasks)
    try:
        while left:  # bounded: every node task ends with one final item
            node, item = await out.get()
            if isinstance(item, dict):
                line = _merge(item, node, layers, said)
                if line is not None:
                    yield line
                continue
            left -= 1
            if isinstance(item, str):
                failed[node] = item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if failed:
        detail = "; ".join(f"{n}: {why}" for n, why in sorted(failed.items()))
        yield {"error": f"pull of {model} failed on {len(failed)} of {len(nodes)} nodes: {detail}"}
    else:
        yield {"status": "success"}


def _merge(
    event: Line, node: str, layers: dict[str, dict[str, tuple[int, int]]], said: set[str]
) -> Line | None:
    digest, total = event.get("digest"), event.get("total")
    if isinstance(digest, str) and isinstance(total, int):
        completed = event.get("completed")
        per_node = layers.setdefault(digest, {})
        per_node[node] = (completed if isinstance(completed, int) else 0, total)
        return {
            "status": str(event.get("status", f"pulling {digest[7:19]}")),
            "digest": digest,
            "total": sum(t for _, t in per_node.values()),
            "completed": sum(c for c, _ in per_node.values()),
        }
    status = event.get("status")
    if isinstance(status, str) and status not in said:
        said.add(status)
        return {"status": status}
    return None


async def on_each(
    nodes: Sequence[NodeRef], call: Callable[[NodeRef], Awaitable[None]]
) -> dict[str, NodeError]:
    """Run ``call`` on every node at once; the nodes that failed, with why."""

    async def one(node: NodeRef) -> NodeError | None:
        try:
            await call(node)
        except NodeError as exc:
            return NodeError(node.redact(str(exc)), exc.status)
        return None

    results = await asyncio.gather(*(one(n) for n in nodes))
    return {n.name: r for n, r in zip(nodes, results, strict=True) if r is not None}


async def fleet_copy(
    session: aiohttp.ClientSession, nodes: Sequence[NodeRef], source: str, destination: str
) -> dict[str, NodeError]:
    return await on_each(nodes, lambda n: copy_model(session, n.url, source, destination))


async def fleet_delete(
    session: aiohttp.ClientSession, nodes: Sequence[NodeRef], model: str
) -> dict[str, NodeError]:
    return await on_each(nodes, lambda n: delete_model(session, n.url, model))
