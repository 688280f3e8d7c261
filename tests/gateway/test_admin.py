"""The admin API of a running daemon: sync start, conflict, status; node drain."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.settings import load_settings
from tests.helpers import running_olmd, settings_dict, write_settings

TOKEN = "admin-token-for-tests"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def nodes() -> AsyncIterator[list[tuple[str, int, Emulator]]]:
    slow_pulls = {"pull_size": 400_000, "pull_speed": 1_000_000}
    a = Emulator(EmulatorConfig(name="a", models=["llama3.1:8b"], **slow_pulls))
    b = Emulator(EmulatorConfig(name="b", models=[], **slow_pulls))
    await a.start()
    await b.start()
    yield [("a", 1, a), ("b", 1, b)]
    await a.stop()
    await b.stop()


async def test_sync_through_the_admin_api(
    nodes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLMD_ADMIN_TOKEN", TOKEN)
    data = settings_dict(nodes)
    data["services"]["ollama"]["baseline_models"] = ["llama3.1:8b", "qwen3:0.6b"]
    manifest = tmp_path / "manifest.json"
    data["jobs"]["ollama_sync"]["manifest_path"] = str(manifest)
    settings = load_settings(write_settings(tmp_path / "s.toml", data))
    async with running_olmd(settings) as server, aiohttp.ClientSession() as http:
        sync_url = str(server.make_url("/admin/sync"))
        async with http.post(sync_url, json={"skip_existing": True}) as response:
            assert response.status == 403  # no token, no sync
        options = {"skip_existing": True, "ignore_window": True}
        async with http.post(sync_url, json=options, headers=ADMIN) as response:
            assert response.status == 202
            assert (await response.json())["running"] is True
        async with http.post(sync_url, json=options, headers=ADMIN) as response:
            assert response.status == 409
            assert "already running" in (await response.json())["error"]
        async with http.post(sync_url, json={"colour": "red"}, headers=ADMIN) as response:
            assert response.status in (400, 409)

        status: dict = {}
        for _ in range(200):  # at most 10 s
            async with http.get(sync_url, headers=ADMIN) as response:
                status = await response.json()
            if not status["running"] and status.get("last_result") is not None:
                break
            await asyncio.sleep(0.05)
        assert status["last_result"]["ok"] is True
    written = json.loads(manifest.read_text())
    by_node = {n["name"]: {m["name"]: m["status"] for m in n["models"]} for n in written["nodes"]}
    assert by_node["a"] == {"llama3.1:8b": "skipped", "qwen3:0.6b": "pulled"}
    assert by_node["b"] == {"llama3.1:8b": "pulled", "qwen3:0.6b": "pulled"}
    assert "qwen3:0.6b" in nodes[1][2].state.config.models


async def test_bad_sync_options_are_400(nodes, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OLMD_ADMIN_TOKEN", TOKEN)
    settings = load_settings(write_settings(tmp_path / "s.toml", settings_dict(nodes)))
    async with running_olmd(settings) as server, aiohttp.ClientSession() as http:
        url = str(server.make_url("/admin/sync"))
        for body in ({"colour": "red"}, {"models": ["x; rm -rf /"]}, {"host": "nowhere"}):
            async with http.post(url, json=body, headers=ADMIN) as response:
                assert response.status == 400, body
                assert (await response.json())["error"]
        async with http.post(url, data=b"{nope", headers=ADMIN) as response:
            assert response.status == 400


async def test_drain_and_undrain_a_node(nodes, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OLMD_ADMIN_TOKEN", TOKEN)
    settings = load_settings(write_settings(tmp_path / "s.toml", settings_dict(nodes)))
    async with running_olmd(settings) as server, aiohttp.ClientSession() as http:
        drain = str(server.make_url("/admin/nodes/a/drain"))
        async with http.post(drain, headers=ADMIN) as response:
            assert (await response.json())["state"] == "draining"
        generate = str(server.make_url("/api/generate"))
        body = {"model": "llama3.1:8b", "prompt": "x", "stream": False}
        async with http.post(generate, json=body) as response:
            # a was the only holder: draining leaves no node for the model, for now.
            assert response.status == 503
            assert response.headers["Retry-After"] == "5"
            assert "draining" in (await response.json())["error"]
        async with http.post(str(server.make_url("/admin/nodes/a/undrain")), headers=ADMIN) as r:
            assert (await r.json())["state"] == "healthy"
        async with http.post(generate, json=body) as response:
            assert response.status == 200
        async with http.post(str(server.make_url("/admin/nodes/zz/drain")), headers=ADMIN) as r:
            assert r.status == 404


async def test_an_ejected_node_shows_its_cooldown(nodes, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OLMD_ADMIN_TOKEN", TOKEN)
    a, b = nodes[0][2], nodes[1][2]
    b.state.update({"models": ["llama3.1:8b"]})
    a.state.update({"fault": "http500"})
    data = settings_dict(nodes, failures_to_eject=1, cooldown=30)
    settings = load_settings(write_settings(tmp_path / "s.toml", data))
    async with running_olmd(settings) as server, aiohttp.ClientSession() as http:
        body = {"model": "llama3.1:8b", "prompt": "x", "stream": False}
        async with http.post(str(server.make_url("/api/generate")), json=body) as response:
            assert response.status == 200  # failed over to b
            assert response.headers["X-Olmd-Node"] == "b"
        async with http.get(str(server.make_url("/admin/nodes")), headers=ADMIN) as response:
            listed = {n["name"]: n for n in (await response.json())["nodes"]}
    # A 500 for a model takes that model out on the node; the node serves the others.
    assert listed["a"]["state"] == "healthy"
    out = listed["a"]["models_out"]["llama3.1:8b"]
    assert 29 < out["cooldown_seconds"] <= 30
    assert "HTTP 500" in out["error"]
    assert listed["b"]["state"] == "healthy" and listed["b"]["models_out"] == {}
