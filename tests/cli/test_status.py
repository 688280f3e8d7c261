"""``olmd status`` end to end: the real command line against a running daemon with one
node down and a sync in progress; and who may ask: on loopback with no admin token set,
``olmd status`` and ``olmd usage`` answer as ``/ui`` does, with a token set they need it."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.gateway.component import GATEWAY
from daemon.settings import load_settings
from tests.helpers import run_cli, running_olmd, settings_dict, write_settings

TOKEN = "admin-token-for-tests"


@pytest.fixture
async def olmd_syncing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Any, Path]]:
    """olmd over nodes a and b (live, pulling slowly) and dead (down), a sync running."""
    monkeypatch.setenv("OLMD_ADMIN_TOKEN", TOKEN)
    slow = {"pull_size": 3_000_000, "pull_speed": 1_000_000}
    a = Emulator(EmulatorConfig(name="a", models=["llama3.1:8b"], **slow))
    b = Emulator(EmulatorConfig(name="b", models=[], **slow))
    dead = Emulator(EmulatorConfig(name="dead"))
    for emu in (a, b, dead):
        await emu.start()
    await dead.stop()
    data = settings_dict([("a", 2, a), ("b", 1, b), ("dead", 1, dead)])
    data["services"]["ollama"]["baseline_models"] = ["llama3.1:8b", "qwen3:0.6b"]
    data["jobs"]["ollama_sync"]["manifest_path"] = str(tmp_path / "manifest.json")
    config = write_settings(tmp_path / "settings.toml", data)
    try:
        async with running_olmd(load_settings(config)) as server:
            prober = server.app[GATEWAY].prober
            for _ in range(3):  # `fall` failed probes: down
                await prober.probe_all()
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with aiohttp.ClientSession(headers=headers) as http:
                sync = server.make_url("/admin/sync")
                async with http.post(sync, json={"ignore_window": True}) as response:
                    assert response.status == 202
                for _ in range(200):
                    async with http.get(sync) as response:
                        progress = (await response.json())["progress"]
                    pulling = [
                        item
                        for models in progress["nodes"].values()
                        for item in models.values()
                        if item.get("completed")
                    ]
                    if pulling:
                        break
                    await asyncio.sleep(0.02)
            yield server, config
    finally:
        await a.stop()
        await b.stop()


async def test_status_shows_the_fleet_and_the_running_sync(olmd_syncing, capsys) -> None:
    server, config = olmd_syncing
    url = str(server.make_url("")).rstrip("/")
    code, out, err = await run_cli(capsys, "status", "--url", url, "--config", str(config))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == (
        f"olmd at {url} · strategy weighted · 3 node(s): 2 healthy, 1 down · 0 queued"
    )
    header = lines[2].split()
    assert header[:4] == ["NAME", "STATE", "WEIGHT", "SLOTS"]
    rows = {line.split()[0]: line for line in lines[3:6]}
    assert rows["a"].split()[1:3] == ["healthy", "2"]
    assert rows["b"].split()[1:3] == ["healthy", "1"]
    assert rows["dead"].split()[1:3] == ["down", "1"]
    assert "probe: " in rows["dead"] and "0/32" in rows["dead"]
    assert "SYNC" in lines
    sync = "\n".join(lines[lines.index("SYNC") :])
    running = lines[lines.index("SYNC") + 1]
    assert re.fullmatch(
        r"  sync running \(api\): pulling, [0-3]/4 pulls done, 1 pulling, "
        r"[0-2] waiting for a slot, unreachable: dead",
        running,
    ), running
    pull = lines[lines.index("SYNC") + 2]
    assert re.fullmatch(r"    [ab] \S+ +attempt 1: \d+% [\d.]+ [KM]?B/[\d.]+ MB", pull), pull
    assert "last run: running" in sync
    assert "nightly sync off; window 02:00-06:00 UTC+8" in sync
    assert "manifest: none written yet" in sync


async def test_status_json_and_watch(olmd_syncing, capsys) -> None:
    server, config = olmd_syncing
    url = str(server.make_url("")).rstrip("/")
    code, out, _ = await run_cli(capsys, "--config", str(config), "status", "--url", url, "--json")
    assert code == 0
    status = json.loads(out)
    assert status["url"] == url
    states = {n["name"]: n["state"] for n in status["nodes"]["nodes"]}
    assert states == {"a": "healthy", "b": "healthy", "dead": "down"}
    assert status["sync"]["running"] is True
    assert status["sync"]["schedule"]["window"] == "02:00-06:00 UTC+8"
    argv = ["status", "--url", url, "--json", "--watch", "0.05", "--count", "3"]
    code, out, _ = await run_cli(capsys, *argv, "--config", str(config))
    assert code == 0
    frames = [json.loads(line) for line in out.splitlines()]
    assert len(frames) == 3 and all(f["sync"]["running"] for f in frames)
    code, out, _ = await run_cli(capsys, "status", "--url", url, "--watch", "0.05", "--count", "2")
    assert out.count(f"olmd at {url}") == 2


async def test_status_without_the_token_or_the_daemon_says_why(
    olmd_syncing, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = olmd_syncing
    url = str(server.make_url("")).rstrip("/")
    monkeypatch.setenv("OLMD_ADMIN_TOKEN", "wrong")
    code, out, err = await run_cli(capsys, "status", "--url", url)
    assert (code, out) == (1, "")
    assert "/admin/nodes answered HTTP 403: this route needs the admin token" in err
    code, _, err = await run_cli(capsys, "status", "--url", "http://127.0.0.1:9")
    assert code == 1 and "http://127.0.0.1:9/admin/" in err


@pytest.fixture
async def one_node() -> AsyncIterator[list[tuple[str, int, Emulator]]]:
    node = Emulator(EmulatorConfig(name="a", models=["llama3.1:8b"]))
    await node.start()
    try:
        yield [("a", 1, node)]
    finally:
        await node.stop()


def _with_a_tenant(nodes: list[tuple[str, int, Emulator]], tmp_path: Path) -> Path:
    data = settings_dict(nodes)
    data["tenants"] = [{"name": "chat", "requests_per_minute": 60}]
    data["server"] |= {"tenant_header": "X-Team", "trusted_proxies": ["127.0.0.1/32"]}
    data["usage"] = {"record": str(tmp_path / "usage.json")}
    return write_settings(tmp_path / "settings.toml", data)


async def test_status_and_usage_on_loopback_without_a_token(
    one_node, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No admin token anywhere: the read-only views answer on loopback, as /ui does."""
    monkeypatch.delenv("OLMD_ADMIN_TOKEN", raising=False)
    config = _with_a_tenant(one_node, tmp_path)
    async with running_olmd(load_settings(config)) as server:
        url = str(server.make_url("")).rstrip("/")
        code, out, err = await run_cli(capsys, "status", "--url", url, "--config", str(config))
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].startswith(f"olmd at {url} · strategy weighted · 1 node(s): 1 healthy")
        assert lines[3].split()[:3] == ["a", "healthy", "1"]
        assert "  sync idle" in lines
        code, out, err = await run_cli(capsys, "usage", "--url", url, "--config", str(config))
        assert code == 0, err
        assert [line.split()[:2] for line in out.splitlines()[3:5]] == [
            ["chat", "interactive"],
            ["default", "interactive"],
        ]


async def test_status_and_usage_with_a_token_set_and_none_given_are_refused(
    one_node, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLMD_ADMIN_TOKEN", TOKEN)
    config = _with_a_tenant(one_node, tmp_path)
    async with running_olmd(load_settings(config)) as server:
        monkeypatch.delenv("OLMD_ADMIN_TOKEN")  # the daemon has one; the command line not
        url = str(server.make_url("")).rstrip("/")
        code, out, err = await run_cli(capsys, "status", "--url", url, "--config", str(config))
        assert (code, out) == (1, "")
        assert "/admin/nodes answered HTTP 403: this route needs the admin token" in err
        code, out, err = await run_cli(capsys, "usage", "--url", url, "--config", str(config))
        assert (code, out) == (1, "")
        assert "/admin/usage answered HTTP 403: this route needs the admin token" in err
        monkeypatch.setenv("OLMD_ADMIN_TOKEN", TOKEN)  # and with it, it answers
        code, out, err = await run_cli(capsys, "status", "--url", url, "--config", str(config))
        assert code == 0 and out.startswith(f"olmd at {url}"), err
