"""What ``GET /admin/sync`` says besides the run itself: the schedule and the window, and
a summary of the last manifest. JSON-ready dicts; no secrets (node addresses are left out).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.settings import Settings
from daemon.sync.manifest import Manifest, ManifestError, read_manifest

__all__ = ["ManifestSummary", "NextRun", "schedule_status", "summarise"]

NextRun = Callable[[], datetime | None]


def _iso(at: datetime | None) -> str | None:
    return at.isoformat(timespec="seconds") if at is not None else None


def schedule_status(settings: Settings, now: datetime, next_run: NextRun | None) -> dict[str, Any]:
    """The nightly job and the download window as of ``now`` (aware)."""
    job = settings.jobs.ollama_sync
    window = settings.services.ollama.download.allowed_window
    closes = window.current_close(now)
    return {
        "enabled": job.enabled,
        "cron": job.schedule_cron,
        "window": str(window),
        "window_open": closes is not None,
        "window_closes": _iso(closes.astimezone(window.tz) if closes else None),
        "next_window_opens": _iso(window.next_open(now).astimezone(window.tz)),
        "next_run": _iso(next_run()) if next_run is not None and job.enabled else None,
    }


def summarise(manifest: Manifest) -> dict[str, Any]:
    """Per node: whether it answered, and how many models ended in each status."""
    return {
        "generated_at": _iso(manifest.generated_at),
        "window": manifest.window,
        "options": manifest.options,
        "nodes": [
            {
                "name": node.name,
                "reachable": node.reachable,
                "stale": node.stale,
                "last_confirmed": _iso(node.last_confirmed),
                "ollama_version": node.ollama_version,
                "models": len(node.models),
                "statuses": dict(sorted(Counter(m.status for m in node.models).items())),
                "failed": [m.name for m in node.models if m.status in ("failed", "deferred")],
            }
            for node in manifest.nodes
        ],
        "drift": [d.model for d in manifest.drift],
    }


class ManifestSummary:
    """The last manifest's summary, read again only when the file changes (the status
    page asks every few seconds)."""

    def __init__(self) -> None:
        self._key: tuple[Path, int, int] | None = None
        self._value: dict[str, Any] | None = None

    def read(self, path: Path) -> dict[str, Any] | None:
        """None while there is no manifest; ``{"path", "error"}`` for one that cannot be
        read."""
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return {"path": str(path), "error": exc.strerror or str(exc)}
        key = (path, stat.st_mtime_ns, stat.st_size)
        if key != self._key:
            try:
                manifest = read_manifest(path)
                value = None if manifest is None else {"path": str(path), **summarise(manifest)}
            except (ManifestError, OSError) as exc:
                value = {"path": str(path), "error": str(exc).splitlines()[0]}
            self._key, self._value = key, value
        return self._value
