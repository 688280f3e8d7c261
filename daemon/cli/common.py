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
