"""Child processes of the benchmark: started pinned, in their own process groups, all
killed on the way out; plus the small helpers that watch them (ports, readiness, RSS)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def pin_prefix(cpu: int | None) -> list[str]:
    """``taskset -c N`` in front of a command: the process and all it forks stay there."""
    if cpu is None or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", str(cpu)]


class Processes:
    """Every process the benchmark starts. ``stop_all`` is safe to call more than once."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        cpu: int | None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        log = (self.logdir / f"{name}.log").open("wb")
        try:
            # A new session: Ctrl-C in the terminal reaches only the benchmark, whose
            # finally clause then stops each group; nothing is left behind.
            proc = subprocess.Popen(
                pin_prefix(cpu) + argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        finally:
            log.close()
        self._running.append((name, proc))
        return proc

    def check(self) -> None:
        """Raise if a child died: its numbers would be meaningless."""
        for name, proc in self._running:
            if proc.poll() is not None:
                tail = self.log_tail(name)
                raise RuntimeError(f"{name} exited with status {proc.returncode}:\n{tail}")

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        # The group may still hold a forked child (nginx's worker) after its leader left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        while self._running:
            _, proc = self._running.pop()
            self.stop(proc)


def wait_http(
    url: str, procs: Processes, *, timeout: float = 20.0, method: str = "GET", data: bytes = b""
) -> bytes:
    """Poll ``url`` until it answers 200, or raise (also when a child died meanwhile)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        procs.check()
        request = urllib.request.Request(url, data=data or None, method=method)
        try:
            with urllib.request.urlopen(request, timeout=2) as answer:
                return bytes(answer.read())
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s: {last}")


def rss_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def cpu_seconds(pgid: int) -> float:
    """User + system CPU of every process in a process group (nginx: master and worker)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # the process just left
        if int(fields[2]) == pgid:  # fields[0] is the state, [2] the process group
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def cpu_pressure_us() -> int | None:
    """Microseconds some runnable task waited for a CPU since boot (PSI), None if unknown."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return int(first.rpartition("total=")[2])


class RssSampler:
    """Samples a process's VmRSS every ``interval`` seconds in a thread; keeps the maximum."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.max_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = rss_mb(self.pid)
            if value is not None:
                self.max_mb = max(self.max_mb, value)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
