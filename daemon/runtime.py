"""What the running daemon knows about itself: settings, metrics, phase, load, hooks.

One ``Runtime`` per application, at ``app[RUNTIME]``. Components register what they need
on it: a reload hook for SIGHUP, a liveness check for the systemd watchdog.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from daemon.logs import get_logger
from daemon.metrics import Metrics
from daemon.settings import Settings

ReloadHook = Callable[[Settings], Awaitable[None]]
LivenessCheck = Callable[[], bool]

log = get_logger("olmd.runtime")


class Phase(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"


@dataclass(eq=False)
class Runtime:
    """What the running daemon knows about itself; one per application."""

    settings: Settings
    metrics: Metrics
    phase: Phase = Phase.STARTING
    in_flight: int = 0
    cancelled_on_drain: int = 0
    on_reload: list[ReloadHook] = field(default_factory=list)
    liveness: list[LivenessCheck] = field(default_factory=list)

    def __post_init__(self) -> None:
        # [server] is read once: listen address, drain timeout and body limit stay as
        # started until a restart, whatever a reload says.
        self.server = self.settings.server
        self._credentials(self.settings)

    def _credentials(self, settings: Settings) -> None:
        # Prepared once per settings load, not per request.
        self.api_keys = tuple(key.encode() for _, key in settings.tenant_keys())
        token = settings.admin_token
        self.admin_token = token.get_secret_value().encode() if token is not None else None

    def set_phase(self, phase: Phase) -> None:
        self.phase = phase
        self.metrics.ready.set(1 if phase is Phase.READY else 0)

    def alive(self) -> bool:
        """True while every background component that registered a check is running."""
        return all(check() for check in self.liveness)

    async def apply(self, settings: Settings) -> list[str]:
        """Swap in validated settings, in every component or in none.

        Each component adopts them without dropping requests. If one fails, the ones that
        had adopted them go back to the running settings, and the failed ones are logged
        and named in the returned list: the daemon goes on as it was.
        """
        old = self.settings
        done: list[ReloadHook] = []
        failed: list[str] = []
        for hook in self.on_reload:
            try:
                await hook(settings)
            except Exception:
                log.exception("reload_hook_failed", hook=_name(hook))
                failed.append(_name(hook))
                done.append(hook)  # it may have taken part of them: back to the old too
                break
            done.append(hook)
        if not failed:
            self.settings = settings
            self._credentials(settings)
            return []
        for hook in reversed(done):
            try:
                await hook(old)
            except Exception:  # it took these settings before; say so if it now cannot
                log.exception("reload_rollback_failed", hook=_name(hook))
                if _name(hook) not in failed:
                    failed.append(_name(hook))
        return failed


def _name(hook: ReloadHook) -> str:
    return getattr(hook, "__qualname__", repr(hook))


RUNTIME = web.AppKey("runtime", Runtime)
