"""Helpers the sync tests share: a fake wall clock, settings for emulated nodes, lookups."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from daemon.emulator.server import Emulator
from daemon.settings import Settings
from daemon.sync.manifest import Manifest, ModelEntry, NodeEntry, read_manifest

UTC8 = timezone(timedelta(hours=8))
# 03:00 in the default window "02:00-06:00 UTC+8".
IN_WINDOW = datetime(2024, 3, 10, 3, 0, tzinfo=UTC8)
MODELS = ["llama3.1:8b", "qwen3:8b"]
FALLBACK = ["mistral-nemo:12b"]
SMALL_PULL = {"pull_size": 20_000, "pull_speed": 0.0}
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class FakeNow:
    """A wall clock that starts at ``start`` and advances with real (monotonic) time."""

    def __init__(self, start: datetime) -> None:
        self.start = start
        self._t0 = time.monotonic()

    def __call__(self) -> datetime:
        return self.start + timedelta(seconds=time.monotonic() - self._t0)


def make_settings(
    tmp_path: Path,
    nodes: list[tuple[str, Emulator]],
    *,
    download: dict[str, Any] | None = None,
    job: dict[str, Any] | None = None,
    models: list[str] | None = None,
    fallback: list[str] | None = None,
) -> Settings:
    return Settings(
        services={
            "ollama": {
                "health_timeout": 2.0,
                "baseline_models": MODELS if models is None else models,
                "fallback_models": FALLBACK if fallback is None else fallback,
                "nodes": [
                    {"name": name, "host": "127.0.0.1", "port": emu.port} for name, emu in nodes
                ],
                "download": {
                    "allowed_window": "02:00-06:00 UTC+8",
                    "max_parallel_jobs": 2,
                    "stall_timeout": 5.0,
                    "retry": {"max_attempts": 3, "backoff_seconds": 0.01},
                    **(download or {}),
                },
            }
        },
        jobs={
            "ollama_sync": {"manifest_path": str(tmp_path / "m" / "manifest.json"), **(job or {})}
        },
    )


def manifest_of(settings: Settings) -> Manifest:
    manifest = read_manifest(settings.jobs.ollama_sync.manifest_path)
    assert manifest is not None
    return manifest


def node_in(manifest: Manifest | None, name: str) -> NodeEntry:
    assert manifest is not None
    node = manifest.node(name)
    assert node is not None
    return node


def entry_in(manifest: Manifest | None, node: str, model: str) -> ModelEntry:
    entry = node_in(manifest, node).model(model)
    assert entry is not None
    return entry


def pulls(emu: Emulator) -> int:
    return emu.state.stats.requests.get("/api/pull", 0)


def by_key(result: Any) -> dict[tuple[str, str], Any]:
    return {(o.node, o.model): o for o in result.outcomes}
