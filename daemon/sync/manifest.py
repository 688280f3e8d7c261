"""The model manifest: what each node holds, as last seen by a sync run.

The sync engine builds a :class:`Manifest`, folds in the previous one with
:func:`merge_previous` (so unreachable nodes keep their last known entries, marked stale)
and saves it with :func:`write_manifest`, which replaces the file atomically and keeps the
old one as ``<name>.prev``. Other tools read the JSON, so the field names are a contract;
bump ``schema_version`` when they change.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from daemon.atomicfile import write_atomic

__all__ = [
    "DriftEntry",
    "Manifest",
    "ManifestError",
    "ModelEntry",
    "ModelStatus",
    "NodeEntry",
    "RegistryModel",
    "compute_drift",
    "merge_previous",
    "normalise_digest",
    "read_manifest",
    "write_manifest",
]

SCHEMA_VERSION: Final = 1
# Written only when set, so a manifest from a gateway without the cluster is unchanged.
_OPTIONAL: Final = ("fence", "gateway", "registry")

ModelStatus = Literal["present", "pulled", "skipped", "missing", "failed", "deferred"]

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_BARE_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_DIGEST_FORM = "'sha256:' followed by 64 lower-case hex digits"


class ManifestError(ValueError):
    """A manifest file that exists but cannot be read as a manifest."""


def _check_digest(value: str, model: str | None) -> str:
    if _DIGEST_RE.fullmatch(value) is None:
        owner = f"model {model!r}: " if model is not None else ""
        raise ValueError(f"{owner}digest {value!r} is not {_DIGEST_FORM}")
    return value


def normalise_digest(value: str, *, model: str | None = None) -> str:
    """Return ``value`` as ``sha256:<64 hex>``, accepting Ollama's bare 64-hex form.

    ``/api/tags`` reports digests without the prefix, while blobs and the registry use it.
    Anything else (a 12-character short id from ``ollama list``, upper case, another
    algorithm) raises ``ValueError`` naming ``model`` and the value: a truncated digest
    cannot be compared across nodes.
    """
    if _BARE_DIGEST_RE.fullmatch(value) is not None:
        return f"sha256:{value}"
    return _check_digest(value, model)


class _Strict(BaseModel):
    # Unknown keys are refused: a typo in a hand-edited manifest or a newer writer
    # should be loud, not silently dropped on the next write.
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    """One model on one node, and what the last run did about it."""

    name: str = Field(min_length=1)
    digest: str | None = None
    """``sha256:`` + 64 lower-case hex; None when the node does not hold the model."""
    size: int | None = Field(default=None, ge=0)
    """Bytes, as the node reports them."""
    modified_at: AwareDatetime | None = None
    status: ModelStatus
    attempts: int = Field(default=0, ge=0)
    seconds: float = Field(default=0.0, ge=0)
    last_error: str | None = None

    @field_validator("digest")
    @classmethod
    def _digest_form(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        return _check_digest(value, info.data.get("name"))


class NodeEntry(_Strict):
    """One node: who it is, whether it answered, and its models.

    ``stale`` means this run could not reach the node and ``models`` are the entries last
    confirmed at ``last_confirmed``; see :func:`merge_previous`.
    """

    name: str = Field(min_length=1)
    address: str
    ollama_version: str | None = None
    reachable: bool
    stale: bool = False
    last_confirmed: AwareDatetime | None = None
    models: list[ModelEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_models(self) -> NodeEntry:
        _refuse_duplicates((m.name for m in self.models), f"model on node {self.name!r}")
        return self

    def model(self, name: str) -> ModelEntry | None:
        """The entry for model ``name``, if this node has one."""
        return next((m for m in self.models if m.name == name), None)


class DriftEntry(_Strict):
    """A model whose digest differs between nodes: node name → digest."""

    model: str
    digests: dict[str, str]

    @model_validator(mode="after")
    def _digest_forms(self) -> DriftEntry:
        for digest in self.digests.values():
            _check_digest(digest, self.model)
        return self


class RegistryModel(_Strict):
    """Gateway mode: a model as olmd's cache holds it, and the nodes that hold that very
    manifest (the registry's digest)."""

    digest: str
    size: int = Field(ge=0)
    nodes: list[str] = Field(default_factory=list)

    @field_validator("digest")
    @classmethod
    def _digest_form(cls, value: str) -> str:
        return _check_digest(value, None)


class Manifest(_Strict):
    """The whole manifest file. ``options`` records what the run was asked to do
    (``skip_existing``, ``no_download``, ``dry_run``, ``models``, ``host``,
    ``ignore_window``)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    generated_at: AwareDatetime
    window: str
    options: dict[str, Any] = Field(default_factory=dict)
    nodes: list[NodeEntry] = Field(default_factory=list)
    drift: list[DriftEntry] = Field(default_factory=list)
    fence: int | None = Field(default=None, ge=1)
    """With the cluster on: the fencing number of the sync lease it was written under
    (a run holding an older one never replaces it). Left out of the file when unset."""
    gateway: str | None = None
    """With the cluster on: the gateway whose run wrote it. Left out when unset."""
    registry: dict[str, RegistryModel] | None = None
    """Gateway mode: model → the registry's digest and size, as cached, and the nodes
    holding it. Left out when unset (direct mode)."""

    @model_validator(mode="after")
    def _unique_nodes(self) -> Manifest:
        _refuse_duplicates((n.name for n in self.nodes), "node")
        return self

    def node(self, name: str) -> NodeEntry | None:
        """The entry for node ``name``, if present."""
        return next((n for n in self.nodes if n.name == name), None)


def _refuse_duplicates(names: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what} {name!r} appears twice")
        seen.add(name)


def compute_drift(nodes: Iterable[NodeEntry]) -> list[DriftEntry]:
    """Models whose digest differs between nodes, sorted by model name.

    Only nodes with a digest for the model take part, so a node that lacks it is not
    drift. Stale nodes count with their last known digest: it is the best knowledge there
    is, and the node entry says it is stale.
    """
    by_model: dict[str, dict[str, str]] = {}
    for node in nodes:
        for entry in node.models:
            if entry.digest is not None:
                by_model.setdefault(entry.name, {})[node.name] = entry.digest
    return [
        DriftEntry(model=model, digests=digests)
        for model, digests in sorted(by_model.items())
        if len(set(digests.values())) > 1
    ]


def merge_previous(
    new: Manifest,
    previous: Manifest | None,
    *,
    keep: Iterable[str] = (),
    handled: Iterable[str] | None = None,
) -> Manifest:
    """Fold the previous manifest into ``new`` so no node's knowledge silently vanishes.

    * A reachable node is taken from ``new`` as is (``stale=False``); a missing
      ``last_confirmed`` becomes ``new.generated_at``.
    * A node ``new`` already marks stale (it answered this run's first inventory but not
      its final one) is taken from ``new`` as is: its entries, confirmed at its
      ``last_confirmed``, are fresher than the previous manifest's.
    * An unreachable node that the previous manifest knew keeps its previous model
      entries and Ollama version, with ``stale=True`` and ``last_confirmed`` from when it
      was last reachable (carried through any number of stale runs). Entries the new
      run made for models the previous one did not list (say, a failed pull of a new
      baseline model) are added after them. The address comes from ``new``.
    * Nodes in ``previous`` but not in ``new`` are dropped (removed from settings),
      except those named in ``keep``, which are carried over unchanged: use it for the
      configured nodes a ``--host`` run did not touch.
    * ``handled``: the models a run narrowed by ``--models`` dealt with (None: a whole
      run, which speaks for every model). On the nodes such a run answered, the previous
      entries of every other model survive: a ``failed``, ``deferred`` or ``missing``
      entry for a model the node does not list is carried over unchanged; a model the
      node lists comes from ``new`` (its live inventory), but keeps its previous
      ``failed`` or ``deferred`` record while its digest is the one that record saw.
      Entries saying the node held a model it no longer lists are dropped.

    The drift list is recomputed over the merged nodes.
    """
    done = None if handled is None else frozenset(handled)
    merged = [_merge_node(node, new, previous, done) for node in new.nodes]
    present = {n.name for n in merged}
    for name in dict.fromkeys(keep):
        kept = previous.node(name) if previous else None
        if kept is not None and name not in present:
            merged.append(kept)
    return new.model_copy(update={"nodes": merged, "drift": compute_drift(merged)})


# Statuses that record a problem rather than what the node holds.
_OUTSTANDING: frozenset[str] = frozenset({"failed", "deferred", "missing"})


def _merge_node(
    node: NodeEntry, new: Manifest, previous: Manifest | None, handled: frozenset[str] | None
) -> NodeEntry:
    before = previous.node(node.name) if previous else None
    if node.reachable or node.stale:
        if node.reachable:
            now = node.last_confirmed or new.generated_at
            node = node.model_copy(update={"stale": False, "last_confirmed": now})
        if handled is None or before is None:
            return node
        return node.model_copy(update={"models": _carry_over(node, before, handled)})
    if previous is None or before is None or not (before.reachable or before.stale):
        return node  # nothing was ever confirmed about it: nothing to keep
    # Reachable last time: confirmed then (older writers may not have said when).
    # Stale last time: keep the older confirmation rather than the stale run's time.
    confirmed = before.last_confirmed
    if confirmed is None and before.reachable:
        confirmed = previous.generated_at
    known = {m.name for m in before.models}
    models = [*before.models, *(m for m in node.models if m.name not in known)]
    return node.model_copy(
        update={
            "ollama_version": before.ollama_version or node.ollama_version,
            "stale": True,
            "last_confirmed": confirmed,
            "models": models,
        }
    )


def _carry_over(node: NodeEntry, before: NodeEntry, handled: frozenset[str]) -> list[ModelEntry]:
    """``node``'s entries with ``before``'s records of the models a narrowed run left alone."""
    models = []
    for entry in node.models:
        old = before.model(entry.name)
        if (
            entry.name not in handled
            and old is not None
            and old.status in _OUTSTANDING
            and entry.digest is not None
            and old.digest == entry.digest
        ):
            # The node still holds what that failure left it with: the record stands.
            live = {"size": entry.size, "modified_at": entry.modified_at}
            entry = old.model_copy(update=live)
        models.append(entry)
    listed = {m.name for m in node.models}
    models += [
        old
        for old in before.models
        if old.name not in listed and old.name not in handled and old.status in _OUTSTANDING
    ]
    return models


def read_manifest(path: Path) -> Manifest | None:
    """Load the manifest at ``path``; None if there is none yet.

    A file that is not a valid manifest raises :class:`ManifestError` naming the path
    (the previous good one may still be at ``<name>.prev``).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        raise ManifestError(
            f"manifest {path} is corrupt or not a manifest "
            f"(the previous one may be at {path.name}.prev): {exc}"
        ) from exc


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Save ``manifest`` to ``path`` atomically, keeping the old file as ``<name>.prev``.

    If this fails or the process dies before the final rename, the old manifest is
    still there and readable. See :func:`daemon.atomicfile.write_atomic`.
    """
    unset = {name for name in _OPTIONAL if getattr(manifest, name) is None}
    data = manifest.model_dump_json(indent=2, exclude=unset).encode() + b"\n"
    write_atomic(Path(path), data, keep_previous=True)
