"""Running the daemon: listen, notify systemd, reload on SIGHUP, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from daemon.cluster.client import cluster_component
from daemon.distribution.component import distribution_component
from daemon.gateway.app import create_app
from daemon.gateway.component import gateway_component
from daemon.gateway.tenants import tenancy_component
from daemon.logs import get_logger
from daemon.metrics import Metrics
from daemon.runtime import RUNTIME, Phase, Runtime
from daemon.settings import Settings, SettingsError
from daemon.sync.service import sync_component
from daemon.systemd import Notifier, watchdog_interval

log = get_logger("olmd.service")

Loader = Callable[[], Settings]
OnReady = Callable[[Runtime, int], Awaitable[None] | None]


async def _watchdog(runtime: Runtime, notifier: Notifier, interval: float) -> None:
    # Pinging from the loop proves the loop runs; the liveness checks prove the
    # background components (prober, scheduler) still run too.
    while True:
        if runtime.alive():
            notifier.watchdog()
        else:
            log.error("watchdog_withheld", reason="a background component stopped")
        await asyncio.sleep(interval)


async def reload(runtime: Runtime, loader: Loader, notifier: Notifier, lock: asyncio.Lock) -> bool:
    """Re-read settings; on any error keep the running ones. True when applied."""
    async with lock:  # two SIGHUPs in a row apply one after the other
        notifier.reloading()
        try:
            try:
                new = loader()
            except SettingsError as exc:
                runtime.metrics.reloads.set(0)
                log.error("reload_refused", source=exc.source, problems=exc.problems)
                return False
            if new.server != runtime.server:
                log.warning(
                    "reload_server_unchanged",
                    reason="[server] settings (listen address, drain timeout, body limit) "
                    "take effect at the next restart",
                )
            failed = await runtime.apply(new)
            runtime.metrics.reloads.set(0 if failed else 1)
            if failed:
                log.error("reload_failed", components=failed, kept="the running settings")
                return False
            log.info("reloaded", nodes=len(new.nodes()), strategy=new.routing.strategy)
            return True
        finally:
            notifier.ready()


async def _start(runner: web.AppRunner, stop: asyncio.Event) -> None:
    """Start every component in order, unless a stop signal comes first."""
    setup = asyncio.ensure_future(runner.setup())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({setup, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not setup.done():
        setup.cancel()  # the components that started are stopped by runner.cleanup()
        with contextlib.suppress(asyncio.CancelledError):
            await setup
        return
    setup.result()


def _announce(settings: Settings, port: int) -> None:
    server = settings.server
    log.info("listening", host=server.host, port=port, nodes=len(settings.nodes()))
    if settings.api_keys or server.keys_file is not None or server.tenant_header:
        return
    if server.host in ("127.0.0.1", "::1", "localhost"):
        log.info("no_api_keys", host=server.host, note="LLM routes are open to this machine only")
    else:
        log.warning("no_api_keys", host=server.host, note="LLM routes are open to anyone")


def build_app(settings: Settings, *, metrics: Metrics | None = None) -> web.Application:
    """The daemon as it runs: the cluster's Redis client (when on), the distributor (the
    blob cache), the gateway, tenancy, then the sync service (its scheduler inside)."""
    components = (
        cluster_component,
        distribution_component,
        gateway_component,
        tenancy_component,
        sync_component,
    )
    return create_app(settings, metrics=metrics, components=components)


async def serve(
    settings: Settings,
    *,
    loader: Loader | None = None,
    app: web.Application | None = None,
    on_ready: OnReady | None = None,
    notifier: Notifier | None = None,
) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit code."""
    notifier = notifier or Notifier()
    app = app if app is not None else build_app(settings)
    runtime = app[RUNTIME]
    server = settings.server
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=server.drain_timeout,
        # A client that leaves cancels its handler, and so the node's request, even
        # while nothing is being written (a cold model load).
        handler_cancellation=True,
    )
    stop = asyncio.Event()
    tasks: set[asyncio.Task[object]] = set()
    reload_lock = asyncio.Lock()
    loop = asyncio.get_running_loop()

    def spawn(coro: Awaitable[object]) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    # Before start-up, which may take up to health_timeout: a SIGTERM then still stops
    # cleanly instead of killing the process.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # A reload during start-up would otherwise kill the process (SIGHUP's default).
    loop.add_signal_handler(signal.SIGHUP, lambda: log.warning("reload_ignored_while_starting"))
    try:
        await _start(runner, stop)
        if not stop.is_set():
            site = web.TCPSite(runner, server.host, server.port, reuse_address=True)
            await site.start()
            port = _bound_port(runner) or server.port
            if loader is not None:
                loop.add_signal_handler(
                    signal.SIGHUP, lambda: spawn(reload(runtime, loader, notifier, reload_lock))
                )
            else:  # nothing to reload from (the demo): SIGHUP's default again
                loop.remove_signal_handler(signal.SIGHUP)
            runtime.set_phase(Phase.READY)
            _announce(settings, port)
            notifier.ready(status=f"listening on {server.host}:{port}")
            interval = watchdog_interval()
            if interval and notifier.enabled:
                spawn(_watchdog(runtime, notifier, interval))
            if on_ready is not None:
                result = on_ready(runtime, port)
                if result is not None:
                    await result
            await stop.wait()
    finally:
        # Signals during the drain are noted, not fatal: systemd escalates with SIGKILL
        # after TimeoutStopSec if the drain overruns.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: log.info("already_draining"))
        loop.remove_signal_handler(signal.SIGHUP)
        notifier.stopping()
        runtime.set_phase(Phase.DRAINING)
        log.info("draining", in_flight=runtime.in_flight, timeout=server.drain_timeout)
        for task in list(tasks):
            task.cancel()
        for task in list(tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Closes the listener, waits up to drain_timeout for handlers, cancels the rest,
        # then stops the components in reverse order.
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if runtime.cancelled_on_drain:
            log.warning("drain_cancelled", requests=runtime.cancelled_on_drain)
        log.info("stopped")
    return 0


def _bound_port(runner: web.AppRunner) -> int | None:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return None
