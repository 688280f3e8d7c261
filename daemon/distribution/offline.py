"""Offline fleets: fill the cache from an Ollama models directory, or write one from it.

An Ollama models directory (``~/.ollama/models``) holds ``manifests/<host>/<ns>/<name>/
<tag>`` and ``blobs/sha256-<hex>``: the cache's own layout. :func:`import_models` checks
every blob against its digest before it enters the cache (a bad one is named and its
model skipped); :func:`export_models` copies cached models out, so a site without
internet can be seeded from a disk. Blocking file work: for the CLI, or a thread.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from daemon.distribution.cache import BlobCache, blob_digests
from daemon.domain import ModelRef

__all__ = ["Report", "export_models", "import_models"]

_CHUNK = 1024 * 1024


@dataclass
class Report:
    """What an import or export did: models done (name, digest), models refused (why)."""

    done: list[tuple[str, str]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _copy_checked(source: Path, digest: str, size: int, target_dir: Path) -> str | None:
    """Copy ``source`` to ``target_dir`` while hashing it; why not, or None when it matched."""
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / "blob"
    hasher = hashlib.sha256()
    try:
        with source.open("rb") as src, target.open("wb") as out:
            while chunk := src.read(_CHUNK):
                hasher.update(chunk)
                out.write(chunk)
    except OSError as exc:
        return f"blob {digest}: cannot read {source}: {exc.strerror}"
    got = "sha256:" + hasher.hexdigest()
    if got != digest or target.stat().st_size != size:
        target.unlink()
        return f"blob {digest} in {source} does not match its digest (got {got}); not imported"
    return None


def import_models(cache: BlobCache, folder: Path) -> Report:
    """Every model in the Ollama models directory ``folder`` whose blobs all check out."""
    report = Report()
    manifests = folder / "manifests"
    if not manifests.is_dir():
        report.failed[str(folder)] = f"no manifests folder in {folder}"
        return report
    for path in sorted(p for p in manifests.glob("*/*/*/*") if p.is_file()):
        host, namespace, model, tag = path.relative_to(manifests).parts
        try:
            ref = ModelRef.parse(f"{host}/{namespace}/{model}:{tag}")
            raw = path.read_bytes()
            blobs = blob_digests(raw)
        except (ValueError, OSError) as exc:
            report.failed[str(path)] = str(exc)
            continue
        why = None
        for digest, size in blobs:
            if cache.has_blob(digest, size):
                continue
            staging = cache.partial_dir(digest)
            source = folder / "blobs" / digest.replace(":", "-")
            why = _copy_checked(source, digest, size, staging)
            if why is not None:
                shutil.rmtree(staging, ignore_errors=True)
                break
            cache.commit(digest, staging / "blob")
            staging.rmdir()
        if why is not None:
            report.failed[ref.name] = why
            continue
        cache.write_manifest(ref, raw)
        report.done.append((ref.name, "sha256:" + hashlib.sha256(raw).hexdigest()))
    return report


def export_models(cache: BlobCache, names: list[str], folder: Path) -> Report:
    """The cached models ``names`` written as an Ollama models directory at ``folder``."""
    report = Report()
    for name in names:
        try:
            ref = ModelRef.parse(name)
        except ValueError as exc:
            report.failed[name] = str(exc)
            continue
        found = cache.model(ref)
        if found is None:
            report.failed[ref.name] = f"{ref.name} is not in olmd's cache ({cache.root})"
            continue
        blobs = folder / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        for digest, size in found.blobs:
            target = blobs / digest.replace(":", "-")
            if not (target.is_file() and target.stat().st_size == size):
                shutil.copyfile(cache.blob_path(digest), target)
        manifest = folder.joinpath("manifests", ref.host, ref.namespace, ref.model, ref.tag)
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_bytes(found.raw)
        report.done.append((ref.name, found.digest))
    return report
