"""The stall watchdog: runs one pull and cancels it when its progress stands still."""

from __future__ import annotations

import asyncio

from daemon.logs import get_logger
from daemon.ports import PullError, PullProgress, PullTarget, PullTransport

__all__ = ["VERIFY_STALL_FACTOR", "settle", "watch_pull"]

log = get_logger("olmd.sync")

# Ollama hashes the whole blob after the download, printing nothing new meanwhile: that
# phase gets this many stall timeouts before it counts as stalled.
VERIFY_STALL_FACTOR = 3.0


async def watch_pull(
    transport: PullTransport,
    target: PullTarget,
    model: str,
    report: PullProgress,
    *,
    stall_timeout: float,
) -> PullError | None:
    """One attempt at pulling ``model``: the failure as a PullError, None on success.

    The pull is cancelled once it shows no activity for ``stall_timeout`` seconds
    (:data:`VERIFY_STALL_FACTOR` times that while the node verifies the digest). Every
    progress report is passed on to ``report``. Cancelling the caller cancels the pull.
    """
    loop = asyncio.get_running_loop()
    last_activity = loop.time()
    seen: tuple[str, int, int] | None = None
    verifying = False

    def on_progress(status: str, completed: int, total: int) -> None:
        # Any change counts as activity: Ollama repeats identical lines while a
        # download stands still, and SSH status text carries the CLI's whole progress
        # line (percent, speed, time left), which moves even when rounded bytes do not.
        nonlocal last_activity, seen, verifying
        if (status, completed, total) != seen:
            seen, last_activity = (status, completed, total), loop.time()
        verifying = status.strip().lower().startswith("verifying")
        report(status, completed, total)

    task = asyncio.create_task(transport.pull(target, model, on_progress))
    try:
        while not task.done():
            quiet = loop.time() - last_activity
            limit = stall_timeout * VERIFY_STALL_FACTOR if verifying else stall_timeout
            if quiet >= limit:
                await settle(task)
                phase = " while verifying the digest" if verifying else ""
                return PullError(
                    f"{target.name}: no progress for {limit:g} s{phase}; pull cancelled",
                )
            await asyncio.wait({task}, timeout=limit - quiet)
        task.result()
    except PullError as exc:
        return exc
    except Exception as exc:  # names were validated by the caller: anything else may pass
        log.exception("sync.transport_error", node=target.name, model=model)
        return PullError(f"{target.name}: {type(exc).__name__}: {exc}")
    finally:
        if not task.done():  # we were cancelled: take the pull down with us
            await settle(task)
    return None


async def settle(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it; whatever it raised on the way out is dropped."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not report it as never retrieved
