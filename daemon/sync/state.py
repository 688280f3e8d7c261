"""What outlives one sync run, next to the manifest: the lock and the state of the last run.

* ``<manifest stem>.lock``: held (``flock``, non-blocking) for the whole of a run, so two
  runs never overlap, whether they come from the daemon or from ``olmd sync``. The kernel
  drops the lock when its holder dies, so a crash never leaves a stale lock behind. The
  file itself stays (unlinking a lock file races with the next taker).
* ``<manifest stem>.state.json``: when the last run started and finished, how it ended and
  when one last succeeded. It survives restarts, for the scheduler's catch-up rule and the
  sync metrics. Written atomically; a missing or unreadable one counts as "no run yet".
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from types import TracebackType
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from daemon.atomicfile import write_atomic
from daemon.logs import get_logger

__all__ = [
    "SyncBusy",
    "SyncLock",
    "SyncState",
    "lock_path",
    "read_state",
    "state_path",
    "write_state",
]

log = get_logger("olmd.sync")


class SyncBusy(RuntimeError):
    """Another sync holds the lock (in this process or another one)."""


def lock_path(manifest_path: Path) -> Path:
    return manifest_path.with_name(f"{manifest_path.stem}.lock")


def state_path(manifest_path: Path) -> Path:
    return manifest_path.with_name(f"{manifest_path.stem}.state.json")


class SyncLock:
    """An exclusive, non-blocking lock on a file; a context manager.

    ``flock`` locks belong to the open file, so two ``SyncLock`` objects on one path
    exclude each other even inside one process.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`SyncBusy` saying who holds it."""
        if self._fd is not None:
            raise SyncBusy(f"lock {self.path} is already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SyncBusy(
                f"another sync is running (lock {self.path} held by pid {holder})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # The pid is for people reading the file; the lock itself is the flock.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> SyncLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


Outcome = Literal["running", "ok", "failed", "error"]


class SyncState(BaseModel):
    """The last run, as the state file keeps it. Instants are aware (UTC)."""

    # Unknown keys are ignored: a newer olmd's state file must not stop an older one.
    model_config = ConfigDict(extra="ignore")

    last_started_at: AwareDatetime | None = None
    last_finished_at: AwareDatetime | None = None
    last_outcome: Outcome | None = None
    """running: started and not (yet) finished, or killed; ok: every action succeeded;
    failed: finished with failed or deferred actions; error: the run itself broke."""
    last_error: str | None = None
    last_success_at: AwareDatetime | None = None
    """When the last run that ended ``ok`` finished."""
    last_full_started_at: AwareDatetime | None = None
    """When the last *full* run (every node and model, downloads allowed) that ran to its
    end started: the scheduler's catch-up rule asks whether it lies in this window."""
    fence: int | None = None
    """With the cluster on: the fencing number of the sync lease the last run held."""
    gateway: str | None = None
    """With the cluster on: the gateway that ran the last run."""


def read_state(path: Path) -> SyncState:
    """The saved state; an empty one if there is no file or it cannot be read."""
    try:
        return SyncState.model_validate_json(Path(path).read_bytes())
    except FileNotFoundError:
        return SyncState()
    except (OSError, ValidationError) as exc:
        # The state only steers catch-up and metrics; a bad file must not stop syncing.
        log.warning("sync.state_unreadable", path=str(path), error=str(exc).splitlines()[0])
        return SyncState()


def write_state(path: Path, state: SyncState) -> None:
    write_atomic(Path(path), state.model_dump_json(indent=2).encode() + b"\n")
