"""The ``olmd`` command. Exit codes: 0 ok, 1 runtime failure, 2 usage or settings error.

Each subcommand module exposes ``register(subparsers)``; its handler receives the parsed
arguments and returns the exit code. Handlers that need settings call :func:`settings_from`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import tomli_w

from daemon import __version__, logs, registry
from daemon.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    add_config_option,
    run_async,
    settings_from,
)
from daemon.settings import DEFAULT_PATHS, SettingsError, find_settings_file, load_settings


def _cmd_serve(args: argparse.Namespace) -> int:
    from daemon.service import serve

    settings = settings_from(args)
    return run_async(serve(settings, loader=lambda: load_settings(args.config)))


def _cmd_config_check(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    found = find_settings_file(args.config)
    nodes = settings.nodes()
    print(
        f"settings OK: {len(nodes)} node(s) ({', '.join(n.name for n in nodes)}), "
        f"strategy {settings.routing.strategy}, listening on "
        f"{settings.server.host}:{settings.server.port}"
    )
    if found is None:
        looked = ", ".join(str(p) for p in DEFAULT_PATHS)
        print(f"no settings file found ({looked}): defaults and environment only")
    else:
        print(f"read {found.absolute()}")
    return EXIT_OK


def _drop_none(value: Any) -> Any:
    # TOML has no null: an unset optional key is simply absent.
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _cmd_config_show(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    sys.stdout.write(tomli_w.dumps(_drop_none(settings.public_dict())))
    return EXIT_OK


def _cmd_emulate(args: argparse.Namespace) -> int:
    from daemon.emulator import server as emulator

    return emulator.run_from_args(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from daemon.cli import demo

    return run_async(demo.run(port=args.port, strategy=args.strategy))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="olmd",
        description="olmd, the Ollama fleet daemon: one port in front of many Ollama nodes.",
    )
    parser.add_argument("--version", action="version", version=f"olmd {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="settings file (TOML, or JSON with the same keys); default $OLMD_CONFIG, "
        "./settings.toml, then /etc/olmd/settings.toml",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "json", "console"],
        help="auto: console on a terminal, JSON lines otherwise (systemd, pipes)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the daemon",
        description="Run the daemon in the foreground: proxy, prober, scheduler, /metrics. "
        "SIGHUP reloads the settings; SIGTERM drains in-flight requests and exits.",
    )
    serve.set_defaults(func=_cmd_serve)
    add_config_option(serve)

    config = sub.add_parser("config", help="check or show the settings")
    add_config_option(config)
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = config_sub.add_parser(
        "check",
        help="validate the settings and name the file read; exit 2 naming each bad key",
    )
    check.set_defaults(func=_cmd_config_check)
    show = config_sub.add_parser(
        "show", help="print the effective settings as TOML, secrets masked"
    )
    show.set_defaults(func=_cmd_config_show)
    for action in (check, show):
        add_config_option(action)

    emulate = sub.add_parser(
        "emulate",
        help="run an Ollama API emulator (for tests, benchmarks and trying clients)",
        description="Serve Ollama's HTTP API with canned, tunable behaviour: no GPU, no models. "
        "Change it at run time with POST /_emulator/config.",
    )
    from daemon.emulator import server as emulator

    emulator.add_arguments(emulate)
    emulate.set_defaults(func=_cmd_emulate)

    demo = sub.add_parser(
        "demo",
        help="start two emulated nodes and the daemon in front of them",
        description="Start two emulated Ollama nodes (weights 2 and 1) and olmd on loopback, "
        "and print commands to try. Ctrl-C stops everything.",
    )
    demo.add_argument("--port", type=int, default=11435, help="olmd's port (default 11435)")
    demo.add_argument(
        "--strategy",
        default="adaptive",
        choices=registry.names("balancers"),
        help="routing strategy (default adaptive; weighted shows the 2:1 split strictly)",
    )
    demo.set_defaults(func=_cmd_demo)

    for register in _plugins():
        register(sub)
    return parser


def _plugins() -> list[Callable[[Any], None]]:
    """Subcommands contributed by other modules (sync, verify-env, healthcheck, smoke,
    status, keys, usage, models)."""
    from daemon.cli import models as models_cli
    from daemon.cli import ops as ops_cli
    from daemon.cli import status as status_cli
    from daemon.cli import sync as sync_cli
    from daemon.cli import tenants as tenants_cli

    return [
        sync_cli.register,
        ops_cli.register,
        status_cli.register,
        tenants_cli.register,
        models_cli.register,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        code: int = args.func(args)
    except SettingsError as exc:
        print(f"olmd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except OSError as exc:
        print(f"olmd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return code
