"""Operator subcommands: ``olmd verify-env``, ``olmd healthcheck`` and ``olmd smoke``.

Exit codes as everywhere in olmd: 0 ok (warnings included), 1 a check failed or a node
could not be reached, 2 usage or settings error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    add_config_option,
    daemon_url,
    http_url,
    run_async,
    settings_from,
)
from daemon.settings import NodeSettings, Settings

if TYPE_CHECKING:
    from daemon.ops import envcheck
    from daemon.ops.smoke import SmokePlan

__all__ = ["register", "smoke_plan"]

_HELP_FORMAT = argparse.RawDescriptionHelpFormatter


def register(subparsers: Any) -> None:
    """Add the operator subcommands to ``olmd``'s subparsers."""
    for add in (_add_verify_env, _add_healthcheck, _add_smoke):
        parser = add(subparsers)
        add_config_option(parser)


# ---------------------------------------------------------------- verify-env


def _add_verify_env(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "verify-env",
        help="check this machine (or a node over SSH) against the capacity thresholds",
        formatter_class=_HELP_FORMAT,
        description="Gather this machine's facts (or a node's, over SSH) and compare them with\n"
        "the capacity thresholds: CPU model and cores, total and available RAM, free disk\n"
        "at services.ollama.download.data_root, GPUs (nvidia-smi), load average, and the\n"
        "Ollama version and models (its HTTP API). Writes a Markdown report (report.path)\n"
        "and its JSON twin (.json), both atomically.",
        epilog="Thresholds: report.min_ram_gb (total RAM, default >= 64 GB) and\n"
        "report.min_free_disk_gb (free disk, default > 700 GB); 1 GB = 10^9 bytes.\n"
        "Results: pass; warn (less than 10% headroom, or no Ollama API; exit 0); fail (exit 1).\n"
        "With --node, commands run over SSH (OLLAMA_SSH_USER, OLLAMA_SSH_KEY_PATH); the\n"
        "node's host key must already be in ssh.known_hosts (default ~/.ssh/known_hosts):\n"
        "an unknown or changed key aborts before any command runs.",
    )
    parser.add_argument(
        "--node",
        metavar="NAME",
        help="check this node from the settings over SSH, not this machine",
    )
    parser.add_argument(
        "--output",
        metavar="PATH",
        type=Path,
        help="Markdown report path (JSON twin next to it); default report.path, "
        "or report.path with -NAME added to the file name for --node",
    )
    parser.add_argument(
        "--ollama-url",
        metavar="URL",
        help="Ollama API to list models from; default the node's URL, or services.ollama "
        "scheme://host:port for this machine",
    )
    parser.add_argument(
        "--require-ollama",
        action="store_true",
        help="fail (not warn) when the Ollama API does not answer",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON report to stdout")
    parser.set_defaults(func=_cmd_verify_env)
    return parser


def _find_node(settings: Settings, name: str) -> NodeSettings | None:
    found = next((n for n in settings.nodes() if n.name == name), None)
    if found is None:
        known = ", ".join(n.name for n in settings.nodes())
        print(f"olmd: no node named {name!r} in the settings (known: {known})", file=sys.stderr)
    return found


def _cmd_verify_env(args: argparse.Namespace) -> int:
    from daemon.ops import envcheck
    from daemon.ops import report as envreport

    settings = settings_from(args)
    node = None
    if args.node:
        node = _find_node(settings, args.node)
        if node is None:
            return EXIT_USAGE
    path: Path = args.output or settings.report.path
    if node is not None and args.output is None:
        path = path.with_name(f"{path.stem}-{node.name}{path.suffix}")
    command = "olmd verify-env" + (f" --node {node.name}" if node else "")
    # This machine with nodes configured: their APIs, not services.ollama's host and port.
    apis = list(settings.services.ollama.nodes) if node is None and not args.ollama_url else []
    try:
        report = run_async(
            envcheck.verify(
                settings,
                node=node,
                ollama_url=args.ollama_url or (apis[0].url if apis else None),
                require_ollama=args.require_ollama,
                command=command,
            )
        )
        if len(apis) > 1:
            report = run_async(_node_api_checks(report, settings, apis, args.require_ollama))
    except envcheck.EnvCheckError as exc:
        print(f"olmd: verify-env: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    markdown, twin = envreport.write_report(report, path)
    if args.json:
        print(json.dumps(envreport.to_json(report), indent=2))
    else:
        for check in report.checks:
            detail = f"  ({check.detail})" if check.detail else ""
            print(
                f"{check.status.upper():<5} {check.name}: {check.measured} "
                f"(threshold {check.threshold}){detail}"
            )
        print(f"{report.status.upper()}: report written to {markdown} and {twin}")
    return EXIT_FAILURE if report.status is envcheck.Status.FAIL else EXIT_OK


async def _node_api_checks(
    report: envcheck.Report,
    settings: Settings,
    nodes: Sequence[NodeSettings],
    require_ollama: bool,
) -> envcheck.Report:
    """``report`` with an Ollama API check (and a baseline models check) per node."""
    from daemon.ops import envcheck
    from daemon.ops.smoke import check_nodes

    api_keys = ("ollama_api", "baseline_models")
    results = await check_nodes(
        [(n.name, n.url) for n in nodes], time_limit=settings.services.ollama.health_timeout
    )
    checks = [c for c in report.checks if c.key not in api_keys]
    for node, result in zip(nodes, results, strict=True):
        facts = dataclasses.replace(report.facts, ollama=result, ollama_url=node.url)
        for check in envcheck.evaluate(
            facts,
            settings.report,
            baseline=settings.services.ollama.baseline_models,
            require_ollama=require_ollama,
        ):
            if check.key in api_keys:
                key, name = f"{check.key}:{node.name}", f"{check.name} ({node.name})"
                checks.append(dataclasses.replace(check, key=key, name=name))
    return dataclasses.replace(report, checks=checks)


# ---------------------------------------------------------------- healthcheck


def _add_healthcheck(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "healthcheck",
        help="ask Ollama nodes for their version and models",
        description="GET /api/version and /api/tags on every node in the settings (or the "
        "one given by --host/--port, or the --node names), all at once. Exit 1 if any fails.",
    )
    parser.add_argument("--host", help="check this host instead of the settings' nodes")
    parser.add_argument("--port", type=int, default=11434, help="with --host (default 11434)")
    parser.add_argument("--scheme", choices=["http", "https"], default="http", help="with --host")
    parser.add_argument(
        "--node", action="append", metavar="NAME", help="only this node (repeatable)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="per node; default services.ollama.health_timeout",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object for scripts")
    parser.set_defaults(func=_cmd_healthcheck)
    return parser


def _cmd_healthcheck(args: argparse.Namespace) -> int:
    from daemon.ops.smoke import check_nodes

    settings = settings_from(args)
    if args.host:
        host = f"[{args.host}]" if ":" in args.host else args.host
        targets = [(f"{args.host}:{args.port}", f"{args.scheme}://{host}:{args.port}")]
    else:
        nodes = settings.nodes()
        for name in args.node or []:
            if _find_node(settings, name) is None:
                return EXIT_USAGE
        targets = [(n.name, n.url) for n in nodes if not args.node or n.name in args.node]
    limit = args.timeout or settings.services.ollama.health_timeout
    results = run_async(check_nodes(targets, time_limit=limit))
    healthy = sum(r.ok for r in results)
    if args.json:
        body = {"ok": healthy == len(results), "nodes": [r.to_json() for r in results]}
        print(json.dumps(body, indent=2))
    else:
        for r in results:
            if r.ok:
                names = ", ".join(m.name for m in r.models) or "none"
                print(
                    f"OK    {r.name}  {r.url}  ollama {r.version}  "
                    f"{len(r.models)} model(s): {names}  ({r.elapsed_seconds * 1000:.0f} ms)"
                )
            else:
                print(f"FAIL  {r.name}  {r.url}  {r.error}")
        print(f"{healthy} of {len(results)} node(s) healthy")
    return EXIT_OK if healthy == len(results) else EXIT_FAILURE


# ---------------------------------------------------------------- smoke


def _add_smoke(subparsers: Any) -> argparse.ArgumentParser:
    from daemon.ops.smoke import DAEMON_ROUTE

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "smoke",
        help="send a prompt through olmd and/or straight to a node; time the answer",
        formatter_class=_HELP_FORMAT,
        description="Stream one generation and check that the answer is not empty; report "
        "time to first token and tokens/s.\n\n"
        "  SMOKE_TEST_LLM_PROMPT      prompt sent through the daemon's LLM route\n"
        "  SMOKE_TEST_OLLAMA_HOST     check this Ollama node directly (its models, then a\n"
        "  SMOKE_TEST_OLLAMA_PORT     generation); port default 11434\n"
        "  SMOKE_TEST_MODEL           model to ask (default: the first baseline model,\n"
        "                             else the first model listed)\n\n"
        "Both checks run when both are set. The daemon is called with the first key of\n"
        "OLMD_API_KEYS as a Bearer token when keys are set. Flags override the variables.",
    )
    parser.add_argument("--prompt", help="default $SMOKE_TEST_LLM_PROMPT")
    parser.add_argument(
        "--daemon-url", metavar="URL", help="default http://<server.host>:<server.port>"
    )
    parser.add_argument(
        "--route", default=DAEMON_ROUTE, help=f"the daemon's route (default {DAEMON_ROUTE})"
    )
    parser.add_argument("--ollama-host", metavar="HOST", help="default $SMOKE_TEST_OLLAMA_HOST")
    parser.add_argument(
        "--ollama-port", metavar="PORT", type=int, help="default $SMOKE_TEST_OLLAMA_PORT or 11434"
    )
    parser.add_argument("--ollama-scheme", choices=["http", "https"], default="http")
    parser.add_argument("--model", help="default $SMOKE_TEST_MODEL")
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="per generation, cold model load included (default 120)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object for scripts")
    parser.set_defaults(func=_cmd_smoke)
    return parser


