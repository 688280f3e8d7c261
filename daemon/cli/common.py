"""What every subcommand shares: exit codes, the event loop runner, loading settings."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from daemon.settings import Settings, load_settings

T = TypeVar("T")
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed (Linux), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def settings_from(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """``--config`` after the subcommand too (``olmd sync --config PATH``). SUPPRESS: not
    given there, the top-level ``olmd --config PATH`` still counts."""
    parser.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help="settings file")


def http_url(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def daemon_url(settings: Settings) -> str:
    """Where this machine reaches the daemon the settings describe (a wildcard listen
    address is reached on loopback)."""
    wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
    host = wildcard.get(settings.server.host, settings.server.host)
    return http_url("http", host, settings.server.port)
