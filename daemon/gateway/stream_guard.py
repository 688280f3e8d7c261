"""The one timer a streamed answer needs: the node going quiet, or the client stuck."""

from __future__ import annotations

import asyncio


class StreamGuard:
    """Expires ``deadline`` when the node sent nothing for ``idle`` seconds, or when one
    write to the client has waited ``write_timeout`` seconds (then ``stuck`` is set).

    The stream loop only stores timestamps per chunk; one timer re-arms itself, so there
    is no timer churn per chunk.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        deadline: asyncio.Timeout,
        idle: float,
        write_timeout: float,
    ) -> None:
        self.loop = loop
        self.deadline = deadline
        self.idle_seconds = idle
        self.write_timeout = write_timeout
        self.last = loop.time()  # when the node's last chunk was written out
        self.writing: float | None = None  # since when a write waits on the client
        self.stuck = False
        self.idle = False  # the node sent nothing for ``idle`` seconds
        self._handle = loop.call_at(self.last + min(idle, write_timeout), self._check)

    def _check(self) -> None:
        now = self.loop.time()
        if self.writing is not None:
            if now - self.writing >= self.write_timeout:
                self.stuck = True
                self.deadline.reschedule(now)
                return
            due = self.writing + self.write_timeout
        else:
            if now - self.last >= self.idle_seconds:
                self.idle = True
                self.deadline.reschedule(now)
                return
            due = self.last + self.idle_seconds
        # Look again when the nearer of the two limits could first be reached.
        self._handle = self.loop.call_at(
            min(due, now + min(self.idle_seconds, self.write_timeout)), self._check
        )

    def cancel(self) -> None:
        self._handle.cancel()
