"""``olmd sync`` on a terminal: a live block of lines, as ``ollama pull`` draws it.

One line per running pull (bytes, a bar, speed, time left) and one for the whole run,
redrawn in place at the bottom of the terminal. Whatever else is written to stderr while
the block is up (log lines) is printed above it: :func:`live_view` swaps ``sys.stderr``
for a stream that takes the block down, writes the text, and draws the block again, so
no log text ever lands inside it. Lines are cut to the terminal's width: a wrapped line
would throw the redrawing off.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TextIO

from daemon.gateway.views import human_bytes

__all__ = ["LiveView", "PullRates", "live_view", "sync_lines"]


class LiveView:
    """A block of lines at the cursor, redrawn in place on ``screen`` (a terminal)."""

    def __init__(self, screen: TextIO, width: Callable[[], int] | None = None) -> None:
        self.screen = screen
        self._width = width or (lambda: shutil.get_terminal_size().columns - 1)
        self._lines: list[str] = []
        self._drawn = 0  # lines on screen; the cursor is at the start of the line below
        self._lock = threading.RLock()  # stdlib logging may write from another thread

    def _erase(self) -> str:
        return f"\r\x1b[{self._drawn}A\x1b[J" if self._drawn else "\r\x1b[J"

    def _draw(self) -> str:
        self._drawn = len(self._lines)
        return "".join(f"{line}\x1b[K\n" for line in self._lines)

    def show(self, lines: list[str]) -> None:
        width = max(self._width(), 10)
        with self._lock:
            self._lines = [line[:width] for line in lines]
            self.screen.write(self._erase() + self._draw())
            self.screen.flush()

    def above(self, text: str) -> None:
        """Print ``text`` (whole lines) above the block."""
        with self._lock:
            self.screen.write(self._erase() + text + self._draw())
            self.screen.flush()

    def close(self) -> None:
        with self._lock:
            self.screen.write(self._erase())
            self.screen.flush()
            self._lines, self._drawn = [], 0


class _Above(io.TextIOBase):
    """A text stream whose complete lines go above a live view."""

    def __init__(self, view: LiveView, real: TextIO) -> None:
        self._view, self._real = view, real
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in self._pending:
            lines, _, self._pending = self._pending.rpartition("\n")
            self._view.above(lines + "\n")
        return len(text)

    def flush(self) -> None:
        self._real.flush()

    def isatty(self) -> bool:
        return self._real.isatty()

    def fileno(self) -> int:
        return self._real.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._real.encoding

    def finish(self) -> None:
        if self._pending:
            self._view.above(self._pending + "\n")
            self._pending = ""


@contextlib.contextmanager
def live_view(screen: TextIO) -> Iterator[LiveView]:
    """A live view on ``screen`` while the block runs; ``sys.stderr`` writes go above it."""
    view = LiveView(screen)
    saved = sys.stderr
    above = _Above(view, screen)
    sys.stderr = above
    try:
        yield view
    finally:
        sys.stderr = saved
        view.close()
        above.finish()


class PullRates:
    """Bytes per second of each pull, over its last few seconds of progress."""

    def __init__(self, span: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.span, self.clock = span, clock
        self._samples: dict[tuple[str, str], deque[tuple[float, int]]] = {}

    def add(self, key: tuple[str, str], completed: int) -> None:
        now = self.clock()
        samples = self._samples.setdefault(key, deque())
        if samples and completed < samples[-1][1]:
            samples.clear()  # a new attempt started over
        samples.append((now, completed))
        while len(samples) > 2 and samples[0][0] < now - self.span:
            samples.popleft()

    def speed(self, key: tuple[str, str]) -> float | None:
        samples = self._samples.get(key)
        if not samples or len(samples) < 2:
            return None
        (t0, n0), (t1, n1) = samples[0], samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _bar(fraction: float, cells: int, fancy: bool) -> str:
    filled = int(cells * min(max(fraction, 0.0), 1.0))
    if fancy:
        return "▕" + "█" * filled + " " * (cells - filled) + "▏"
    return "[" + "#" * filled + " " * (cells - filled) + "]"


def sync_lines(
    snapshot: Mapping[str, Any], rates: PullRates, elapsed: float, *, fancy: bool = True
) -> list[str]:
    """The live block for a sync's progress snapshot: running pulls, then the run."""
    items = [
        ((node, model), item)
        for node, models in snapshot.get("nodes", {}).items()
        for model, item in models.items()
        if item.get("action") == "pull"
    ]
    running = [(key, item) for key, item in items if item.get("state") in ("pulling", "waiting")]
    label_width = max((len(f"{n} {m}") for (n, m), _ in running), default=0)
    lines, speed_sum, done_bytes, all_bytes = [], 0.0, 0, 0
    for key, item in running:
        label = f"{key[0]} {key[1]}".ljust(label_width)
        if item.get("state") == "waiting":
            error = " ".join(str(item.get("error") or "").split())
            lines.append(f"retry   {label}  after attempt {item.get('attempt', 1)}: {error}")
            continue
        done, total = int(item.get("completed") or 0), int(item.get("total") or 0)
        rates.add(key, done)
        speed = rates.speed(key)
        done_bytes, all_bytes = done_bytes + done, all_bytes + total
        speed_sum += speed or 0.0
        if not total:
            lines.append(f"pulling {label}  {item.get('status') or 'starting'}")
            continue
        left = f"{_duration((total - done) / speed)} left" if speed else ""
        rate = f"{human_bytes(speed)}/s" if speed else ""
        lines.append(
            f"pulling {label}  {done * 100 // total:3d}% {_bar(done / total, 20, fancy)} "
            f"{human_bytes(done)}/{human_bytes(total)}  {rate:>10}  {left}".rstrip()
        )
    states = [item.get("state") for _, item in items]
    parts = [f"sync {snapshot.get('phase', '')}", f"{states.count('done')}/{len(items)} pulls done"]
    if states.count("queued"):
        parts.append(f"{states.count('queued')} waiting for a slot")
    if all_bytes:
        parts.append(f"{human_bytes(done_bytes)}/{human_bytes(all_bytes)}")
    if speed_sum:
        parts.append(f"{human_bytes(speed_sum)}/s")
    parts.append(_duration(elapsed))
    return [*lines, " · ".join(parts)]
