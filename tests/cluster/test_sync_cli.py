"""``olmd sync`` with the cluster on: it takes the same lease, and ``--status`` tells the
fleet's story from the shared record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.cluster.client import Cluster
from daemon.cluster.lease import Lease
from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.settings import ClusterSettings
from tests.helpers import RedisServer, run_cli
from tests.sync.support import make_settings


@pytest.fixture
def config(tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OLMD_REDIS_URL", redis_server.url)

    def write(emu: Emulator) -> Path:
        settings = make_settings(tmp_path, [("n1", emu)], models=["llama3.1:8b"], fallback=[])
        data = settings.model_dump(mode="json", include={"services", "jobs"})
        data["cluster"] = {"enabled": True, "name": "console"}
        path = tmp_path / "settings.json"
        path.write_text(json.dumps(data))
        return path

    return write


async def test_olmd_sync_takes_the_lease_and_status_shows_the_fleet(
    config, redis_server: RedisServer, capsys
) -> None:
    async with Emulator(EmulatorConfig(name="n1", models=[], pull_size=10_000)) as emu:
        path = config(emu)
        other = Cluster(ClusterSettings(name="gw-b"), redis_server.url)
        try:
            held = await Lease.acquire(other, "sync", seconds=30)
            code, _, err = await run_cli(capsys, "sync", "--ignore-window", "--config", str(path))
            assert code == 1 and "gw-b holds the sync lease" in err
            assert "/api/pull" not in emu.state.stats.requests
            await held.close()

            code, out, _ = await run_cli(capsys, "sync", "--ignore-window", "--config", str(path))
            assert code == 0, out
            assert json.loads(out)["counts"] == {"pulled": 1}

            code, out, _ = await run_cli(capsys, "sync", "--status", "--config", str(path))
            assert code == 0
            status = json.loads(out)
            assert status["cluster"]["connected"] is True
            assert status["cluster"]["last_run_by"] == "console"
            assert status["state"]["last_outcome"] == "ok" and status["state"]["fence"] == 2
            assert status["manifest"]["fence"] == 2 and status["blocked"] is None

            await redis_server.stop()
            code, out, _ = await run_cli(capsys, "sync", "--status", "--config", str(path))
            assert code == 1
            assert "Redis does not answer" in json.loads(out)["blocked"]
            code, _, err = await run_cli(capsys, "sync", "--ignore-window", "--config", str(path))
            assert code == 1 and "Redis does not answer" in err
        finally:
            await other.stop()
    assert emu.state.stats.requests["/api/pull"] == 1
