"""``olmd status``: a running daemon's fleet and sync, as ``kubectl get nodes`` shows a
cluster. Reads ``GET /admin/nodes`` and ``GET /admin/sync`` with the admin token
(``OLMD_ADMIN_TOKEN``, from the environment or ``.env``); a daemon with no token set
answers them on loopback without one, as it does its status page.

Exit codes as everywhere in olmd: 0 the daemon answered, 1 it did not (or refused the
token), 2 usage or settings error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping
from typing import Any

import aiohttp

from daemon.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    add_config_option,
    daemon_url,
    run_async,
    settings_from,
)
from daemon.gateway import views

__all__ = ["StatusError", "fetch_status", "register", "render"]

_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen: each refresh redraws it whole


class StatusError(Exception):
    """The daemon did not answer, or refused the request; ``str()`` says which."""


def register(subparsers: Any) -> None:
    """Add ``olmd status`` to ``olmd``'s subparsers."""
    parser = subparsers.add_parser(
        "status",
        help="show a running daemon's nodes and model sync",
        description="Ask a running olmd (GET /admin/nodes and /admin/sync, with the admin "
        "token from OLMD_ADMIN_TOKEN, or on loopback while the daemon has none) for each "
        "node's state, weight, slots in use, models "
        "held and loaded, ejections, cooldown left and last error, and the sync's state: "
        "the run in progress, the last run, the schedule and window, the manifest.",
        epilog="Exit status: 0 the daemon answered, 1 it did not or refused the token, 2 usage "
        "or settings error.",
    )
    parser.add_argument("--url", help="the daemon; default http://<server.host>:<server.port>")
    parser.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        metavar="SECONDS",
        help="refresh in place every SECONDS (default 2) until Ctrl-C",
    )
    parser.add_argument(
        "--count", type=int, metavar="N", help="with --watch: stop after N refreshes"
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="per request (default 5)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print {url, nodes, sync} as JSON (one line each)"
    )
    add_config_option(parser)
    parser.set_defaults(func=_cmd_status)


async def fetch_status(http: aiohttp.ClientSession, url: str, token: str | None) -> dict[str, Any]:
    """``{"url", "nodes", "sync"}`` from the daemon at ``url``; ``sync`` is None where
    the daemon runs no sync. Raises :class:`StatusError`."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def get(path: str) -> Any:
        try:
            async with http.get(url.rstrip("/") + path, headers=headers) as response:
                if response.status == 404 and path == "/admin/sync":
                    return None
                body = await response.json(content_type=None)
                if response.status != 200:
                    error = body.get("error") if isinstance(body, dict) else None
                    raise StatusError(f"{path} answered HTTP {response.status}: {error or body}")
                return body
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise StatusError(f"{url}{path}: {str(exc) or type(exc).__name__}") from exc

    # Both at once; when both fail, the nodes' error is the one told (not whichever
    # answer came first).
    answers = await asyncio.gather(get("/admin/nodes"), get("/admin/sync"), return_exceptions=True)
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    return {"url": url, "nodes": answers[0], "sync": answers[1]}


def _indent(lines: list[str], by: str = "  ") -> list[str]:
    return [by + line for line in lines]


def render(status: Mapping[str, Any]) -> str:
    """The status for people: a heading line, the fleet table, the sync."""
    fleet, sync = status["nodes"], status["sync"]
    nodes = fleet.get("nodes") or []
    states = [n.get("state") for n in nodes]
    counted = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states)) or "none"
    lines = [
        f"olmd at {status['url']} · strategy {fleet.get('strategy')} · {len(nodes)} node(s): "
        f"{counted} · {fleet.get('queued', 0)} queued",
    ]
    if fleet.get("panic"):
        lines.append("PANIC ROUTING: too few healthy nodes; requests go to every holder")
    rows = [views.node_cells(n) for n in nodes]
    for row in rows:
        row[-1] = row[-1] if len(row[-1]) <= 60 else row[-1][:59] + "…"
    lines += ["", *views.table(views.NODE_COLUMNS, rows), "", "SYNC"]
    sync_lines = views.sync_lines(sync)
    lines += _indent(sync_lines[:1])
    pulls = views.pulls(sync)
    width = max((len(p["label"]) for p in pulls), default=0)
    lines += _indent([f"{p['label'].ljust(width)}  {p['text']}" for p in pulls], "    ")
    lines += _indent(sync_lines[1:])
    manifest = views.manifest_rows(sync)
    if manifest:
        lines += ["", *_indent(views.table(views.MANIFEST_COLUMNS, manifest))]
    return "\n".join(lines)


async def _watch(url: str, token: str | None, args: argparse.Namespace) -> int:
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    tty = sys.stdout.isatty()
    shown, code = 0, EXIT_OK
    async with aiohttp.ClientSession(timeout=timeout) as http:
        while True:
            try:
                status = await fetch_status(http, url, token)
                text = json.dumps(status) if args.json else render(status)
                code = EXIT_OK
            except StatusError as exc:
                if args.watch is None:
                    print(f"olmd status: {exc}", file=sys.stderr)
                    return EXIT_FAILURE
                text = json.dumps({"url": url, "error": str(exc)}) if args.json else str(exc)
                code = EXIT_FAILURE
            if args.watch is not None and tty and not args.json:
                text = _CLEAR + text
            print(text, flush=True)
            shown += 1
            if args.watch is None or (args.count is not None and shown >= args.count):
                return code
            await asyncio.sleep(args.watch)


def _cmd_status(args: argparse.Namespace) -> int:
    if args.watch is not None and args.watch <= 0:
        print("olmd status: --watch needs a positive number of seconds", file=sys.stderr)
        return EXIT_USAGE
    settings = settings_from(args)  # the token: OLMD_ADMIN_TOKEN, from the environment or .env
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    url = args.url or daemon_url(settings)
    try:
        return run_async(_watch(url, token, args))
    except KeyboardInterrupt:  # the way out of --watch
        return EXIT_OK
