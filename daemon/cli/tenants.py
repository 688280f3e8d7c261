"""``olmd keys`` (API keys per tenant, in the keys file) and ``olmd usage`` (what each
tenant used, from a running daemon's ``GET /admin/usage``).

``olmd keys add --tenant NAME`` prints the new key once; the file keeps only its hash.
A running daemon takes the file's changes on ``systemctl reload olmd`` (SIGHUP).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import aiohttp

from daemon.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    add_config_option,
    daemon_url,
    run_async,
)
from daemon.gateway import views
from daemon.settings import load_settings
from daemon.tenancy.keys import KeysFileError, add_key, read_keys, revoke_keys

__all__ = ["register", "render_usage"]


def register(subparsers: Any) -> None:
    keys = subparsers.add_parser(
        "keys",
        help="add, list or revoke tenants' API keys (the keys file)",
        description="Manage the API keys in [server] keys_file: each key belongs to a tenant, "
        "and the file keeps only its SHA-256. `add` prints the new key once. Reload the "
        "daemon (systemctl reload olmd) to apply.",
    )
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    add = sub.add_parser("add", help="make a new key for a tenant; prints it once")
    add.add_argument("--tenant", required=True, help="the tenant (a [[tenants]] name or default)")
    listing = sub.add_parser("list", help="the keys' ids, tenants and dates (never the keys)")
    listing.add_argument("--tenant", help="only this tenant's")
    listing.add_argument("--json", action="store_true")
    revoke = sub.add_parser("revoke", help="remove a tenant's keys (or one, by --id)")
    revoke.add_argument("--tenant", required=True)
    revoke.add_argument("--id", dest="key_id", help="the key's id, as `list` shows it")
    for parser in (add, listing, revoke):
        add_config_option(parser)
    keys.set_defaults(func=_cmd_keys)

    usage = subparsers.add_parser(
        "usage",
        help="what each tenant used, from a running daemon",
        description="Ask a running olmd (GET /admin/usage) for each tenant's requests, tokens, "
        "GPU seconds, queue wait and 429s, with its limits and budget.",
        epilog="Exit status: 0 the daemon answered, 1 it did not, 2 usage or settings error.",
    )
    usage.add_argument("--since", default="1d", help="7d (the last 7 days) or a date (1d)")
    usage.add_argument("--tenant", help="only this tenant")
    usage.add_argument("--url", help="the daemon; default http://<server.host>:<server.port>")
    usage.add_argument("--json", action="store_true", help="the daemon's answer as JSON")
    add_config_option(usage)
    usage.set_defaults(func=_cmd_usage)


def _cmd_keys(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, keys_file_needed=False)
    path = settings.server.keys_file
    if path is None:
        print("olmd keys: set [server] keys_file in the settings first", file=sys.stderr)
        return EXIT_USAGE
    known = {t.name for t in settings.tenants} | {"default"}
    try:
        if args.keys_command == "add":
            if args.tenant not in known:
                print(
                    f"olmd keys: no tenant {args.tenant!r}; known: {sorted(known)}",
                    file=sys.stderr,
                )
                return EXIT_USAGE
            key, entry = add_key(path, args.tenant)
            print(key)
            print(
                f"key {entry.id} for tenant {entry.tenant} added to {path}; it is shown only "
                "now. Apply with: systemctl reload olmd",
                file=sys.stderr,
            )
        elif args.keys_command == "list":
            entries = read_keys(path) if path.exists() else []
            entries = [e for e in entries if args.tenant in (None, e.tenant)]
            if args.json:
                rows = [{"id": e.id, "tenant": e.tenant, "created": e.created} for e in entries]
                print(json.dumps(rows))
            else:
                cells = [[e.id, e.tenant, e.created] for e in entries]
                print("\n".join(views.table(("ID", "TENANT", "CREATED"), cells)))
        else:
            gone = revoke_keys(path, args.tenant, args.key_id)
            if not gone:
                print("olmd keys: no such key", file=sys.stderr)
                return EXIT_FAILURE
            ids = ", ".join(e.id for e in gone)
            print(f"revoked {ids}; apply with: systemctl reload olmd", file=sys.stderr)
    except KeysFileError as exc:
        print(f"olmd keys: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else "-"


USAGE_COLUMNS = (
    "TENANT",
    "PRIORITY",
    "REQUESTS",
    "429S",
    "ERRORS",
    "PROMPT TOKENS",
    "CACHED",
    "COMPLETION",
    "GPU S",
    "QUEUE WAIT S",
    "NOW",
    "LIMITS",
)


def render_usage(view: dict[str, Any], url: str) -> str:
    """The usage for people: one row per tenant, then its models."""
    lines = [f"olmd at {url} · usage since {view['since']} (UTC days)"]
    if not view.get("enabled", True):
        lines.append("no tenants, keys or tenant header configured: nothing is counted")
    rows = []
    for entry in view["tenants"]:
        totals = entry["usage"]["totals"]
        now = f"{entry.get('in_flight', 0)} in flight, {entry.get('queued', 0)} queued"
        rows.append(
            [
                entry["tenant"] + (" (removed)" if entry.get("removed") else ""),
                entry.get("priority", "-"),
                *(
                    _number(totals.get(k))
                    for k in (
                        "requests",
                        "rate_limited",
                        "errors",
                        "prompt_tokens",
                        "cached_prompt_tokens",
                        "completion_tokens",
                        "gpu_seconds",
                        "queue_wait_seconds",
                    )
                ),
                now if "in_flight" in entry else "-",
                views.tenant_limits(entry),
            ]
        )
        for model, counts in sorted(entry["usage"]["models"].items()):
            rows.append(
                [
                    f"  {model}",
                    "",
                    _number(counts.get("requests")),
                    _number(counts.get("rate_limited")),
                    _number(counts.get("errors")),
                    _number(counts.get("prompt_tokens")),
                    _number(counts.get("cached_prompt_tokens")),
                    _number(counts.get("completion_tokens")),
                    _number(counts.get("gpu_seconds")),
                    _number(counts.get("queue_wait_seconds")),
                    "",
                    "",
                ]
            )
    return "\n".join([*lines, "", *views.table(USAGE_COLUMNS, rows)])


async def _fetch(url: str, token: str | None, since: str, tenant: str | None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    params = {"since": since, **({"tenant": tenant} if tenant else {})}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.get(url.rstrip("/") + "/admin/usage", headers=headers, params=params) as response,
    ):
        body = await response.json(content_type=None)
        if response.status != 200:
            error = body.get("error") if isinstance(body, dict) else body
            raise RuntimeError(f"/admin/usage answered HTTP {response.status}: {error}")
        return body


def _cmd_usage(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    url = args.url or daemon_url(settings)
    try:
        view = run_async(_fetch(url, token, args.since, args.tenant))
    except (aiohttp.ClientError, TimeoutError, ValueError, RuntimeError) as exc:
        print(f"olmd usage: {url}: {str(exc) or type(exc).__name__}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(view) if args.json else render_usage(view, url))
    return EXIT_OK
