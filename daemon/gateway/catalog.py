"""Answers olmd gives from the fleet's own view, without forwarding: the merged model
lists (``/api/tags``, ``/api/ps``, ``/v1/models``), ``/api/version`` and ``GET /``.

Merged lists hold each model once, from the healthy nodes' last probes, with the names
of the nodes that hold it in an extra ``nodes`` field (clients ignore unknown fields).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from daemon import __version__
from daemon.domain import select_routable
from daemon.gateway.fleet import Fleet, Node


def _live_nodes(fleet: Fleet) -> list[Node]:
    return list(select_routable(list(fleet), time.monotonic(), fleet.policy).nodes)


def merged(
    fleet: Fleet, field: Callable[[Node], dict[str, dict[str, Any]]]
) -> list[dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for node in _live_nodes(fleet):
        for key, entry in field(node).items():
            if key in node.missing:
                continue
            if key not in out:
                out[key] = {**entry, "nodes": []}
            out[key]["nodes"].append(node.name)
    return [out[key] for key in sorted(out)]


def tags(fleet: Fleet) -> dict[str, Any]:
    return {"models": merged(fleet, lambda n: n.models)}


def ps(fleet: Fleet) -> dict[str, Any]:
    return {"models": merged(fleet, lambda n: n.loaded)}


def _created(entry: dict[str, Any]) -> int:
    try:
        return int(datetime.fromisoformat(str(entry.get("modified_at"))).timestamp())
    except ValueError:
        return 0


def openai_models(fleet: Fleet) -> dict[str, Any]:
    data = [
        {
            "id": entry.get("name") or entry.get("model"),
            "object": "model",
            "created": _created(entry),
            "owned_by": "library",
        }
        for entry in merged(fleet, lambda n: n.models)
    ]
    return {"object": "list", "data": data}


def version(fleet: Fleet) -> dict[str, Any]:
    """``version`` is the oldest node's, so a client's feature check holds on every node."""
    nodes = {node.name: node.version for node in fleet}
    known = [v for v in nodes.values() if v]
    oldest = min(known, key=_version_key) if known else __version__
    return {"version": oldest, "olmd": __version__, "nodes": nodes}


def _version_key(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("-")[0].split("."):
        parts.append(int(part) if part.isdigit() else 0)
    return tuple(parts)


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")