def smoke_plan(
    args: argparse.Namespace, settings: Settings, environ: Mapping[str, str]
) -> SmokePlan | str:
    """The smoke plan for these flags and variables, or the reason there is none."""
    from daemon.ops.smoke import DEFAULT_PROMPT, SmokePlan

    prompt = args.prompt or environ.get("SMOKE_TEST_LLM_PROMPT") or None
    host = args.ollama_host or environ.get("SMOKE_TEST_OLLAMA_HOST") or None
    raw_port = args.ollama_port or environ.get("SMOKE_TEST_OLLAMA_PORT") or 11434
    try:
        port = int(raw_port)
    except ValueError:
        return f"SMOKE_TEST_OLLAMA_PORT must be a port number (got {raw_port!r})"
    if prompt is None and host is None:
        return (
            "nothing to check: set SMOKE_TEST_LLM_PROMPT (through the daemon) and/or "
            "SMOKE_TEST_OLLAMA_HOST (a node directly), or pass --prompt / --ollama-host"
        )
    keys = settings.api_keys
    return SmokePlan(
        daemon_url=(args.daemon_url or daemon_url(settings)) if prompt else None,
        node_url=http_url(args.ollama_scheme, host, port) if host else None,
        prompt=prompt or DEFAULT_PROMPT,
        model=args.model or environ.get("SMOKE_TEST_MODEL") or None,
        preferred_models=tuple(settings.models()),
        api_key=keys[0].get_secret_value() if keys else None,
        route=args.route,
        time_limit=args.timeout,
        connect_timeout=settings.services.ollama.health_timeout,
    )


def _cmd_smoke(args: argparse.Namespace) -> int:
    from daemon.ops.smoke import SmokeResult, run_smoke

    settings = settings_from(args)
    plan = smoke_plan(args, settings, os.environ)
    if isinstance(plan, str):
        print(f"olmd: smoke: {plan}", file=sys.stderr)
        return EXIT_USAGE
    results: Sequence[SmokeResult] = run_async(run_smoke(plan))
    ok = all(r.ok for r in results)
    if args.json:
        print(json.dumps({"ok": ok, "checks": [r.to_json() for r in results]}, indent=2))
        return EXIT_OK if ok else EXIT_FAILURE
    for r in results:
        where = f"{r.target}  {r.url}  model {r.model or '?'}"
        if r.ok:
            ttft = f"{r.ttft_seconds:.3f} s" if r.ttft_seconds is not None else "n/a"
            rate = f"{r.tokens_per_second:.1f}" if r.tokens_per_second is not None else "n/a"
            print(f"OK    {where}  first token {ttft}  {rate} tokens/s  {r.tokens} tokens")
            print(f"      answer: {r.answer[:120]}")
        else:
            print(f"FAIL  {where}  {r.error}")
    return EXIT_OK if ok else EXIT_FAILURE
