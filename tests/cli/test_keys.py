"""``olmd keys`` and the keys file: hashes only, mode 0600, refused when others can read
it, and a key added while the daemon runs admitted on SIGHUP without a restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any

import aiohttp

from daemon.emulator.server import Emulator, EmulatorConfig
from tests.conftest import ROOT
from tests.gateway.support import MODEL
from tests.helpers import fetch, free_port, olmd_command, settings_dict, write_settings


def olmd(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        olmd_command(*args), env=env, capture_output=True, text=True, timeout=30, check=False
    )


def config(tmp_path: Path, emulators: list[Any] | None = None, port: int = 0) -> Path:
    data = settings_dict(emulators or [], port=port)
    if not emulators:
        del data["services"]
    data["server"]["keys_file"] = "keys.json"
    data["tenants"] = [{"name": "chat"}, {"name": "batch", "priority": "batch"}]
    return write_settings(tmp_path / "settings.toml", data)


def test_add_list_revoke_keep_only_hashes(tmp_path: Path) -> None:
    path = config(tmp_path)
    added = olmd("--config", str(path), "keys", "add", "--tenant", "chat")
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert key.startswith("olmd-") and len(key) > 40
    keys_file = tmp_path / "keys.json"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    assert key not in keys_file.read_text()
    [entry] = json.loads(keys_file.read_text())["keys"]
    assert entry["tenant"] == "chat" and entry["id"] in added.stderr
    listed = olmd("--config", str(path), "keys", "list")
    assert entry["id"] in listed.stdout and "chat" in listed.stdout and key not in listed.stdout
    unknown = olmd("--config", str(path), "keys", "add", "--tenant", "nobody")
    assert unknown.returncode == 2 and "no tenant 'nobody'" in unknown.stderr
    revoked = olmd("--config", str(path), "keys", "revoke", "--tenant", "chat")
    assert revoked.returncode == 0 and entry["id"] in revoked.stderr
    assert json.loads(keys_file.read_text())["keys"] == []


def test_a_keys_file_others_can_read_is_refused_at_start(tmp_path: Path) -> None:
    path = config(tmp_path)
    assert olmd("--config", str(path), "keys", "add", "--tenant", "chat").returncode == 0
    (tmp_path / "keys.json").chmod(0o644)
    for command in (["config", "check"], ["serve"]):
        result = olmd("--config", str(path), *command)
        assert result.returncode == 2, result.stderr
        assert "server.keys_file" in result.stderr
        assert "readable by group or others (mode 0644)" in result.stderr
        assert "chmod 600" in result.stderr


async def test_a_key_added_while_running_is_admitted_on_sighup(tmp_path: Path) -> None:
    async with Emulator(EmulatorConfig(name="a", models=[MODEL], tokens=3)) as emu:
        port = free_port()
        server = config(tmp_path, [("a", 1, emu)], port)
        first = olmd("--config", str(server), "keys", "add", "--tenant", "chat").stdout.strip()
        process = await asyncio.create_subprocess_exec(
            *olmd_command("--config", str(server), "--log-format", "json", "serve"),
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        url = f"http://127.0.0.1:{port}"
        body = {"model": MODEL, "prompt": "hi", "stream": False}

        async def status(http: aiohttp.ClientSession, key: str) -> int:
            headers = {"Authorization": f"Bearer {key}"}
            return (
                await fetch(http, "POST", url + "/api/generate", json=body, headers=headers)
            ).status

        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(200):
                    try:
                        if (await fetch(http, "GET", url + "/readyz")).status == 200:
                            break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.05)
                assert await status(http, first) == 200
                second = olmd("--config", str(server), "keys", "add", "--tenant", "batch")
                key = second.stdout.strip()
                assert await status(http, key) == 401  # not yet: the daemon reads on SIGHUP
                process.send_signal(signal.SIGHUP)
                for _ in range(100):
                    if await status(http, key) == 200:
                        break
                    await asyncio.sleep(0.05)
                assert await status(http, key) == 200
                assert await status(http, first) == 200  # the old key still works
        finally:
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                _, err = await process.communicate()
        assert process.returncode == 0
        for secret in (first, key):
            assert secret not in err.decode()
