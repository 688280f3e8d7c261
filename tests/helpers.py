"""Shared test tools: free ports, settings files, a daemon in-process or as a process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import structlog
import tomli_w
from aiohttp.test_utils import TestServer

from daemon.emulator.server import Emulator
from daemon.runtime import RUNTIME, Phase
from daemon.service import build_app
from daemon.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_entries(emulators: list[tuple[str, int, Emulator]]) -> list[dict[str, Any]]:
    return [
        {"name": name, "host": "127.0.0.1", "port": emu.port, "weight": weight}
        for name, weight, emu in emulators
    ]


def settings_dict(
    emulators: list[tuple[str, int, Emulator]], *, port: int = 0, **routing: Any
) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": port or free_port(), "drain_timeout": 10.0},
        # The classic strategy and room for many requests per node, unless a test asks:
        # most proxy tests are about forwarding, not about slots.
        "routing": {"probe_interval": 0.5, "strategy": "weighted", "parallel": 32, **routing},
        "services": {"ollama": {"health_timeout": 2.0, "nodes": node_entries(emulators)}},
        # No nightly sync in proxy tests, whatever the time of day the suite runs at.
        "jobs": {"ollama_sync": {"enabled": False}},
    }


def write_settings(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(data))
    return path


@contextlib.asynccontextmanager
async def running_olmd(settings: Settings | dict[str, Any]) -> AsyncIterator[TestServer]:
    """The daemon's application on a free loopback port, components started."""
    if isinstance(settings, dict):
        settings = Settings(**settings)
    server = TestServer(build_app(settings), host="127.0.0.1", handler_cancellation=True)
    await server.start_server()
    server.app[RUNTIME].set_phase(Phase.READY)  # as serve() does once it listens
    try:
        yield server
    finally:
        await server.close()


async def eventually(check: Callable[[], bool], timeout: float = 5.0, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)


async def fetch(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> aiohttp.ClientResponse:
    """A whole response, its body read and its connection given back to the pool."""
    response = await http.request(method, url, **kwargs)
    await response.read()
    return response


async def run_cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    """``olmd ARGV`` in-process (in a thread: it runs its own event loop); exit code,
    stdout, stderr. main() configures logging; later tests must not inherit that."""
    from daemon.cli import main as cli

    capsys.readouterr()
    saved, root = structlog.get_config(), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        code = await asyncio.to_thread(cli.main, list(argv))
    finally:
        structlog.configure(**saved)
        root.handlers[:], root.level = handlers, level
    out, err = capsys.readouterr()
    return code, out, err


def olmd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "daemon", *args]


class RedisServer:
    """A real ``redis-server`` on a free loopback port, no persistence; ``stop`` and
    ``start`` again on the same port to play an outage."""

    def __init__(self, workdir: Path) -> None:
        import shutil

        binary = shutil.which("redis-server")
        if binary is None:
            import pytest

            pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: Any = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.proc = None
