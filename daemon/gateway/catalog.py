"""Answers olmd gives from the fleet's own view, without forwarding: the merged model
lists (``/api/tags``, ``/api/ps``, ``/v1/models``, ``/v1/models/{model}``),
``/api/version`` and ``GET /``.

Merged lists hold each model once, with the names of the nodes that hold it in an extra
``nodes`` field (clients ignore unknown fields). They list what the nodes that answer
serve: a node counts while its last probe succeeded and it is not draining, whatever its
routing state (a cooling node is back within seconds). Panic routing, which sends requests
to doubtful nodes rather than refuse them, does not make their models count. With no node
answering the lists are empty (200: an inventory can be empty) and ``/api/version`` is a
503, as a client's "is Ollama there?" check should fail then.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from daemon import __version__
from daemon.gateway.dialects import model_not_found
from daemon.gateway.fleet import Fleet, Node, model_key
from daemon.gateway.wire import json_error


def answering(node: Node) -> bool:
    """Whether ``node`` answered its last probe and takes new requests (as
    ``Fleet.answering`` counts nodes for readiness)."""
    return (
        node.probed_at is not None
        and node.health.probe_failures == 0
        and not (node.health.draining)
    )


def _live_nodes(fleet: Fleet) -> list[Node]:
    return [node for node in fleet if answering(node)]


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


def _model_object(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": entry.get("name") or entry.get("model"),
        "object": "model",
        "created": _created(entry),
        "owned_by": "library",
    }


def openai_models(fleet: Fleet) -> dict[str, Any]:
    data = [_model_object(entry) for entry in merged(fleet, lambda n: n.models)]
    return {"object": "list", "data": data}


def openai_model(fleet: Fleet, name: str) -> web.Response:
    """``GET /v1/models/{model}`` (``openai``'s ``models.retrieve``): the model as the
    list shows it, under the name asked for, or OpenAI's 404."""
    missing = model_not_found("openai", name)
    try:
        key = model_key(name)
    except ValueError:
        return missing
    for entry in merged(fleet, lambda n: n.models):
        if model_key(str(entry.get("name") or entry.get("model"))) == key:
            return web.json_response({**_model_object(entry), "id": name})
    return missing


def version(fleet: Fleet, *, full: bool = True) -> web.Response:
    """``version`` is the oldest answering node's, so a client's feature check holds on
    every node that can serve it; 503 while no node answers. ``full``: olmd's version and
    each node's too (for a client with a key, while keys are required)."""
    nodes = {node.name: node.version for node in _live_nodes(fleet)}
    known = [v for v in nodes.values() if v]
    if not known:
        return json_error(503, "no Ollama node answers", **{"Retry-After": "5"})
    oldest = min(known, key=_version_key)
    if not full:
        return web.json_response({"version": oldest})
    return web.json_response({"version": oldest, "olmd": __version__, "nodes": nodes})


def _version_key(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("-")[0].split("."):
        parts.append(int(part) if part.isdigit() else 0)
    return tuple(parts)


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")
