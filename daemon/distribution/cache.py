"""The blob cache on disk: Ollama's own layout, bounded, least recently used out first.

``<cache_dir>/blobs/sha256-<hex>`` holds each blob, ``<cache_dir>/manifests/<host>/<ns>/
<name>/<tag>`` each manifest's bytes exactly as the registry served them (as in
``~/.ollama/models``, so an Ollama models directory can be imported as it is), and
``<cache_dir>/partial/`` downloads in progress. A blob enters ``blobs/`` only by
:meth:`BlobCache.commit` after its sha256 was checked; a manifest is written (atomically)
only once every blob it names is there. Every path comes from a digest checked against
``sha256:<64 hex>`` or from a validated model name: nothing a request says can reach
outside ``cache_dir``. The time of last use is the file's mtime.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from daemon.atomicfile import write_atomic
from daemon.domain import DEFAULT_HOST, ModelRef

__all__ = ["BlobCache", "CachedModel", "ManifestError", "blob_digests", "is_digest"]

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_PART = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def is_digest(value: str) -> bool:
    return _DIGEST.fullmatch(value) is not None


class ManifestError(ValueError):
    """Manifest bytes that are not an Ollama manifest."""


def blob_digests(raw: bytes) -> list[tuple[str, int]]:
    """(digest, size) of every blob a manifest names: its layers, then its config."""
    try:
        data = json.loads(raw)
        blobs = [*data["layers"], data["config"]]
        out = [(str(b["digest"]), int(b["size"])) for b in blobs]
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"not an Ollama manifest: {exc}") from exc
    for digest, size in out:
        if not is_digest(digest) or size < 0:
            raise ManifestError(f"not an Ollama manifest: bad blob {digest!r} of size {size}")
    return out


@dataclass(frozen=True)
class CachedModel:
    """A model whose manifest and every blob are in the cache."""

    ref: ModelRef
    raw: bytes  # the manifest, byte for byte
    digest: str  # sha256 of the manifest: what /api/tags shows on a node
    blobs: tuple[tuple[str, int], ...]

    @property
    def size(self) -> int:
        return sum(size for _, size in self.blobs)


class BlobCache:
    """The cache directory. Cheap to make; every method reads the disk as it is now."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    # -- paths ------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where blob ``digest`` lives; ValueError for anything but ``sha256:<64 hex>``."""
        if not is_digest(digest):
            raise ValueError(f"not a blob digest: {digest[:80]!r}")
        return self.root / "blobs" / digest.replace(":", "-")

    def partial_dir(self, digest: str) -> Path:
        return self.root / "partial" / self.blob_path(digest).name

    def manifest_path(self, ref: ModelRef) -> Path:
        parts = (ref.host, ref.namespace, ref.model, ref.tag)
        if not all(_PART.fullmatch(p.replace(":", "_")) for p in parts):
            raise ValueError(f"not a model name the cache can hold: {ref.full!r}")
        return self.root.joinpath("manifests", *parts)

    # -- blobs ------------------------------------------------------------------------

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        try:
            stat = self.blob_path(digest).stat()
        except (OSError, ValueError):
            return False
        return size is None or stat.st_size == size

    def commit(self, digest: str, verified: Path) -> None:
        """Move a file whose sha256 was checked to be ``digest`` into the cache."""
        target = self.blob_path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(verified, target)

    def touch(self, digest: str) -> None:
        """Mark the blob used now (least recently used goes first)."""
        with contextlib.suppress(OSError, ValueError):
            os.utime(self.blob_path(digest))

    def blobs(self) -> list[tuple[str, int, float]]:
        """(digest, size, last used) of every blob."""
        out = []
        folder = self.root / "blobs"
        if not folder.is_dir():
            return []
        for path in folder.iterdir():
            digest = path.name.replace("-", ":", 1)
            if is_digest(digest):
                stat = path.stat()
                out.append((digest, stat.st_size, stat.st_mtime))
        return out

    def size(self) -> int:
        return sum(size for _, size, _ in self.blobs())

    def evict(self, keep: set[str]) -> list[tuple[str, int]]:
        """Delete least recently used blobs until the cache fits ``max_bytes``: first
        those not in ``keep`` (the blobs of the models the fleet should hold), then the
        others. Manifests naming an evicted blob go too. Returns what was deleted."""
        entries = sorted(self.blobs(), key=lambda e: (e[0] in keep, e[2]))
        total = sum(size for _, size, _ in entries)
        gone: list[tuple[str, int]] = []
        for digest, size, _ in entries:
            if total <= self.max_bytes:
                break
            self.blob_path(digest).unlink(missing_ok=True)
            total -= size
            gone.append((digest, size))
        if gone:
            lost = {d for d, _ in gone}
            for model in self.models():
                if any(d in lost for d, _ in model.blobs):
                    self.manifest_path(model.ref).unlink(missing_ok=True)
        return gone

    # -- manifests --------------------------------------------------------------------

    def write_manifest(self, ref: ModelRef, raw: bytes) -> None:
        """Record ``ref``'s manifest; every blob it names must be in the cache."""
        missing = [d for d, size in blob_digests(raw) if not self.has_blob(d, size)]
        if missing:
            raise ValueError(f"{ref.name}: blobs not in the cache: {', '.join(missing)}")
        path = self.manifest_path(ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, raw)

    def model(self, ref: ModelRef) -> CachedModel | None:
        """``ref`` if its manifest and every blob are cached."""
        try:
            raw = self.manifest_path(ref).read_bytes()
            blobs = blob_digests(raw)
        except (OSError, ValueError):
            return None
        if not all(self.has_blob(d, size) for d, size in blobs):
            return None
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        return CachedModel(ref, raw, digest, tuple(blobs))

    def find(self, namespace: str, model: str, tag: str) -> CachedModel | None:
        """The cached model a node asks for by ``ns/name:tag`` (the host part is olmd's
        own address in its request): the default registry's first, then any other."""
        try:
            wanted = ModelRef.parse(f"{namespace}/{model}:{tag}")
        except ValueError:
            return None
        hosts = [DEFAULT_HOST]
        folder = self.root / "manifests"
        if folder.is_dir():
            hosts += sorted(p.name for p in folder.iterdir() if p.name != DEFAULT_HOST)
        for host in hosts:
            try:
                ref = ModelRef(host, wanted.namespace, wanted.model, wanted.tag)
            except ValueError:
                continue
            found = self.model(ref)
            if found is not None:
                return found
        return None

    def models(self) -> list[CachedModel]:
        """Every model whose manifest and blobs are all cached."""
        folder = self.root / "manifests"
        out = []
        for path in sorted(folder.glob("*/*/*/*")) if folder.is_dir() else []:
            host, namespace, model, tag = path.relative_to(folder).parts
            try:
                ref = ModelRef(host, namespace, model, tag)
            except ValueError:
                continue
            found = self.model(ref)
            if found is not None:
                out.append(found)
        return out
