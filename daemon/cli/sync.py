"""``olmd sync``: run the model sync once, by hand.

Exit codes as everywhere in olmd: 0 every action succeeded, 1 something failed or was
deferred (or another sync holds the lock, or the run was interrupted), 2 usage or settings
error. SIGINT and SIGTERM stop the run as the window's close does: running pulls are
recorded as deferred and the manifest is written, then the exit status is 1 (a second
SIGINT aborts at once). On a terminal it shows a live view while pulling (a line per
running pull, one for the run; log lines above it, see :mod:`daemon.cli.live`) and a
summary table at the end; in a pipe it prints the result as JSON, logs as JSON lines.

With the cluster on it takes the fleet-wide sync lease first, as the daemon's runs do
(another gateway's run, or a Redis that does not answer, exits 1 and says so).
``olmd sync --status`` prints what ``GET /admin/sync`` shows, without a daemon: the
fleet's run from the shared record (cluster on) or this machine's state file and
manifest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from pydantic import ValidationError

from daemon.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    add_config_option,
    run_async,
    settings_from,
)
from daemon.cli.live import LiveView, PullRates, live_view, sync_lines
from daemon.cluster.client import Cluster, from_settings
from daemon.gateway import views
from daemon.settings import Settings
from daemon.sync.engine import SyncEngine
from daemon.sync.plan import SyncProgress, SyncResult, select_targets
from daemon.sync.service import FencedOut, SyncBusy, SyncOptions, offline_status, run_sync

__all__ = ["register", "summary_table"]

_REDRAW_SECONDS = 0.25
_NOTE_WIDTH = 80


def register(subparsers: Any) -> None:
    """Add ``olmd sync`` to ``olmd``'s subparsers."""
    parser = subparsers.add_parser(
        "sync",
        help="pull the configured models onto the nodes and write the manifest",
        description="For every node (or --host) and every model (baseline + fallback, or "
        "--models): pull it through the node's transport, inside the allowed download window, "
        "with retries and at most max_parallel_jobs pulls at once; then write the manifest "
        "(jobs.ollama_sync.manifest_path) atomically. The daemon runs the same sync nightly.",
        epilog="Exit status: 0 every action succeeded, 1 a pull failed or was deferred (or "
        "another sync is running, or SIGINT/SIGTERM stopped the run: running pulls are then "
        "recorded as deferred and the manifest is still written), 2 usage or settings error. "
        "With --dry-run: 0, or 1 when a node could not be reached. With --status: 0, or 1 "
        "when the cluster is on and its Redis does not answer.",
    )
    add = parser.add_argument
    add(
        "--skip-existing",
        action="store_true",
        help="do not pull a model a node already lists; record its digest",
    )
    add(
        "--no-download",
        action="store_true",
        help="pull nothing: record what each node has and write the manifest",
    )
    add(
        "--dry-run",
        action="store_true",
        help="print the plan (node, model, action) and change nothing, manifest included; "
        "exits 1 only if a node could not be reached",
    )
    add("--models", nargs="+", metavar="M", help="these models instead of baseline + fallback")
    add("--host", metavar="H", help="only this node (its name or host)")
    add(
        "--ignore-window",
        action="store_true",
        help="pull even outside the allowed download window (for a person at the console)",
    )
    add(
        "--status",
        action="store_true",
        help="run nothing: show the last run, a run in progress (with the cluster on: on any "
        "gateway), the schedule and the manifest, as GET /admin/sync does; JSON in a pipe",
    )
    add_config_option(parser)
    parser.set_defaults(func=_cmd_sync)


