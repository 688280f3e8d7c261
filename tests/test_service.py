"""The daemon as a real process: systemd notifications, SIGHUP reload, SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from daemon.emulator.server import Emulator, EmulatorConfig
from tests.conftest import ROOT
from tests.helpers import fetch, free_port, olmd_command, settings_dict, write_settings


class NotifySocket:
    """The systemd side of sd_notify: a datagram socket collecting messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    async def next(self, timeout: float = 10.0) -> str:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            data = await loop.sock_recv(self.sock, 4096)
        return data.decode()

    async def wait_for(self, field: str, timeout: float = 10.0) -> list[str]:
        seen = []
        async with asyncio.timeout(timeout):
            while True:
                message = await self.next(timeout)
                seen.append(message)
                if field in message.splitlines():
                    return seen


@pytest.fixture
async def node() -> AsyncIterator[Emulator]:
    config = EmulatorConfig(name="slow", models=["llama3.1:8b"], tokens=20, token_delay=0.1)
    async with Emulator(config) as emu:
        yield emu


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.sock.close()


async def start_daemon(
    config: Path, notify: NotifySocket, **extra_env: str
) -> asyncio.subprocess.Process:
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "PYTHONPATH": str(ROOT), **extra_env}
    return await asyncio.create_subprocess_exec(
        *olmd_command("--config", str(config), "--log-format", "json", "serve"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def stop(process: asyncio.subprocess.Process, *, signal_it: bool = True) -> tuple[int, str]:
    if signal_it:
        process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(20):
        _, err = await process.communicate()
    return process.returncode or 0, err.decode()


async def test_ready_after_listening_reload_and_drain(
    tmp_path: Path, node: Emulator, notify: NotifySocket
) -> None:
    data = settings_dict([("slow", 1, node)])
    port = data["server"]["port"]
    config = write_settings(tmp_path / "settings.toml", data)
    process = await start_daemon(config, notify)
    base = f"http://127.0.0.1:{port}"
    try:
        await notify.wait_for("READY=1", timeout=20)
        # READY=1 promises the port accepts connections at that moment.
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        await writer.wait_closed()

        async with aiohttp.ClientSession() as http:
            assert (await fetch(http, "GET", f"{base}/readyz")).status == 200

            # SIGHUP with a broken file: refused, logged, the old settings keep serving.
            config.write_text("[routing]\nstrategy = 'fastest'\n")
            process.send_signal(signal.SIGHUP)
            messages = await notify.wait_for("READY=1")
            assert any("RELOADING=1" in m and "MONOTONIC_USEC=" in m for m in messages)
            response = await fetch(
                http,
                "POST",
                f"{base}/api/generate",
                json={"model": "llama3.1:8b", "prompt": "hi", "stream": False},
            )
            assert response.status == 200
            assert response.headers["X-Olmd-Node"] == "slow"
            metrics = await (await http.get(f"{base}/metrics")).text()
            assert "olmd_config_last_reload_success 0.0" in metrics

            # SIGTERM while a slow stream is in flight: it finishes, then the process exits 0.
            async with http.post(
                f"{base}/api/generate", json={"model": "llama3.1:8b", "prompt": "hi"}
            ) as stream:
                first = await stream.content.readline()
                assert json.loads(first)["done"] is False
                process.send_signal(signal.SIGTERM)
                await notify.wait_for("STOPPING=1")
                rest = (await stream.content.read()).decode().splitlines()
            assert json.loads(rest[-1])["done"] is True
            assert len(rest) == 20  # 19 more tokens and the final chunk: nothing cut
        code, err = await stop(process, signal_it=False)
        assert code == 0
        events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
        assert "reload_refused" in events
        assert events[-1] == "stopped"
        assert "drain_cancelled" not in events
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_reload_applies_a_good_file(
    tmp_path: Path, node: Emulator, notify: NotifySocket
) -> None:
    data = settings_dict([("slow", 1, node)])
    config = write_settings(tmp_path / "settings.toml", data)
    process = await start_daemon(config, notify)
    base = f"http://127.0.0.1:{data['server']['port']}"
    try:
        await notify.wait_for("READY=1", timeout=20)
        data["services"]["ollama"]["nodes"][0]["name"] = "renamed"
        write_settings(config, data)
        process.send_signal(signal.SIGHUP)
        await notify.wait_for("READY=1")
        async with aiohttp.ClientSession() as http:
            response = await fetch(
                http, "POST", f"{base}/api/embed", json={"model": "llama3.1:8b", "input": "hi"}
            )
            assert response.status == 200
            assert response.headers["X-Olmd-Node"] == "renamed"
        code, _ = await stop(process)
        assert code == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_settings_error_exits_2_before_listening(tmp_path: Path) -> None:
    import subprocess

    config = tmp_path / "bad.toml"
    config.write_text("[server]\nport = 0\n")
    result = subprocess.run(
        olmd_command("--config", str(config), "serve"),
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert result.returncode == 2
    assert "server.port" in result.stderr


async def test_sigterm_during_the_first_probe_round_stops_cleanly(
    tmp_path: Path, notify: NotifySocket
) -> None:
    # A node that accepts and never answers keeps the first probe round busy.
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    data = {
        "server": {"host": "127.0.0.1", "port": free_port()},
        "services": {
            "ollama": {
                "health_timeout": 20.0,
                "nodes": [{"name": "silent", "host": "127.0.0.1", "port": port}],
            }
        },
        "jobs": {"ollama_sync": {"enabled": False}},
    }
    config = write_settings(tmp_path / "settings.toml", data)
    process = await start_daemon(config, notify)
    try:
        async with asyncio.timeout(20):
            while not writers:  # the daemon is probing  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        await notify.wait_for("STOPPING=1")
        code, err = await stop(process, signal_it=False)
        assert code == 0
        assert '"event": "listening"' not in err
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_watchdog_pings_while_alive(
    tmp_path: Path, node: Emulator, notify: NotifySocket
) -> None:
    config = write_settings(tmp_path / "settings.toml", settings_dict([("slow", 1, node)]))
    # WatchdogSec=0.4 s: olmd pings every 0.2 s.
    process = await start_daemon(config, notify, WATCHDOG_USEC="400000")
    try:
        await notify.wait_for("READY=1", timeout=20)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(3):
            await notify.wait_for("WATCHDOG=1", timeout=2)
        assert loop.time() - started < 2
        code, _ = await stop(process)
        assert code == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
