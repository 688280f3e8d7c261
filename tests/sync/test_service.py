"""The sync service (daemon.sync.service) and ``olmd sync``, against emulated Ollama nodes on
loopback: the lock, the state file, metrics, progress, stopping, the command line.

The wall clock is fake (``FakeNow``: a chosen instant that advances with real time), so
window decisions are deterministic; nothing here sleeps for more than a fraction of a
second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import datetime, timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from daemon.cli import sync as sync_cli
from daemon.cli.live import PullRates, sync_lines
from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.metrics import SyncMetrics
from daemon.settings import Settings
from daemon.sync import engine as sync_engine
from daemon.sync.plan import SyncProgress
from daemon.sync.scheduler import cron_trigger, missed_run
from daemon.sync.service import SyncBusy, SyncOptions, SyncService, run_sync, stop_grace
from daemon.sync.state import SyncLock, lock_path, read_state, state_path
from tests.sync.support import (
    IN_WINDOW,
    PROJECT_ROOT,
    SMALL_PULL,
    UTC8,
    FakeNow,
    entry_in,
    make_settings,
    manifest_of,
    pulls,
)

pytestmark = pytest.mark.usefixtures("captured_logs")


# -- lock, state, metrics, service ------------------------------------------------------


async def test_a_held_lock_refuses_a_second_sync(nodes, tmp_path):
    a, _ = nodes
    settings = make_settings(tmp_path, [("a", a)])
    with SyncLock(lock_path(settings.jobs.ollama_sync.manifest_path)):
        with pytest.raises(SyncBusy, match="another sync is running"):
            await run_sync(settings, SyncOptions(), now=FakeNow(IN_WINDOW))
        # A dry run changes nothing, so it needs no lock.
        await run_sync(settings, SyncOptions(dry_run=True), now=FakeNow(IN_WINDOW))
    assert pulls(a) == 0


async def test_state_file_records_runs_and_full_ones_separately(nodes, tmp_path):
    a, _ = nodes
    settings = make_settings(tmp_path, [("a", a)], fallback=[])
    path = state_path(settings.jobs.ollama_sync.manifest_path)
    await run_sync(settings, SyncOptions(no_download=True), now=FakeNow(IN_WINDOW))
    state = read_state(path)
    assert state.last_outcome == "ok"
    assert state.last_success_at is not None
    assert state.last_full_started_at is None  # --no-download is not the window's sync
    await run_sync(settings, SyncOptions(skip_existing=True), now=FakeNow(IN_WINDOW))
    state = read_state(path)
    assert state.last_full_started_at is not None
    assert abs(state.last_full_started_at - IN_WINDOW) < timedelta(seconds=5)


async def test_metrics_after_a_run(nodes, tmp_path):
    a, b = nodes
    registry = CollectorRegistry()
    metrics = SyncMetrics(registry)
    settings = make_settings(tmp_path, [("a", a), ("b", b)])
    await run_sync(
        settings, SyncOptions(skip_existing=True), now=FakeNow(IN_WINDOW), metrics=metrics
    )

    def value(name: str, **labels: str) -> float:
        sample = registry.get_sample_value(name, labels)
        assert sample is not None, name
        return sample

    assert value("olmd_sync_pulls_total", node="a", result="pulled") == 2
    assert value("olmd_sync_pulls_total", node="b", result="pulled") == 1
    assert value("olmd_sync_pulled_bytes_total", node="a") == 2 * SMALL_PULL["pull_size"]
    assert value("olmd_sync_models_present", node="a") == 3
    assert value("olmd_sync_drift_models") == 0
    assert value("olmd_sync_last_success_timestamp_seconds") > 0
    assert value("olmd_sync_last_run_timestamp_seconds") > 0
    assert value("olmd_sync_last_duration_seconds") > 0


async def test_service_refuses_a_second_start_and_reports_progress(tmp_path):
    config = EmulatorConfig(models=[], pull_size=10_000_000, pull_speed=2_000_000)
    async with Emulator(config) as emu:
        settings = make_settings(tmp_path, [("a", emu)], models=["llama3.1:8b"], fallback=[])
        service = SyncService(settings, SyncMetrics(CollectorRegistry()), now=FakeNow(IN_WINDOW))
        assert await service.start(SyncOptions())
        assert not await service.start(SyncOptions())  # 409 at the admin API
        with pytest.raises(SyncBusy):  # and the CLI meets the lock
            await run_sync(settings, SyncOptions(), now=FakeNow(IN_WINDOW))
        for _ in range(50):
            item = service.status()["progress"]["nodes"].get("a", {}).get("llama3.1:8b", {})
            if item.get("completed"):
                break
            await asyncio.sleep(0.02)
        status = json.loads(json.dumps(service.status()))  # JSON-compatible
        assert status["running"] is True
        assert status["trigger"] == "api"
        assert status["progress"]["phase"] == "pulling"
        assert status["progress"]["nodes"]["a"]["llama3.1:8b"]["total"] > 0
        await service.stop()
        assert not service.running
    last = service.status()["last_result"]
    assert last["outcomes"][0]["status"] == "deferred"
    assert "olmd is stopping" in last["outcomes"][0]["error"]
    assert service.state().last_outcome == "failed"
    assert await service.start(SyncOptions(dry_run=True))  # free again
    await service.wait()


# -- the command line -------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="olmd")
    parser.add_argument("--config")
    sync_cli.register(parser.add_subparsers(dest="command"))
    return parser


async def _cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    # In a thread: the command runs its own event loop, while ours serves the emulators.
    with capture_logs():
        return int(await asyncio.to_thread(args.func, args))


async def test_cli_exit_codes_and_json_in_a_pipe(nodes, tmp_path, capsys):
    a, b = nodes
    settings_file = tmp_path / "settings.json"
    data = make_settings(tmp_path, [("a", a), ("b", b)]).model_dump(
        mode="json", include={"services", "jobs"}
    )
    settings_file.write_text(json.dumps(data))
    config = ["--config", str(settings_file)]

    assert await _cli(["sync", "--no-download", *config]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True
    assert out["counts"] == {"present": 3, "missing": 3}

    a.state.update({"unavailable": ["ghost:1b"]})
    argv = ["sync", "--models", "ghost:1b", "--ignore-window", *config]
    assert await _cli([*argv, "--host", "b"]) == 0  # only node a's registry lacks it
    assert json.loads(capsys.readouterr().out)["counts"] == {"pulled": 1}
    assert await _cli([*argv, "--host", "a"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False
    assert out["outcomes"][0]["status"] == "failed"

    assert await _cli(["sync", "--models", "bad;name", *config]) == 2
    assert "invalid model name" in capsys.readouterr().err
    assert await _cli(["sync", "--host", "nope", *config]) == 2
    assert "matches no configured node" in capsys.readouterr().err
    assert await _cli(["sync", "--dry-run", *config]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"][0]["action"] == "pull"
    # Planned pulls are neither done nor failed.
    assert (out["ok"], out["counts"]) == (True, {"planned": 6})

    # A dry run exits 1 only when a node could not be reached.
    data["services"]["ollama"]["nodes"].append({"name": "gone", "host": "127.0.0.1", "port": 9})
    settings_file.write_text(json.dumps(data))
    assert await _cli(["sync", "--dry-run", *config]) == 1
    out = json.loads(capsys.readouterr().out)
    assert (out["ok"], out["counts"]) == (False, {"planned": 6, "failed": 3})


def test_the_live_view_lines():
    snapshot = {
        "phase": "pulling",
        "nodes": {
            "a": {
                "llama3.1:8b": {"action": "pull", "state": "pulling", "status": "pulling 8eeb",
                                "completed": 1_200_000_000, "total": 4_700_000_000},
                "qwen3:8b": {"action": "pull", "state": "done", "result": "pulled"},
                "qwen3:4b": {"action": "pull", "state": "queued"},
            },
            "b": {"llama3.1:8b": {"action": "pull", "state": "waiting", "attempt": 1,
                                  "error": "b: HTTP 500"}},
        },
    }  # fmt: skip
    now = [100.0]
    rates = PullRates(clock=lambda: now[0])
    sync_lines(snapshot, rates, 3.0)
    now[0] += 2
    snapshot["nodes"]["a"]["llama3.1:8b"]["completed"] = 1_300_000_000
    pulling, waiting, run = sync_lines(snapshot, rates, 5.0)
    assert pulling.startswith("pulling a llama3.1:8b   27% ▕█████")
    assert "1.3 GB/4.7 GB" in pulling and "50.0 MB/s" in pulling and "1m08s left" in pulling
    assert waiting == "retry   b llama3.1:8b  after attempt 1: b: HTTP 500"
    assert run == (
        "sync pulling · 1/4 pulls done · 1 waiting for a slot · 1.3 GB/4.7 GB · 50.0 MB/s · 5s"
    )
    assert sync_lines({"phase": "inventory", "nodes": {}}, rates, 0.4, fancy=False) == [
        "sync inventory · 0/0 pulls done · 0s"
    ]
    assert SyncProgress().snapshot() == {"phase": "starting", "nodes": {}}


async def test_summary_table_lists_every_action(nodes, tmp_path):
    a, b = nodes
    settings = make_settings(tmp_path, [("a", a), ("b", b)])
    result = await run_sync(settings, SyncOptions(skip_existing=True), now=FakeNow(IN_WINDOW))
    table = sync_cli.summary_table(result).splitlines()
    assert table[0].split() == [
        "NODE", "MODEL", "ACTION", "STATUS", "TRIES", "SECONDS", "DIGEST", "NOTE",
    ]  # fmt: skip
    assert any(line.split()[:4] == ["a", "qwen3:8b", "pull", "pulled"] for line in table)
    assert any(line.split()[:4] == ["a", "llama3.1:8b", "skip", "skipped"] for line in table)
    assert table[-2] == "ok: 3 pulled, 3 skipped"
    assert table[-1].startswith("manifest: ")
    assert "(0 model(s) with digest drift)" in table[-1]


async def test_progress_is_reported_while_pulling(tmp_path):
    config = EmulatorConfig(models=[], pull_size=600_000, pull_speed=2_000_000)
    async with Emulator(config) as emu:
        settings = make_settings(tmp_path, [("a", emu)], models=["llama3.1:8b"], fallback=[])
        progress = SyncProgress()
        seen: list[int] = []
        run = asyncio.create_task(
            run_sync(settings, SyncOptions(), now=FakeNow(IN_WINDOW), progress=progress)
        )
        while not run.done():
            item = progress.snapshot()["nodes"].get("a", {}).get("llama3.1:8b", {})
            seen.append(item.get("completed", 0))
            await asyncio.sleep(0.03)
        result = await run
    assert result.ok
    assert any(0 < n < 600_000 for n in seen)  # partial progress was visible mid-pull
    assert progress.snapshot()["phase"] == "done"
    assert progress.snapshot()["nodes"]["a"]["llama3.1:8b"]["result"] == "pulled"


async def test_a_sync_stopped_by_the_daemon_writes_its_manifest_and_is_caught_up(
    tmp_path, monkeypatch
):
    config = EmulatorConfig(models=[], pull_size=10_000_000, pull_speed=1_000_000)
    async with Emulator(config) as emu:
        data = make_settings(
            tmp_path, [("a", emu)], models=["llama3.1:8b"], fallback=[]
        ).model_dump(mode="json", include={"services", "jobs"})
        data["services"]["ollama"]["health_timeout"] = 0.4
        settings = Settings(**data)
        # The grace covers the final inventory (tags, then version, each up to the
        # health timeout) with a margin; 10 s flat used to equal the default timeout.
        assert stop_grace(settings) > 2 * 0.4
        default = Settings().services.ollama.health_timeout
        assert stop_grace(Settings()) > 2 * default

        inventory_all = sync_engine._inventory_all
        calls = 0

        async def slow_final_inventory(session: Any, targets: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls > 1:  # the final one: as slow as the health timeout allows
                await asyncio.sleep(0.6)
            return await inventory_all(session, targets)

        monkeypatch.setattr(sync_engine, "_inventory_all", slow_final_inventory)
        service = SyncService(settings, now=FakeNow(IN_WINDOW))  # starts at 03:00
        assert await service.start(SyncOptions(), trigger="schedule")
        for _ in range(100):
            item = service.status()["progress"]["nodes"].get("a", {}).get("llama3.1:8b", {})
            if item.get("completed"):
                break
            await asyncio.sleep(0.02)
        await service.stop()  # olmd is stopping, mid-pull
        assert not service.running
    assert service.last_result is not None
    assert service.status()["last_error"] is None  # not cancelled: it ran to its end
    manifest = manifest_of(settings)
    entry = entry_in(manifest, "a", "llama3.1:8b")
    assert entry.status == "deferred"
    assert "olmd is stopping" in str(entry.last_error)
    state = service.state()
    assert state.last_outcome == "failed"
    assert state.last_full_started_at is None  # cut short: not the window's sync
    window = settings.services.ollama.download.allowed_window
    at_0310 = IN_WINDOW + timedelta(minutes=10)
    missed = missed_run(window, cron_trigger(settings), state, at_0310)
    assert missed == datetime(2024, 3, 10, 3, 0, tzinfo=UTC8)  # a restart catches up


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
async def test_olmd_sync_stopped_by_a_signal_records_the_run_and_exits_1(tmp_path, sig):
    import signal
    import sys

    config = EmulatorConfig(models=[], pull_size=50_000_000, pull_speed=1_000_000)
    async with Emulator(config) as emu:
        settings = make_settings(tmp_path, [("a", emu)], models=["llama3.1:8b"], fallback=[])
        settings_file = tmp_path / "settings.json"
        data = settings.model_dump(mode="json", include={"services", "jobs"})
        settings_file.write_text(json.dumps(data))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon", "sync", "--ignore-window",
            "--config", str(settings_file),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            cwd=PROJECT_ROOT,
        )  # fmt: skip
        try:
            for _ in range(500):
                if emu.state.stats.pulls_in_flight:
                    break
                await asyncio.sleep(0.02)
            assert emu.state.stats.pulls_in_flight
            proc.send_signal(getattr(signal, sig))
            out, _ = await asyncio.wait_for(proc.communicate(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 1
    assert json.loads(out)["outcomes"][0]["status"] == "deferred"
    entry = entry_in(manifest_of(settings), "a", "llama3.1:8b")
    assert entry.status == "deferred"
    assert f"olmd sync got {sig}" in str(entry.last_error)
    state = read_state(state_path(settings.jobs.ollama_sync.manifest_path))
    assert state.last_outcome == "failed"
