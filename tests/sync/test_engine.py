"""The sync engine's runs (daemon.sync.engine, through daemon.sync.service), against emulated
Ollama nodes on loopback: the modes, retries, stalls, the window, the manifest it writes.

The wall clock is fake (``FakeNow``: a chosen instant that advances with real time), so
window decisions are deterministic; nothing here sleeps for more than a fraction of a
second.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from daemon.cli import sync as sync_cli
from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.ports import PullProgress, PullTarget
from daemon.sync import engine as sync_engine
from daemon.sync.manifest import read_manifest
from daemon.sync.service import SyncOptions, run_sync
from daemon.sync.state import SyncLock, lock_path, read_state, state_path
from tests.sync.support import (
    IN_WINDOW,
    SMALL_PULL,
    UTC8,
    FakeNow,
    by_key,
    entry_in,
    make_settings,
    manifest_of,
    node_in,
    pulls,
)

pytestmark = pytest.mark.usefixtures("captured_logs")


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


async def test_a_model_the_registry_lacks_is_not_retried(tmp_path):
    # The real backoff (20 s, doubling): a retry would take far longer than this test may.
    config = EmulatorConfig(models=[], unavailable=["ghost:1b"], **SMALL_PULL)
    async with Emulator(config) as emu:
        settings = make_settings(
            tmp_path, [("a", emu)], models=["ghost:1b"], fallback=[],
            download={"retry": {"max_attempts": 3, "backoff_seconds": 20}},
        )  # fmt: skip
        started = time.monotonic()
        with capture_logs() as logs:
            result = await run_sync(settings, SyncOptions(), now=FakeNow(IN_WINDOW))
        assert time.monotonic() - started < 5
    (outcome,) = result.outcomes
    assert (outcome.status, outcome.attempts) == ("failed", 1)
    assert "pull model manifest: file does not exist" in str(outcome.error)
    assert not [e for e in logs if e["event"] == "sync.pull_retry"]


@pytest.mark.parametrize(
    ("message", "final"),
    [
        ("a: Ollama reported: pull model manifest: file does not exist", True),
        ("gpu-a (10.0.0.5:22): ollama pull failed: pull model manifest: file does not exist",
         True),
        ("a: /api/pull answered HTTP 404: model 'x' not found", True),
        ("a: Ollama reported: manifest unknown", True),
        ("a: Ollama reported: max retries exceeded: unexpected EOF", False),
        ("a: cannot connect to http://10.0.0.5:11434: Connection refused", False),
        ("gpu-a: ollama pull failed: bash: line 1: ollama: command not found", False),
        ("a: no progress for 600 s; pull cancelled", False),
    ],
)  # fmt: skip
def test_which_pull_errors_are_final(message: str, final: bool) -> None:
    assert sync_engine.never_found(message) is final


async def test_seconds_count_from_the_pull_not_from_the_wait_for_a_slot(tmp_path):
    config = EmulatorConfig(models=[], pull_size=200_000, pull_speed=1_000_000)
    async with Emulator(config) as emu:
        settings = make_settings(
            tmp_path, [("a", emu)], models=["m1:1b", "m2:1b", "m3:1b"], fallback=[],
            download={"max_parallel_jobs": 1},
        )  # fmt: skip
        result = await run_sync(settings, SyncOptions(), now=FakeNow(IN_WINDOW))
    assert result.ok
    # Each pull takes about 0.2 s; the last one waited 0.4 s for its slot before that.
    assert all(0.1 < o.seconds < 0.35 for o in result.outcomes), result.outcomes


async def test_a_dry_run_tells_refreshes_from_missing_models(nodes, tmp_path):
    a, b = nodes
    settings = make_settings(tmp_path, [("a", a), ("b", b)], fallback=[])
    result = await run_sync(settings, SyncOptions(dry_run=True), now=FakeNow(IN_WINDOW))
    kinds = {(p.node, p.model): p.kind for p in result.plan}
    assert kinds == {
        ("a", "llama3.1:8b"): "refresh",
        ("b", "llama3.1:8b"): "refresh",
        ("a", "qwen3:8b"): "missing",
        ("b", "qwen3:8b"): "refresh",
    }
    assert result.to_dict()["plan"][0]["kind"] == "refresh"
    table = sync_cli.summary_table(result).splitlines()
    assert table[0].split() == ["NODE", "MODEL", "ACTION", "REASON"]
    assert any(
        line.split() == ["a", "qwen3:8b", "missing", "not", "on", "the", "node"] for line in table
    )
    assert any(
        line.split()[:5] == ["b", "qwen3:8b", "refresh", "refresh:", "present"] for line in table
    )
    assert table[-2] == "planned: 1 pull of a missing model, 3 refreshes of models present"
    assert table[-1] == "dry run: nothing was pulled or written"


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
