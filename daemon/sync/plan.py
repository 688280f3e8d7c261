"""The sync engine's pure half: options, targets, the plan, outcomes, the run's result and
its live progress. No I/O and no clock; :mod:`daemon.sync.service` runs it. The node inventory is
read in :mod:`daemon.sync.inventory`, the manifest built in :mod:`daemon.sync.run_manifest`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from daemon.domain import ModelRef
from daemon.settings import NodeSettings, Settings, redact_address
from daemon.sync.manifest import Manifest, ModelEntry, ModelStatus

__all__ = [
    "Action",
    "Inventory",
    "Outcome",
    "PlannedAction",
    "SyncOptions",
    "SyncProgress",
    "SyncResult",
    "Target",
    "build_plan",
    "select_models",
    "select_targets",
]

Action = Literal["pull", "skip", "check", "unreachable"]
# Statuses that count as success; "missing" only where nothing was to be pulled (checks).
_GOOD: frozenset[str] = frozenset({"present", "pulled", "skipped"})
_DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"


class SyncOptions(BaseModel):
    """What one run is asked to do; the same for the CLI, the scheduler and the admin API.

    ``models`` and ``host`` narrow the run (empty: every configured model and node).
    Model names are checked against Ollama's grammar and normalised (``llama3`` becomes
    ``llama3:latest``). Build from a JSON body with ``SyncOptions.model_validate(body)``,
    which raises ``pydantic.ValidationError`` (a ``ValueError``) naming the bad key.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    skip_existing: bool = False
    no_download: bool = False
    dry_run: bool = False
    models: tuple[str, ...] = ()
    host: str | None = None
    ignore_window: bool = False

    @field_validator("models")
    @classmethod
    def _valid_names(cls, models: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(ModelRef.parse(name).name for name in models))

    @property
    def full(self) -> bool:
        """A whole sync: every node and model, downloads allowed. Only these count as the
        window's sync for the scheduler's catch-up rule."""
        return not self.models and self.host is None and not self.no_download


@dataclass(frozen=True)
class Target:
    """A node as the transports see it; satisfies ``daemon.ports.PullTarget``."""

    name: str
    url: str
    transport: str
    ssh_host: str
    ssh_port: int
    ssh_user: str | None
    ssh_key_path: str | None = field(repr=False)  # a secret's location: kept out of reprs
    known_hosts: str
    connect_timeout: float
    address: str = ""  # for output: the URL, or a placeholder when it is a secret
    hidden: tuple[str, int] | None = field(default=None, repr=False)  # a secret host, port

    def redact(self, text: str) -> str:
        if self.hidden is None:
            return text
        return redact_address(text, *self.hidden, self.name)

    @classmethod
    def from_settings(cls, node: NodeSettings, settings: Settings) -> Target:
        key = settings.ssh_key_path
        return cls(
            name=node.name,
            url=node.url,
            transport=node.transport,
            ssh_host=node.ssh_host or node.host,
            ssh_port=node.ssh_port,
            ssh_user=node.ssh_user or settings.ssh_user,
            ssh_key_path=key.get_secret_value() if key is not None else None,
            known_hosts=str(settings.ssh.known_hosts or _DEFAULT_KNOWN_HOSTS),
            connect_timeout=settings.ssh.connect_timeout,
            address=node.shown_address,
            hidden=(node.host, node.port) if node.secret_address else None,
        )


def select_targets(settings: Settings, host: str | None) -> list[Target]:
    """Every configured node, or the one ``host`` names (by name, host or ssh_host).

    Raises ``ValueError`` listing the nodes when ``host`` matches none.
    """
    nodes = settings.nodes()
    if host is not None:
        nodes = [n for n in nodes if host in (n.name, n.host, n.ssh_host)]
        if not nodes:
            known = ", ".join(n.name for n in settings.nodes())
            raise ValueError(f"host {host!r} matches no configured node; nodes: {known}")
    return [Target.from_settings(node, settings) for node in nodes]


def select_models(settings: Settings, options: SyncOptions) -> list[str]:
    """``options.models``, else baseline then fallback models; normalised, each once."""
    names = options.models or tuple(settings.models())
    return list(dict.fromkeys(ModelRef.parse(name).name for name in names))


@dataclass(frozen=True)
class Inventory:
    """What a node said it holds; ``models`` is keyed by normalised name."""

    reachable: bool
    version: str | None = None
    models: Mapping[str, ModelEntry] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class PlannedAction:
    """One decision: what the run does about ``model`` on ``node``, and why."""

    node: str
    model: str
    action: Action
    reason: str
    present: bool = False
    """Whether the node listed the model when the plan was made."""

    @property
    def kind(self) -> str:
        """A pull's kind, "refresh" (of a model the node holds) or "missing"; else the
        action itself."""
        if self.action != "pull":
            return self.action
        return "refresh" if self.present else "missing"


