"""What the nodes hold: each node's ``/api/tags`` and ``/api/version`` read into an
:class:`~daemon.sync.plan.Inventory`, and the final check that turns a "pulled" the node
does not list afterwards into "failed".
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping
from datetime import datetime

import aiohttp

from daemon.domain import ModelRef
from daemon.logs import get_logger
from daemon.sync.manifest import ModelEntry, normalise_digest
from daemon.sync.plan import Inventory, Outcome, Target

__all__ = ["check_pulled", "inventory_all", "parse_tags"]

log = get_logger("olmd.sync")


def parse_tags(payload: object) -> dict[str, ModelEntry]:
    """``/api/tags`` as manifest entries (status ``present``). Raises ``ValueError`` if the
    payload is not a model list. A digest that is not sha256 is dropped and said so in
    the entry's ``last_error``: a truncated digest cannot be compared across nodes."""
    if not isinstance(payload, dict) or not isinstance(payload.get("models"), list):
        raise ValueError("/api/tags did not return a model list")
    out: dict[str, ModelEntry] = {}
    for item in payload["models"]:
        if not isinstance(item, dict):
            continue
        try:
            name = ModelRef.parse(str(item.get("name") or item.get("model") or "")).name
        except ValueError:
            continue  # a name we could never pull or route to; not ours to record
        digest, error = None, None
        try:
            digest = normalise_digest(str(item.get("digest", "")), model=name)
        except ValueError as exc:
            error = str(exc)
        size = item.get("size")
        out[name] = ModelEntry(
            name=name,
            digest=digest,
            size=size if isinstance(size, int) and size >= 0 else None,
            modified_at=_timestamp(item.get("modified_at")),
            status="present",
            last_error=error,
        )
    return out


def _timestamp(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    # Ollama writes nanoseconds; Python reads at most microseconds.
    head, dot, rest = value.partition(".")
    if dot:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        value = f"{head}.{rest[: min(digits, 6)]}{rest[digits:]}"
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def check_pulled(
    outcomes: Iterable[Outcome],
    final: Mapping[str, Inventory],
    unconfirmed: Mapping[str, str] | None = None,
) -> None:
    """Turn a "pulled" the node does not list afterwards into "failed".

    The node's own list is the truth, not a pull's last line; the manifest must show a
    success that left nothing behind. A node in ``unconfirmed`` (node → why its final
    inventory failed) could not be asked: its pulls stay as the transport reported them,
    with a note that they are unconfirmed, rather than an invented failure.
    """
    unconfirmed = unconfirmed or {}
    for o in outcomes:
        if o.status != "pulled":
            continue
        reason = unconfirmed.get(o.node)
        if reason is not None:
            o.error = f"pulled, but not confirmed: the final inventory failed ({reason})"
        elif o.model not in final[o.node].models:
            o.status = "failed"
            o.error = "the pull reported success but the node does not list the model"


async def inventory_all(
    session: aiohttp.ClientSession, targets: Iterable[Target]
) -> dict[str, Inventory]:
    targets = list(targets)
    found = await asyncio.gather(*(_inventory(session, t) for t in targets))
    return {t.name: inv for t, inv in zip(targets, found, strict=True)}


async def _inventory(session: aiohttp.ClientSession, target: Target) -> Inventory:
    """What the node holds, from its HTTP API (SSH nodes too: digests come from there)."""
    try:
        async with session.get(f"{target.url}/api/tags") as response:
            response.raise_for_status()
            models = parse_tags(await response.json(content_type=None))
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        log.warning("sync.node_unreachable", node=target.name, error=reason)
        return Inventory(reachable=False, error=f"cannot list models at {target.url}: {reason}")
    version = None
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        async with session.get(f"{target.url}/api/version") as response:
            if response.status == 200:
                data = await response.json(content_type=None)
                version = str(data.get("version")) if isinstance(data, dict) else None
    return Inventory(reachable=True, version=version, models=models)
