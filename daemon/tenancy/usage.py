"""Usage per tenant, model and day, and the record that keeps it across restarts.

Counted per request when it ends: requests by status, prompt tokens, prompt tokens olmd
expected the node to have cached, completion tokens, GPU seconds (the answer's
``total_duration``), seconds waited in olmd's queue, and 429s. Days are UTC dates. The
record (JSON, written atomically) also keeps each budget's tokens in its current period.
With a cluster the same numbers go to Redis too (see :mod:`daemon.cluster.usage`); the
book also collects what is not yet sent there.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from daemon.atomicfile import write_atomic

__all__ = ["FIELDS", "UsageBook", "day_of"]

FIELDS = (
    "requests",
    "errors",
    "rate_limited",
    "prompt_tokens",
    "cached_prompt_tokens",
    "completion_tokens",
    "gpu_seconds",
    "queue_wait_seconds",
)
_STATUS = "status_"  # per status counts: status_200, status_429, ...
Counts = dict[str, float]


def day_of(wall: float) -> str:
    return dt.datetime.fromtimestamp(wall, dt.UTC).date().isoformat()


class UsageBook:
    def __init__(self) -> None:
        # day → tenant → model → field → value
        self.days: dict[str, dict[str, dict[str, Counts]]] = {}
        self.budgets: dict[str, tuple[float, int]] = {}  # tenant → (period start, tokens)
        self.pending: dict[tuple[str, str, str, str], float] = {}  # not yet in Redis
        self.collect = False  # whether to collect ``pending`` (a cluster takes it)
        self.dirty = False

    def add(self, wall: float, tenant: str, model: str, counts: Mapping[str, float]) -> None:
        day = day_of(wall)
        row = self.days.setdefault(day, {}).setdefault(tenant, {}).setdefault(model, {})
        for name, value in counts.items():
            if value:
                row[name] = row.get(name, 0) + value
                if self.collect:
                    key = (day, tenant, model, name)
                    self.pending[key] = self.pending.get(key, 0) + value
        self.dirty = True

    @staticmethod
    def counts(status: int, **values: float) -> Counts:
        """One request's counts: ``requests``, its status, ``errors`` or ``rate_limited``."""
        out: Counts = {"requests": 1, f"{_STATUS}{status}": 1, **values}
        if status == 429:
            out["rate_limited"] = 1
        elif status >= 400:
            out["errors"] = 1
        return out

    def take_pending(self) -> dict[tuple[str, str, str, str], float]:
        pending, self.pending = self.pending, {}
        return pending

    def restore_pending(self, pending: Mapping[tuple[str, str, str, str], float]) -> None:
        """Counts a cluster could not take: sent again with the next ones."""
        for key, value in pending.items():
            self.pending[key] = self.pending.get(key, 0) + value

    def summary(
        self,
        since: str,
        tenant: str | None = None,
        days: Mapping[str, Mapping[str, Mapping[str, Counts]]] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """tenant → {"totals": counts, "models": model → counts} from ``since`` (a date)."""
        out: dict[str, dict[str, Any]] = {}
        for day, tenants in sorted((days if days is not None else self.days).items()):
            if day < since:
                continue
            for name, models in tenants.items():
                if tenant is not None and name != tenant:
                    continue
                entry = out.setdefault(name, {"totals": _zero(), "models": {}})
                for model, counts in models.items():
                    row = entry["models"].setdefault(model, _zero())
                    for key, value in counts.items():
                        row[key] = row.get(key, 0) + value
                        entry["totals"][key] = entry["totals"].get(key, 0) + value
        for entry in out.values():
            for counts in (entry["totals"], *entry["models"].values()):
                _tidy(counts)
        return out

    def prune(self, today: str, keep_days: int) -> None:
        oldest = (dt.date.fromisoformat(today) - dt.timedelta(days=keep_days)).isoformat()
        for day in [d for d in self.days if d < oldest]:
            del self.days[day]
            self.dirty = True

    def to_json(self) -> bytes:
        body = {
            "schema_version": 1,
            "days": self.days,
            "budgets": {t: {"period_start": s, "used": u} for t, (s, u) in self.budgets.items()},
        }
        return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()

    def save(self, path: Path) -> None:
        write_atomic(path, self.to_json())
        self.dirty = False

    @classmethod
    def load(cls, path: Path) -> UsageBook:
        """The record at ``path``; an empty book if there is none. A record that cannot be
        read raises ValueError naming the file: olmd must not start over a lost budget."""
        book = cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return book
        except (OSError, ValueError) as exc:
            raise ValueError(f"usage record {path}: cannot be read ({exc})") from None
        if not isinstance(data, dict) or data.get("schema_version") != 1:
            raise ValueError(f"usage record {path}: not a usage record of this olmd")
        book.days = data.get("days", {})
        for tenant, entry in data.get("budgets", {}).items():
            book.budgets[tenant] = (float(entry["period_start"]), int(entry["used"]))
        return book


def _zero() -> Counts:
    return dict.fromkeys(FIELDS, 0)


def _tidy(counts: Counts) -> None:
    """Whole numbers as ints, seconds rounded; per status counts under ``by_status``."""
    by_status = {k[len(_STATUS) :]: int(v) for k, v in counts.items() if k.startswith(_STATUS)}
    for key in [k for k in counts if k.startswith(_STATUS)]:
        del counts[key]
    for key, value in counts.items():
        counts[key] = round(value, 3) if key.endswith("seconds") else int(value)
    counts["by_status"] = dict(sorted(by_status.items()))  # type: ignore[assignment]


def merge_days(
    rows: Iterable[tuple[str, str, str, str, float]],
) -> dict[str, dict[str, dict[str, Counts]]]:
    """(day, tenant, model, field, value) rows, as the book keeps them."""
    days: dict[str, dict[str, dict[str, Counts]]] = {}
    for day, tenant, model, name, value in rows:
        row = days.setdefault(day, {}).setdefault(tenant, {}).setdefault(model, {})
        row[name] = row.get(name, 0) + value
    return days