def build_plan(
    targets: Iterable[Target],
    models: Iterable[str],
    inventories: Mapping[str, Inventory],
    options: SyncOptions,
) -> list[PlannedAction]:
    """Decide per node and model. Model-major order, so pulls alternate between nodes."""
    nodes = list(targets)
    plan = []
    for model in models:
        for node in nodes:
            inventory = inventories[node.name]
            held = inventory.models.get(model)
            action: Action
            if not inventory.reachable:
                action, reason = "unreachable", inventory.error or "node unreachable"
            elif options.no_download:
                action, reason = "check", "present" if held else "missing (--no-download)"
            elif held is not None and options.skip_existing:
                action, reason = "skip", f"present ({_short(held.digest)})"
            else:
                action = "pull"
                reason = f"refresh: present as {_short(held.digest)}" if held else "not on the node"
            plan.append(PlannedAction(node.name, model, action, reason, held is not None))
    return plan


def _short(digest: str | None) -> str:
    return digest[:19] if digest else "no digest"


@dataclass
class Outcome:
    """What became of one planned action. The engine fills it in as the run goes."""

    node: str
    model: str
    action: Action
    status: ModelStatus | None = None
    attempts: int = 0
    seconds: float = 0.0
    error: str | None = None

    @classmethod
    def start(cls, planned: PlannedAction) -> Outcome:
        outcome = cls(planned.node, planned.model, planned.action)
        if planned.action == "skip":
            outcome.status = "skipped"
        elif planned.action == "check":
            outcome.status = "present" if planned.present else "missing"
        elif planned.action == "unreachable":
            outcome.status, outcome.error = "failed", planned.reason
        return outcome

    @property
    def ok(self) -> bool:
        """Succeeded, or (on a dry run) planned and not yet done."""
        if self.status is None or self.status in _GOOD:
            return True
        return self.action == "check" and self.status == "missing"


@dataclass
class SyncResult:
    """A finished run. ``manifest`` is what was written (None on a dry run)."""

    options: SyncOptions
    started_at: datetime
    finished_at: datetime
    window: str
    plan: list[PlannedAction]
    outcomes: list[Outcome]
    manifest: Manifest | None = None
    manifest_path: Path | None = None
    stopped: str | None = None
    """Why pulls were cut short (window closed, olmd stopping); None if they were not."""

    @property
    def ok(self) -> bool:
        """True when every action succeeded: the CLI's exit status 0."""
        return all(o.ok for o in self.outcomes)

    def counts(self) -> dict[str, int]:
        """How many outcomes ended in each status. A dry run's pulls were only planned:
        they count as "planned" (an outcome without status is a failure otherwise)."""
        unset = "planned" if self.options.dry_run else "failed"
        out: dict[str, int] = {}
        for o in self.outcomes:
            key = o.status or unset
            out[key] = out.get(key, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible, for ``GET /admin/sync`` and ``olmd sync`` in a pipe."""
        return {
            "ok": self.ok,
            "options": self.options.model_dump(mode="json"),
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat(),
            "window": self.window,
            "stopped": self.stopped,
            "counts": self.counts(),
            "manifest_path": str(self.manifest_path) if self.manifest_path else None,
            "drift": [d.model_dump() for d in self.manifest.drift] if self.manifest else [],
            "plan": [asdict(p) | {"kind": p.kind} for p in self.plan],
            "outcomes": [asdict(o) for o in self.outcomes],
        }


class SyncProgress:
    """A live view of one run, for ``GET /admin/sync`` and the CLI's progress display.

    The engine writes it; readers take :meth:`snapshot`. Plain data, no locking needed:
    everything runs on one event loop.
    """

    def __init__(self) -> None:
        self.phase = "starting"
        self.items: dict[tuple[str, str], dict[str, Any]] = {}

    def set_plan(self, plan: Iterable[PlannedAction]) -> None:
        for p in plan:
            state = "queued" if p.action == "pull" else "done"
            self.items[(p.node, p.model)] = {"action": p.action, "state": state}

    def update(self, node: str, model: str, **fields: Any) -> None:
        self.items.setdefault((node, model), {}).update(fields)

    def snapshot(self) -> dict[str, Any]:
        nodes: dict[str, dict[str, Any]] = {}
        for (node, model), item in self.items.items():
            nodes.setdefault(node, {})[model] = dict(item)
        return {"phase": self.phase, "nodes": nodes}