def _cmd_sync(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if args.status:
        return _cmd_status(settings)
    try:
        options = SyncOptions(
            skip_existing=args.skip_existing,
            no_download=args.no_download,
            dry_run=args.dry_run,
            models=tuple(args.models or ()),
            host=args.host,
            ignore_window=args.ignore_window,
        )
        select_targets(settings, options.host)
    except ValidationError as exc:
        print(f"olmd sync: {exc.errors()[0]['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"olmd sync: {exc}", file=sys.stderr)
        return EXIT_USAGE
    show_progress = sys.stderr.isatty() and not options.dry_run
    try:
        result, interrupted = run_async(
            _run(settings, options, sys.stderr if show_progress else None)
        )
    except (SyncBusy, FencedOut) as exc:
        print(f"olmd sync: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if sys.stdout.isatty():
        print(summary_table(result))
    else:
        print(json.dumps(result.to_dict(), indent=2))
    return EXIT_OK if result.ok and not interrupted else EXIT_FAILURE


def _cmd_status(settings: Settings) -> int:
    status = run_async(_status(settings))
    if sys.stdout.isatty():
        lines = views.sync_lines(status)
        cluster = status.get("cluster")
        if cluster is not None:
            holder = cluster.get("holder")
            lines.append(
                f"cluster: gateway {cluster['gateway']}, "
                + ("Redis answers" if cluster.get("connected") else "Redis does not answer")
                + (f", sync lease held by {holder}" if holder else "")
            )
        if status.get("blocked"):
            lines.append(f"blocked: {status['blocked']}")
        print("\n".join(lines))
    else:
        print(json.dumps(status, indent=2))
    return EXIT_FAILURE if status.get("blocked") else EXIT_OK


async def _status(settings: Settings) -> dict[str, Any]:
    cluster = from_settings(settings)
    try:
        return await offline_status(settings, cluster)
    finally:
        if cluster is not None:
            await cluster.stop()


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def _run(
    settings: Settings, options: SyncOptions, screen: TextIO | None
) -> tuple[SyncResult, bool]:
    """The run, and whether a signal stopped it."""
    progress = SyncProgress()
    painter = None
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    interrupted = False

    def unhook() -> None:
        while installed:
            loop.remove_signal_handler(installed.pop())

    def on_signal(engine: SyncEngine, sig: signal.Signals) -> None:
        nonlocal interrupted
        interrupted = True
        unhook()  # a second signal takes its default course (SIGINT: abort at once)
        engine.stop(f"olmd sync got {sig.name}")

    def hook(engine: SyncEngine) -> None:
        for sig in _STOP_SIGNALS:
            try:
                loop.add_signal_handler(sig, on_signal, engine, sig)
            except (ValueError, RuntimeError, NotImplementedError):
                return  # not the main thread (tests), or no signals here: defaults stay
            installed.append(sig)

    with contextlib.ExitStack() as stack:
        if screen is not None:
            view = stack.enter_context(live_view(screen))
            painter = asyncio.create_task(_paint(progress, view))
        cluster: Cluster | None = None if options.dry_run else from_settings(settings)
        try:
            result = await run_sync(
                settings, options, progress=progress, on_engine=hook, cluster=cluster
            )
            return result, interrupted
        finally:
            if cluster is not None:
                await cluster.stop()
            unhook()
            if painter is not None:
                painter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await painter


async def _paint(progress: SyncProgress, view: LiveView) -> None:
    rates, started = PullRates(), time.monotonic()
    fancy = "utf" in (view.screen.encoding or "").lower()
    while True:
        view.show(sync_lines(progress.snapshot(), rates, time.monotonic() - started, fancy=fancy))
        await asyncio.sleep(_REDRAW_SECONDS)


def summary_table(result: SyncResult) -> str:
    """The run as a table for people, with a closing line on what was written."""
    if result.options.dry_run:
        plan = [(p.node, p.model, p.kind, p.reason) for p in result.plan]
        lines = _table(("NODE", "MODEL", "ACTION", "REASON"), plan)
        return "\n".join([*lines, "", _planned(result), "dry run: nothing was pulled or written"])
    digests = {
        (node.name, entry.name): entry.digest
        for node in (result.manifest.nodes if result.manifest else [])
        for entry in node.models
    }
    rows = [
        (
            o.node,
            o.model,
            o.action,
            o.status or "failed",
            str(o.attempts),
            f"{o.seconds:.1f}",
            (digests.get((o.node, o.model)) or "-")[:19],
            _clip(o.error or ""),
        )
        for o in result.outcomes
    ]
    header = ("NODE", "MODEL", "ACTION", "STATUS", "TRIES", "SECONDS", "DIGEST", "NOTE")
    lines = _table(header, rows)
    counts = ", ".join(f"{n} {status}" for status, n in sorted(result.counts().items()))
    lines += ["", f"{'ok' if result.ok else 'NOT ok'}: {counts or 'nothing to do'}"]
    if result.stopped:
        lines.append(f"stopped early: {result.stopped}")
    if result.manifest is not None:
        drift = len(result.manifest.drift)
        lines.append(f"manifest: {result.manifest_path} ({drift} model(s) with digest drift)")
    return "\n".join(lines)


def _table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    rows = [header, *body]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _NOTE_WIDTH else text[: _NOTE_WIDTH - 1] + "…"


def _planned(result: SyncResult) -> str:
    kinds = [p.kind for p in result.plan]
    words = {
        "missing": ("pull of a missing model", "pulls of missing models"),
        "refresh": ("refresh of a model present", "refreshes of models present"),
        "skip": ("skip", "skips"),
        "check": ("check", "checks"),
        "unreachable": ("unreachable", "unreachable"),
    }
    parts = [
        f"{n} {one if n == 1 else many}"
        for kind, (one, many) in words.items()
        if (n := kinds.count(kind))
    ]
    return f"planned: {', '.join(parts) or 'nothing'}"
