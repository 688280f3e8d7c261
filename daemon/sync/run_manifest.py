"""The manifest a sync run writes: built from the run's targets, inventories and
outcomes, merged with the previous manifest. The run's recorder writes it
(:mod:`daemon.sync.claim`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path

from daemon.logs import get_logger
from daemon.settings import Settings
from daemon.sync.manifest import (
    Manifest,
    ManifestError,
    ModelEntry,
    NodeEntry,
    merge_previous,
    read_manifest,
)
from daemon.sync.plan import Inventory, Outcome, SyncOptions, SyncResult, Target

__all__ = ["build_manifest", "build_run_manifest", "read_previous"]

log = get_logger("olmd.sync")


def build_manifest(
    *,
    generated_at: datetime,
    window: str,
    options: SyncOptions,
    targets: Iterable[Target],
    inventories: Mapping[str, Inventory],
    outcomes: Iterable[Outcome],
    unconfirmed: Mapping[str, str] | None = None,
    confirmed_at: datetime | None = None,
) -> Manifest:
    """This run's manifest, before :func:`daemon.sync.manifest.merge_previous` folds in the last.

    A reachable node lists the planned models first (with what the run did), then every
    other model it holds as ``present``. An unreachable node lists the planned models as
    failed; merging puts its last known entries back, marked stale.

    A node in ``unconfirmed`` answered the first inventory (``inventories`` holds that
    one) but not the final one: it is listed as for a reachable node, but with
    ``reachable=False``, ``stale=True`` and ``last_confirmed=confirmed_at`` (when the
    first inventory was taken), since nothing after that was confirmed.
    """
    unconfirmed = unconfirmed or {}
    by_node: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        by_node.setdefault(outcome.node, []).append(outcome)
    nodes = []
    for target in targets:
        inventory = inventories[target.name]
        planned = by_node.get(target.name, [])
        entries = [_entry(o, inventory.models.get(o.model)) for o in planned]
        if inventory.reachable:
            names = {o.model for o in planned}
            entries += [e for name, e in inventory.models.items() if name not in names]
        lost = inventory.reachable and target.name in unconfirmed
        nodes.append(
            NodeEntry(
                name=target.name,
                address=target.address,
                ollama_version=inventory.version,
                reachable=inventory.reachable and not lost,
                stale=lost,
                last_confirmed=confirmed_at if lost else None,
                models=entries,
            )
        )
    return Manifest(
        generated_at=generated_at,
        window=window,
        options=options.model_dump(mode="json"),
        nodes=nodes,
    )


def _entry(outcome: Outcome, held: ModelEntry | None) -> ModelEntry:
    return ModelEntry(
        name=outcome.model,
        digest=held.digest if held else None,
        size=held.size if held else None,
        modified_at=held.modified_at if held else None,
        status=outcome.status or "failed",
        attempts=outcome.attempts,
        seconds=round(outcome.seconds, 3),
        last_error=outcome.error or (held.last_error if held else None),
    )


def read_previous(path: Path) -> Manifest | None:
    """The manifest at ``path`` to merge a run's into; None if there is none, or if it
    cannot be read (logged: it is kept as ``.prev`` when the new one is written)."""
    try:
        return read_manifest(path)
    except ManifestError as exc:
        log.error("sync.previous_manifest_unreadable", error=str(exc).splitlines()[0])
        return None


def build_run_manifest(
    settings: Settings,
    options: SyncOptions,
    result: SyncResult,
    targets: list[Target],
    final: dict[str, Inventory],
    lost: dict[str, str],
    *,
    generated_at: datetime,
    previous: Manifest | None,
) -> Manifest:
    """This run's manifest with ``previous`` (the last one written) merged in."""
    manifest = build_manifest(
        generated_at=generated_at,
        window=result.window,
        options=options,
        targets=targets,
        inventories=final,
        outcomes=result.outcomes,
        unconfirmed=lost,
        confirmed_at=result.started_at,
    )
    ours = {t.name for t in targets}
    untouched = [n.name for n in settings.nodes() if n.name not in ours]
    # A --models run speaks only for its models: the others' records are kept.
    handled = {o.model for o in result.outcomes} if options.models else None
    return merge_previous(manifest, previous, keep=untouched, handled=handled)
