"""``olmd sync`` on a terminal: the real command in a pseudo-terminal, its output replayed
on a small terminal model. The live view shows the running pulls; log lines land above
it, never inside it; the summary's seconds are each pull's own."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import struct
import sys
import termios
from pathlib import Path

from daemon.emulator.server import Emulator, EmulatorConfig
from tests.sync.support import PROJECT_ROOT, make_settings

_CSI = re.compile(r"\x1b\[([0-9;?]*)([@-~])")
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
_LIVE_MARKERS = ("pulls done", "▕", "pulling llama", "pulling qwen")


class Terminal:
    """Enough of a terminal for a live view: printing, CR, LF, cursor up, erase line and
    erase below; colours ignored. Every row is recorded as the cursor leaves it by LF."""

    def __init__(self) -> None:
        self.rows: list[list[str]] = [[]]
        self.y = self.x = 0
        self.finished_rows: list[str] = []

    def _row(self) -> list[str]:
        while len(self.rows) <= self.y:
            self.rows.append([])
        return self.rows[self.y]

    def feed(self, text: str) -> None:
        i = 0
        while i < len(text):
            match = _CSI.match(text, i)
            if match is not None:
                self._csi(match.group(1), match.group(2))
                i = match.end()
                continue
            ch = text[i]
            i += 1
            if ch == "\r":
                self.x = 0
            elif ch == "\n":
                self.finished_rows.append("".join(self._row()).rstrip())
                self.y, self.x = self.y + 1, 0
            elif ch >= " ":
                row = self._row()
                row.extend(" " * (self.x - len(row) + 1))
                row[self.x] = ch
                self.x += 1

    def _csi(self, params: str, final: str) -> None:
        count = int(params) if params.isdigit() else 1
        if final == "A":
            self.y = max(0, self.y - count)
        elif final == "K":
            del self._row()[self.x :]
        elif final == "J":
            del self._row()[self.x :]
            del self.rows[self.y + 1 :]

    def screen(self) -> list[str]:
        return ["".join(row).rstrip() for row in self.rows]


def _read_all(fd: int) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the last writer (the child) closed the terminal
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


async def test_a_sync_on_a_terminal_keeps_logs_out_of_the_live_view(tmp_path: Path) -> None:
    # One pull at a time, each about 0.6 s: the second waits for the first's slot.
    slow = {"pull_size": 600_000, "pull_speed": 1_000_000}
    async with Emulator(EmulatorConfig(name="a", models=[], **slow)) as a:
        settings = make_settings(
            tmp_path,
            [("a", a)],
            models=["llama3.1:8b", "qwen3:0.6b"],
            fallback=[],
            download={"max_parallel_jobs": 1},
        )
        config = tmp_path / "settings.json"
        config.write_text(
            json.dumps(settings.model_dump(mode="json", include={"services", "jobs"}))
        )
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        env = {**os.environ, "COLUMNS": "120", "LINES": "40", "TERM": "xterm"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon", "sync", "--ignore-window", "--config", str(config),
            stdin=slave, stdout=slave, stderr=slave, cwd=PROJECT_ROOT, env=env,
        )  # fmt: skip
        os.close(slave)
        try:
            output = await asyncio.wait_for(asyncio.to_thread(_read_all, master), 30)
            assert await asyncio.wait_for(proc.wait(), 10) == 0, output.decode(errors="replace")
        finally:
            os.close(master)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    terminal = Terminal()
    terminal.feed(output.decode("utf-8", "replace"))
    rows = terminal.finished_rows
    shown = "\n".join(rows)
    # The live view was up: a pull's line with its share and bytes, and the run's line.
    assert any(r.startswith("pulling a ") and "%" in r and " KB/" in r for r in rows), shown
    assert any(r.startswith("sync pulling · ") and "pulls done" in r for r in rows), shown
    logs = [r for r in rows if _TIMESTAMP.search(r)]
    assert any("sync.pull_pulled" in r for r in logs), shown
    for row in rows:
        if _TIMESTAMP.search(row):  # a log line starts its row and holds nothing of the view
            assert _TIMESTAMP.match(row), row
            assert not any(marker in row for marker in _LIVE_MARKERS), row
    # What is left on the screen: log lines, then the summary; the live view is gone.
    screen = [r for r in terminal.screen() if r]
    assert not any(r.startswith(("pulling ", "sync pulling")) for r in screen), screen
    summary = {r.split()[1]: r.split() for r in screen if r.startswith("a ")}
    for model in ("llama3.1:8b", "qwen3:0.6b"):
        row = summary[model]
        assert row[2:5] == ["pull", "pulled", "1"], row
        # The pull's own time, not the other pull's time it waited for a slot on top.
        assert 0.3 < float(row[5]) < 1.1, row
