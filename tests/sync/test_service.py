"""Tests for the sync engine (daemon.sync.service*), against emulated Ollama nodes on loopback.

The wall clock is fake (``FakeNow``: a chosen instant that advances with real time), so
window decisions are deterministic; nothing here sleeps for more than a fraction of a
second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from structlog.testing import capture_logs

from daemon.cli import sync as sync_cli
from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.metrics import SyncMetrics
from daemon.ports import PullProgress, PullTarget
from daemon.settings import Settings
from daemon.sync import engine as sync_engine
from daemon.sync.manifest import Manifest, ModelEntry, NodeEntry, read_manifest
from daemon.sync.plan import SyncProgress
from daemon.sync.scheduler import cron_trigger, missed_run
from daemon.sync.service import SyncBusy, SyncOptions, SyncService, run_sync, stop_grace
from daemon.sync.state import SyncLock, lock_path, read_state, state_path

UTC8 = timezone(timedelta(hours=8))
# 03:00 in the default window "02:00-06:00 UTC+8".
IN_WINDOW = datetime(2024, 3, 10, 3, 0, tzinfo=UTC8)
MODELS = ["llama3.1:8b", "qwen3:8b"]
FALLBACK = ["mistral-nemo:12b"]
SMALL_PULL = {"pull_size": 20_000, "pull_speed": 0.0}
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class FakeNow:
    """A wall clock that starts at ``start`` and advances with real (monotonic) time."""

    def __init__(self, start: datetime) -> None:
        self.start = start
        self._t0 = time.monotonic()

    def __call__(self) -> datetime:
        return self.start + timedelta(seconds=time.monotonic() - self._t0)


@pytest.fixture(autouse=True)
def _captured_logs() -> Iterator[None]:
    """Log events go to a list, not to a stream an earlier test's CLI run configured
    (and pytest has since closed)."""
    with capture_logs():
        yield


def make_settings(
    tmp_path: Path,
    nodes: list[tuple[str, Emulator]],
    *,
    download: dict[str, Any] | None = None,
    job: dict[str, Any] | None = None,
    models: list[str] | None = None,
    fallback: list[str] | None = None,
) -> Settings:
    return Settings(
        services={
            "ollama": {
                "health_timeout": 2.0,
                "baseline_models": MODELS if models is None else models,
                "fallback_models": FALLBACK if fallback is None else fallback,
                "nodes": [
                    {"name": name, "host": "127.0.0.1", "port": emu.port} for name, emu in nodes
                ],
                "download": {
                    "allowed_window": "02:00-06:00 UTC+8",
                    "max_parallel_jobs": 2,
                    "stall_timeout": 5.0,
                    "retry": {"max_attempts": 3, "backoff_seconds": 0.01},
                    **(download or {}),
                },
            }
        },
        jobs={
            "ollama_sync": {"manifest_path": str(tmp_path / "m" / "manifest.json"), **(job or {})}
        },
    )


def manifest_of(settings: Settings) -> Manifest:
    manifest = read_manifest(settings.jobs.ollama_sync.manifest_path)
    assert manifest is not None
    return manifest


def node_in(manifest: Manifest | None, name: str) -> NodeEntry:
    assert manifest is not None
    node = manifest.node(name)
    assert node is not None
    return node


def entry_in(manifest: Manifest | None, node: str, model: str) -> ModelEntry:
    entry = node_in(manifest, node).model(model)
    assert entry is not None
    return entry


def pulls(emu: Emulator) -> int:
    return emu.state.stats.requests.get("/api/pull", 0)


@pytest.fixture
async def nodes() -> AsyncIterator[tuple[Emulator, Emulator]]:
    """Node a holds llama3.1:8b; node b holds llama3.1:8b and qwen3:8b."""
    a = Emulator(EmulatorConfig(name="a", models=["llama3.1:8b"], **SMALL_PULL))
    b = Emulator(EmulatorConfig(name="b", models=["llama3.1:8b", "qwen3:8b"], **SMALL_PULL))
    async with a, b:
        yield a, b


def by_key(result: Any) -> dict[tuple[str, str], Any]:
    return {(o.node, o.model): o for o in result.outcomes}


# -- the three modes ------------------------------------------------------------------


async def test_dry_run_prints_the_plan_and_writes_nothing(nodes, tmp_path):
    a, b = nodes
    settings = make_settings(tmp_path, [("a", a), ("b", b)])
    result = await run_sync(
        settings, SyncOptions(dry_run=True, skip_existing=True), now=FakeNow(IN_WINDOW)
    )
    plan = {(p.node, p.model): p.action for p in result.plan}
    assert plan == {
        ("a", "llama3.1:8b"): "skip",
        ("b", "llama3.1:8b"): "skip",
        ("a", "qwen3:8b"): "pull",
        ("b", "qwen3:8b"): "skip",
        ("a", "mistral-nemo:12b"): "pull",
        ("b", "mistral-nemo:12b"): "pull",
    }
    assert pulls(a) == pulls(b) == 0
    assert result.manifest is None
    assert not (tmp_path / "m").exists()  # no manifest, lock or state file, not even the folder
    assert "dry run: nothing was pulled or written" in sync_cli.summary_table(result)


async def test_no_download_records_digests_and_pulls_nothing(nodes, tmp_path):
    a, b = nodes
    settings = make_settings(tmp_path, [("a", a), ("b", b)])
    result = await run_sync(settings, SyncOptions(no_download=True), now=FakeNow(IN_WINDOW))
    assert pulls(a) == pulls(b) == 0
    assert result.ok  # nothing was to be pulled, so "missing" is a finding, not a failure
    manifest = manifest_of(settings)
    assert manifest.window == "02:00-06:00 UTC+8"
    assert manifest.options["no_download"] is True
    node_a = node_in(manifest, "a")
    assert node_a.reachable
    assert node_a.ollama_version == "0.12.0"
    llama = entry_in(manifest, "a", "llama3.1:8b")
    assert llama.status == "present"
    assert llama.digest is not None
    assert llama.digest.startswith("sha256:")
    assert len(llama.digest) == 7 + 64
    assert llama.size is not None
    assert llama.modified_at is not None
    assert entry_in(manifest, "a", "qwen3:8b").status == "missing"
    assert entry_in(manifest, "a", "qwen3:8b").digest is None
    assert entry_in(manifest, "b", "qwen3:8b").status == "present"
    assert manifest.drift == []


async def test_skip_existing_pulls_only_what_is_missing(nodes, tmp_path):
    a, b = nodes
    settings = make_settings(tmp_path, [("a", a), ("b", b)])
    result = await run_sync(settings, SyncOptions(skip_existing=True), now=FakeNow(IN_WINDOW))
    assert result.ok, result.to_dict()
    assert pulls(a) == 2  # qwen3:8b and mistral-nemo:12b
    assert pulls(b) == 1  # mistral-nemo:12b
    outcome = by_key(result)
    assert outcome[("a", "llama3.1:8b")].status == "skipped"
    assert outcome[("a", "qwen3:8b")].status == "pulled"
    assert outcome[("b", "mistral-nemo:12b")].status == "pulled"
    manifest = manifest_of(settings)
    pulled = entry_in(manifest, "a", "qwen3:8b")
    assert pulled.status == "pulled"
    assert pulled.attempts == 1
    assert pulled.digest == entry_in(manifest, "b", "qwen3:8b").digest  # same model, same digest
    skipped = entry_in(manifest, "a", "llama3.1:8b")
    assert skipped.status == "skipped"
    assert skipped.digest is not None


async def test_without_skip_existing_every_model_is_pulled(nodes, tmp_path):
    a, b = nodes
    settings = make_settings(tmp_path, [("a", a), ("b", b)], fallback=[])
    result = await run_sync(settings, SyncOptions(), now=FakeNow(IN_WINDOW))
    assert result.ok
    assert pulls(a) == pulls(b) == 2


async def test_models_and_host_narrow_the_run_and_keep_other_nodes(nodes, tmp_path):
    a, b = nodes
    settings = make_settings(tmp_path, [("a", a), ("b", b)])
    await run_sync(settings, SyncOptions(no_download=True), now=FakeNow(IN_WINDOW))
    result = await run_sync(
        settings, SyncOptions(models=("qwen3:8b",), host="a"), now=FakeNow(IN_WINDOW)
    )
    assert [(o.node, o.model) for o in result.outcomes] == [("a", "qwen3:8b")]
    assert pulls(a) == 1
    assert pulls(b) == 0
    manifest = manifest_of(settings)
    assert node_in(manifest, "b") is not None  # untouched by --host, carried over
    assert entry_in(manifest, "a", "qwen3:8b").status == "pulled"
    with pytest.raises(ValueError, match="matches no configured node"):
        await run_sync(settings, SyncOptions(host="nope"), now=FakeNow(IN_WINDOW))


async def test_a_models_run_keeps_the_failures_of_models_it_did_not_handle(tmp_path):
    config = EmulatorConfig(models=[], unavailable=["ghost:1b"], **SMALL_PULL)
    async with Emulator(config) as a, Emulator(EmulatorConfig(models=[], **SMALL_PULL)) as b:
        settings = make_settings(
            tmp_path, [("a", a), ("b", b)], models=["qwen3:8b", "ghost:1b"], fallback=[]
        )
        await run_sync(settings, SyncOptions(), now=FakeNow(IN_WINDOW))
        before = entry_in(manifest_of(settings), "a", "ghost:1b")
        assert before.status == "failed"
        assert "file does not exist" in str(before.last_error)
        first_qwen = entry_in(manifest_of(settings), "a", "qwen3:8b")
        later = FakeNow(IN_WINDOW + timedelta(minutes=30))
        result = await run_sync(settings, SyncOptions(models=("qwen3:8b",)), now=later)
    assert result.ok
    assert {(o.node, o.model) for o in result.outcomes} == {("a", "qwen3:8b"), ("b", "qwen3:8b")}
    manifest = manifest_of(settings)
    assert entry_in(manifest, "a", "ghost:1b") == before  # last night's failure, unchanged
    assert entry_in(manifest, "b", "ghost:1b").status == "present"  # b holds it: live list
    qwen = entry_in(manifest, "a", "qwen3:8b")
    assert qwen.status == "pulled"
    assert qwen.modified_at is not None
    assert first_qwen.modified_at is not None
    assert qwen.modified_at > first_qwen.modified_at  # updated by this run
    assert node_in(manifest, "a").reachable
    assert not node_in(manifest, "a").stale


def test_options_refuse_bad_model_names_and_unknown_keys():
    with pytest.raises(ValidationError, match="invalid model name"):
        SyncOptions(models=("llama3; rm -rf /",))
    with pytest.raises(ValidationError):
        SyncOptions.model_validate({"dry_run": True, "force": True})
    assert SyncOptions(models=("Llama3",)).models == ("llama3:latest",)


# -- retries, stalls, parallelism, the window -----------------------------------------


async def test_two_failed_pulls_then_success_with_the_waits_logged(tmp_path):
    fault = {"fault": "http500", "fault_routes": ["/api/pull"], "fault_count": 2}
    async with Emulator(EmulatorConfig(models=[], **SMALL_PULL, **fault)) as emu:
        settings = make_settings(tmp_path, [("a", emu)], models=["llama3.1:8b"], fallback=[])
        with capture_logs() as logs:
            result = await run_sync(settings, SyncOptions(), now=FakeNow(IN_WINDOW))
    assert result.ok, result.to_dict()
    (outcome,) = result.outcomes
    assert outcome.status == "pulled"
    assert outcome.attempts == 3
    retries = [e for e in logs if e["event"] == "sync.pull_retry"]
    assert [e["attempt"] for e in retries] == [1, 2]
    assert all(e["node"] == "a" and e["model"] == "llama3.1:8b" for e in retries)
    assert all("HTTP 500" in e["error"] for e in retries)
    first, second = (e["wait_seconds"] for e in retries)
    assert 0.008 <= first <= 0.012 < 0.016 <= second <= 0.024  # doubling, with ±20% jitter
    manifest = manifest_of(settings)
    assert entry_in(manifest, "a", "llama3.1:8b").attempts == 3


async def test_an_error_line_under_http_200_is_a_failure(tmp_path):
    fault = {"fault": "error_line", "fault_routes": ["/api/pull"], "fault_after": 2}
    async with Emulator(EmulatorConfig(models=[], **SMALL_PULL, **fault)) as emu:
        settings = make_settings(tmp_path, [("a", emu)], models=["llama3.1:8b"], fallback=[])
        result = await run_sync(settings, SyncOptions(), now=FakeNow(IN_WINDOW))
    (outcome,) = result.outcomes
    assert not result.ok
    assert outcome.status == "failed"
    assert outcome.attempts == 3
    assert "Ollama reported" in str(outcome.error)
    entry = entry_in(manifest_of(settings), "a", "llama3.1:8b")
    assert entry.status == "failed"
    assert "Ollama reported" in str(entry.last_error)


async def test_a_model_the_registry_lacks_fails_without_hiding_the_others(tmp_path):
    config = EmulatorConfig(models=[], unavailable=["ghost:1b"], **SMALL_PULL)
    async with Emulator(config) as emu:
        settings = make_settings(tmp_path, [("a", emu)], models=["ghost:1b", "qwen3:8b"])
        result = await run_sync(settings, SyncOptions(), now=FakeNow(IN_WINDOW))
    outcome = by_key(result)
    assert outcome[("a", "ghost:1b")].status == "failed"
    assert "file does not exist" in outcome[("a", "ghost:1b")].error
    assert outcome[("a", "qwen3:8b")].status == "pulled"
    assert outcome[("a", "mistral-nemo:12b")].status == "pulled"


async def test_a_stalled_pull_is_cancelled_and_retried(tmp_path):
    fault = {"fault": "stall", "fault_routes": ["/api/pull"], "fault_count": 1}
    async with Emulator(EmulatorConfig(models=[], **SMALL_PULL, **fault)) as emu:
        settings = make_settings(
            tmp_path, [("a", emu)], models=["llama3.1:8b"], fallback=[],
            download={"stall_timeout": 0.2},
        )  # fmt: skip
        with capture_logs() as logs:
            result = await run_sync(settings, SyncOptions(), now=FakeNow(IN_WINDOW))
    (outcome,) = result.outcomes
    assert outcome.status == "pulled"
    assert outcome.attempts == 2
    (retry,) = [e for e in logs if e["event"] == "sync.pull_retry"]
    assert "no progress for 0.2 s" in retry["error"]


async def test_parallel_pulls_never_exceed_max_parallel_jobs(tmp_path):
    # Two node names on one emulator: its stats then measure the whole fleet at once.
    config = EmulatorConfig(models=[], pull_size=300_000, pull_speed=3_000_000)
    async with Emulator(config) as emu:
        settings = make_settings(
            tmp_path, [("a", emu), ("b", emu)], models=["m1:1b", "m2:1b", "m3:1b"], fallback=[],
            download={"max_parallel_jobs": 2},
        )  # fmt: skip
        result = await run_sync(settings, SyncOptions(), now=FakeNow(IN_WINDOW))
    assert result.ok
    assert pulls(emu) == 6
    assert emu.state.stats.max_pulls_in_flight == 2


async def test_at_window_close_running_pulls_are_deferred(tmp_path):
    # 0.3 s before the window closes, a pull that needs 10 s, and a second one queued.
    config = EmulatorConfig(models=[], pull_size=10_000_000, pull_speed=1_000_000)
    async with Emulator(config) as emu:
        settings = make_settings(
            tmp_path, [("a", emu)], models=["llama3.1:8b", "qwen3:8b"], fallback=[],
            download={"max_parallel_jobs": 1},
        )  # fmt: skip
        now = FakeNow(datetime(2024, 3, 10, 5, 59, 59, 700_000, tzinfo=UTC8))
        started = time.monotonic()
        result = await run_sync(settings, SyncOptions(), now=now)
        assert time.monotonic() - started < 2
        await asyncio.sleep(0.1)  # let the emulator see the disconnect
        assert emu.state.stats.pulls_in_flight == 0
    assert pulls(emu) == 1  # the queued pull never started
    outcome = by_key(result)
    running, queued = outcome[("a", "llama3.1:8b")], outcome[("a", "qwen3:8b")]
    assert running.status == "deferred"
    assert "during attempt 1" in running.error
    assert queued.status == "deferred"
    assert "before the pull started" in queued.error
    assert "the window closed at 06:00 UTC+8" in running.error
    assert result.stopped is not None
    assert not result.ok
    manifest = manifest_of(settings)
    assert entry_in(manifest, "a", "llama3.1:8b").status == "deferred"
    # The window is over: this was its sync, nothing is caught up before the next one.
    state = read_state(state_path(settings.jobs.ollama_sync.manifest_path))
    assert state.last_full_started_at is not None


async def test_outside_the_window_pulls_are_deferred_unless_ignored(nodes, tmp_path):
    a, _ = nodes
    settings = make_settings(tmp_path, [("a", a)], fallback=[])
    at_seven = FakeNow(datetime(2024, 3, 10, 7, 0, tzinfo=UTC8))
    result = await run_sync(settings, SyncOptions(), now=at_seven)
    assert pulls(a) == 0
    assert {o.status for o in result.outcomes} == {"deferred"}
    assert "next opens 2024-03-11 02:00" in str(result.outcomes[0].error)
    result = await run_sync(settings, SyncOptions(ignore_window=True), now=at_seven)
    assert result.ok
    assert pulls(a) == 2


# -- the manifest: stale nodes, drift, kills ------------------------------------------


async def test_an_unreachable_node_keeps_its_last_entries_marked_stale(nodes, tmp_path):
    a, b = nodes
    settings = make_settings(tmp_path, [("a", a), ("b", b)])
    first = await run_sync(settings, SyncOptions(no_download=True), now=FakeNow(IN_WINDOW))
    await b.stop()
    later = FakeNow(IN_WINDOW + timedelta(minutes=30))
    result = await run_sync(settings, SyncOptions(no_download=True), now=later)
    assert not result.ok
    assert by_key(result)[("b", "qwen3:8b")].status == "failed"
    manifest = manifest_of(settings)
    node_b = node_in(manifest, "b")
    assert not node_b.reachable
    assert node_b.stale
    assert first.manifest is not None
    assert node_b.last_confirmed == first.manifest.generated_at
    assert entry_in(manifest, "b", "qwen3:8b").status == "present"  # last known, kept
    assert node_in(manifest, "a").stale is False
    path = settings.jobs.ollama_sync.manifest_path
    assert read_manifest(path.with_name(path.name + ".prev")) == first.manifest


class _StopAfterPull:
    """The real HTTP transport; stops ``emu`` once a pull on node ``victim`` finished."""

    def __init__(self, victim: str, emu: Emulator) -> None:
        self.inner = sync_engine._registry_transport("http")
        self.victim, self.emu = victim, emu

    async def pull(self, target: PullTarget, model: str, progress: PullProgress) -> None:
        await self.inner.pull(target, model, progress)
        if target.name == self.victim:
            await self.emu.stop()  # after its pull, before the final inventory

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_node_lost_before_the_final_inventory_keeps_its_pulls_unconfirmed(tmp_path):
    async with (
        Emulator(EmulatorConfig(models=[], **SMALL_PULL)) as a,
        Emulator(EmulatorConfig(models=["qwen3:8b"], **SMALL_PULL)) as b,
    ):
        settings = make_settings(
            tmp_path, [("a", a), ("b", b)], models=["llama3.1:8b", "qwen3:8b"], fallback=[]
        )
        await run_sync(settings, SyncOptions(no_download=True), now=FakeNow(IN_WINDOW))
        transport = _StopAfterPull("b", b)
        later = FakeNow(IN_WINDOW + timedelta(minutes=30))
        with capture_logs() as logs:
            result = await run_sync(
                settings,
                SyncOptions(skip_existing=True),
                now=later,
                transports=lambda _: transport,
            )
    assert (pulls(a), pulls(b)) == (2, 1)  # b: llama3.1:8b only, then it went away
    assert result.ok, result.to_dict()  # no failure was invented
    outcome = by_key(result)
    assert outcome[("b", "llama3.1:8b")].status == "pulled"
    assert "not confirmed: the final inventory failed" in str(outcome[("b", "llama3.1:8b")].error)
    assert outcome[("b", "qwen3:8b")].status == "skipped"
    for model in ("llama3.1:8b", "qwen3:8b"):
        assert outcome[("a", model)].status == "pulled"
        assert outcome[("a", model)].error is None
    assert any(e["event"] == "sync.final_inventory_failed" for e in logs)
    manifest = manifest_of(settings)
    node_b = node_in(manifest, "b")
    assert not node_b.reachable
    assert node_b.stale
    assert node_b.last_confirmed == result.started_at  # its first inventory, this run
    llama = entry_in(manifest, "b", "llama3.1:8b")
    assert llama.status == "pulled"  # this run's word, not the previous "missing"
    assert "not confirmed" in str(llama.last_error)
    qwen = entry_in(manifest, "b", "qwen3:8b")
    assert (qwen.status, qwen.digest is not None) == ("skipped", True)  # as first listed
    node_a = node_in(manifest, "a")
    assert (node_a.reachable, node_a.stale) == (True, False)
    assert entry_in(manifest, "a", "llama3.1:8b").last_error is None


async def test_drift_between_nodes_is_listed(tmp_path):
    odd = {"llama3.1:8b": "b" * 64}
    async with (
        Emulator(EmulatorConfig(models=["llama3.1:8b"])) as a,
        Emulator(EmulatorConfig(models=["llama3.1:8b"], digests=odd)) as b,
    ):
        settings = make_settings(tmp_path, [("a", a), ("b", b)])
        result = await run_sync(settings, SyncOptions(no_download=True), now=FakeNow(IN_WINDOW))
    assert result.manifest is not None
    (drift,) = result.manifest.drift
    assert drift.model == "llama3.1:8b"
    assert drift.digests["b"] == "sha256:" + "b" * 64 != drift.digests["a"]


async def test_a_sync_killed_between_write_and_rename_leaves_the_old_manifest(
    nodes, tmp_path, monkeypatch
):
    a, b = nodes
    settings = make_settings(tmp_path, [("a", a), ("b", b)])
    first = await run_sync(settings, SyncOptions(no_download=True), now=FakeNow(IN_WINDOW))
    path = settings.jobs.ollama_sync.manifest_path
    real_replace = os.replace

    def killed(src, dst):
        if Path(dst) == path:
            raise KeyboardInterrupt  # stands in for SIGKILL: nothing after it runs
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        await run_sync(settings, SyncOptions(skip_existing=True), now=FakeNow(IN_WINDOW))
    monkeypatch.undo()
    assert read_manifest(path) == first.manifest
    # The lock went with the "process"; the state file says the run never finished.
    assert read_state(state_path(path)).last_outcome == "running"
    with SyncLock(lock_path(path)):
        pass


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


def test_summary_table_and_progress_line():
    snapshot = {
        "phase": "pulling",
        "nodes": {
            "a": {
                "llama3.1:8b": {"action": "pull", "state": "pulling", "status": "pulling 8eeb",
                                "completed": 1_200_000_000, "total": 4_700_000_000},
                "qwen3:8b": {"action": "pull", "state": "done", "result": "pulled"},
            },
            "b": {"llama3.1:8b": {"action": "pull", "state": "waiting"}},
        },
    }  # fmt: skip
    line = sync_cli.progress_line(snapshot)
    assert line.startswith("sync pulling: 1/3 pulls done")
    assert "a llama3.1:8b 25% 1.2 GB/4.7 GB" in line
    assert "b llama3.1:8b waiting to retry" in line
    assert sync_cli.progress_line({"phase": "inventory", "nodes": {}}) == (
        "sync inventory: 0/0 pulls done"
    )
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


class _FlakyTransport:
    """Raises ValueError (not about the name) on its first pull, then succeeds."""

    def __init__(self) -> None:
        self.calls = 0

    async def pull(self, target: PullTarget, model: str, progress: PullProgress) -> None:
        self.calls += 1
        if self.calls == 1:
            raise ValueError("unexpected progress line")
        progress("success", 1, 1)

    async def aclose(self) -> None:
        pass


async def test_a_transports_value_error_is_retried_not_taken_for_a_bad_name(tmp_path):
    transport = _FlakyTransport()
    async with Emulator(EmulatorConfig(models=["llama3.1:8b"])) as emu:
        settings = make_settings(tmp_path, [("a", emu)], models=["llama3.1:8b"], fallback=[])
        result = await run_sync(
            settings, SyncOptions(), now=FakeNow(IN_WINDOW), transports=lambda _: transport
        )
    (outcome,) = result.outcomes
    assert (outcome.status, outcome.attempts) == ("pulled", 2)
    assert transport.calls == 2


async def test_a_bad_name_that_reaches_the_pulls_fails_before_any_transport(tmp_path, monkeypatch):
    # Options and settings refuse such names already; the pull step checks once more.
    monkeypatch.setattr(sync_engine, "select_models", lambda settings, options: ["a;b"])
    transport = _FlakyTransport()
    async with Emulator(EmulatorConfig(models=[])) as emu:
        settings = make_settings(tmp_path, [("a", emu)], models=["llama3.1:8b"], fallback=[])
        result = await run_sync(
            settings, SyncOptions(), now=FakeNow(IN_WINDOW), transports=lambda _: transport
        )
    (outcome,) = result.outcomes
    assert outcome.status == "failed"
    assert outcome.attempts == 0
    assert "a;b" in str(outcome.error)
    assert transport.calls == 0


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
