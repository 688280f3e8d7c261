"""A fresh machine gets what the lock says, and olmd starts without third parties' noise."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
from importlib import metadata
from pathlib import Path

import aiohttp
import pytest
from packaging.markers import Marker
from packaging.utils import canonicalize_name

from daemon.emulator.server import Emulator, EmulatorConfig
from tests.conftest import ROOT
from tests.helpers import fetch, free_port, olmd_command, settings_dict, write_settings

LOCK = ROOT / "requirements" / "dev.txt"
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>[^\s;\\]+)\s*(?:;(?P<marker>[^\\]+))?")


def locked() -> dict[str, str]:
    """Name → version for every pin in the lock that applies to this machine."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        if match := _PIN.match(line):
            marker = match["marker"]
            if marker is None or Marker(marker.strip()).evaluate():
                pins[canonicalize_name(match["name"])] = match["version"]
    return pins


@pytest.mark.skipif(
    bool(os.environ.get("OLMD_UNLOCKED")), reason="make test-latest runs without the lock"
)
def test_installed_versions_are_the_locked_ones() -> None:
    pins = locked()
    assert {"aiohttp", "asyncssh", "cryptography", "pytest", "ruff", "mypy"} <= set(pins)
    installed = {
        canonicalize_name(dist.metadata["Name"]): dist.version for dist in metadata.distributions()
    }
    wrong = {
        name: f"{installed.get(name, 'not installed')} (lock: {version})"
        for name, version in pins.items()
        if installed.get(name) != version
    }
    assert not wrong, f"not as locked: {wrong}; run `make clean test`"
    unlocked = set(installed) - set(pins) - {"olmd"}
    assert not unlocked, f"installed but not in the lock: {sorted(unlocked)}"


def test_every_locked_package_carries_hashes() -> None:
    text = LOCK.read_text()
    entries = re.split(r"\n(?=[A-Za-z])", text)
    pinned = [entry for entry in entries if _PIN.match(entry)]
    assert len(pinned) >= len(locked()) > 40
    unhashed = [entry.split()[0] for entry in pinned if "--hash=sha256:" not in entry]
    assert not unhashed


def run_olmd(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        olmd_command(*args),
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "default", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_an_unrelated_olmd_variable_is_one_warning(tmp_path: Path) -> None:
    result = run_olmd("--log-format", "json", "config", "check", OLMD_PORT="1")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1, result.stderr
    assert "OLMD_PORT" in warnings[0] and "OLMD_SERVER__PORT (server.port)" in warnings[0]
    assert '"level": "warning"' in warnings[0]


def test_a_misspelt_key_under_a_known_section_stops_olmd(tmp_path: Path) -> None:
    result = run_olmd("config", "check", OLMD_ROUTING__STRATEGYY="x")
    assert result.returncode == 2
    assert "routing.strategyy: unknown key; did you mean routing.strategy?" in result.stderr


def test_a_misspelt_file_key_gets_the_same_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "settings.toml"
    path.write_text("[server]\nprot = 8080\n")
    result = run_olmd("--config", str(path), "config", "check")
    assert result.returncode == 2
    assert "server.prot: unknown key; did you mean server.port?" in result.stderr


def test_sync_help_prints_no_warning() -> None:
    result = run_olmd("sync", "--help")
    assert result.returncode == 0
    assert "Warning" not in result.stderr, result.stderr


async def test_serve_prints_no_deprecation_warning(tmp_path: Path) -> None:
    async with Emulator(EmulatorConfig(name="a", models=["llama3.1:8b"])) as emu:
        data = settings_dict([("a", 1, emu)], port=free_port())
        config = write_settings(tmp_path / "settings.toml", data)
        process = await asyncio.create_subprocess_exec(
            *olmd_command("--config", str(config), "--log-format", "json", "serve"),
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "default"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        url = f"http://127.0.0.1:{data['server']['port']}/readyz"
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                try:
                    return (await fetch(http, "GET", url)).status == 200
                except aiohttp.ClientError:
                    return False

            ready_seen = False
            for _ in range(200):
                if ready_seen := await ready():
                    break
                await asyncio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            _, err = await process.communicate()
    assert ready_seen
    assert process.returncode == 0
    assert "Warning" not in err.decode(), err.decode()
