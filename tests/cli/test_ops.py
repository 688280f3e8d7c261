"""``olmd verify-env``, ``healthcheck`` and ``smoke`` end to end: the real command line,
this machine's real facts, emulated Ollama nodes (one of them dead) and the real daemon."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.cli import main as cli
from daemon.cli import ops as ops_cli
from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.ops.envcheck import GB
from tests.helpers import run_cli, running_olmd, settings_dict, write_settings

Run = Callable[..., "asyncio.Future[tuple[int, str, str]]"]
MODELS = ["llama3.1:8b", "qwen3:4b"]


@pytest.fixture(autouse=True)
def with_ops_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the commands as cli.py will, whether or not the lead has wired them yet."""
    monkeypatch.setattr(cli, "_plugins", lambda: [ops_cli.register])


@pytest.fixture
def olmd(capsys: pytest.CaptureFixture[str]) -> Callable[..., Any]:
    """Run ``olmd ARGS`` in a worker thread (it runs its own event loop) while the test's
    loop serves the emulators; returns (exit code, stdout, stderr)."""

    async def run(*argv: str) -> tuple[int, str, str]:
        return await run_cli(capsys, *argv)

    return run


@pytest.fixture
async def nodes() -> AsyncIterator[dict[str, Emulator]]:
    """Two live nodes and one that was started, then stopped: its port refuses."""
    live_a = Emulator(EmulatorConfig(name="a", models=MODELS, version="0.12.3"))
    live_b = Emulator(EmulatorConfig(name="b", models=["llama3.1:8b"], tokens=5))
    dead = Emulator(EmulatorConfig(name="dead"))
    for emu in (live_a, live_b, dead):
        await emu.start()
    await dead.stop()
    try:
        yield {"a": live_a, "b": live_b, "dead": dead}
    finally:
        await live_a.stop()
        await live_b.stop()


def fleet_settings(tmp_path: Path, nodes: dict[str, Emulator], **extra: Any) -> Path:
    data = settings_dict([(name, 1, emu) for name, emu in nodes.items()])
    for section, values in extra.items():
        data.setdefault(section, {}).update(values)
    return write_settings(tmp_path / "settings.toml", data)


# ---------------------------------------------------------------- verify-env


def meminfo_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal")


async def test_verify_env_on_this_machine_fails_on_ram(olmd: Any, tmp_path: Path) -> None:
    total = meminfo_total()
    assert total < 64 * GB, "this test expects a CI machine with less than 64 GB of RAM"
    code, out, _ = await olmd("verify-env")
    assert code == 1
    assert f"FAIL  Total RAM: {total / GB:,.1f} GB (threshold >= 64 GB)" in out
    report = tmp_path / "docs/deployment/ollama-health-report.md"
    markdown = report.read_text()
    assert "**Result: FAIL**" in markdown
    assert f"| Total RAM | >= 64 GB | {total / GB:,.1f} GB | FAIL |" in markdown
    data = json.loads(report.with_suffix(".json").read_text())
    assert data["status"] == "fail"
    assert data["facts"]["ram_total_bytes"] == total
    assert data["facts"]["cpu_cores"] >= 1
    checks = {c["key"]: c["status"] for c in data["checks"]}
    assert checks["ram_total"] == "fail"
    assert not list(report.parent.glob(".*.tmp"))  # atomic writes leave no temp files


async def test_verify_env_passes_with_lowered_thresholds(
    olmd: Any, tmp_path: Path, nodes: dict[str, Emulator]
) -> None:
    data_root = tmp_path / "models"
    data_root.mkdir()
    config = write_settings(
        tmp_path / "low.toml",
        {
            "report": {"min_ram_gb": 1, "min_free_disk_gb": 0.001, "path": "out/health.md"},
            "services": {
                "ollama": {
                    "port": nodes["a"].port,
                    "baseline_models": ["llama3.1:8b"],
                    "download": {"data_root": str(data_root)},
                }
            },
        },
    )
    code, out, _ = await olmd("--config", str(config), "verify-env")
    assert code == 0, out
    markdown = (tmp_path / "out/health.md").read_text()
    assert "**Result: PASS**" in markdown
    assert "| Ollama API | answers at http://127.0.0.1:" in markdown
    assert "| llama3.1:8b |" in markdown
    assert "| qwen3:4b |" in markdown
    assert "## Models (2)" in markdown
    data = json.loads((tmp_path / "out/health.json").read_text())
    assert data["facts"]["ollama"]["version"] == "0.12.3"
    assert data["facts"]["disk_measured_at"] == str(data_root)
    assert {c["key"]: c["status"] for c in data["checks"]} == {
        "ram_total": "pass",
        "disk_free": "pass",
        "ollama_api": "pass",
        "baseline_models": "pass",
    }


async def test_verify_env_warnings_do_not_fail(olmd: Any, tmp_path: Path) -> None:
    # Thresholds 5% under what this machine has: within the 10% margin, so warnings.
    import shutil

    ram_gb = meminfo_total() / GB / 1.05
    disk_gb = shutil.disk_usage(tmp_path).free / GB / 1.05
    config = write_settings(
        tmp_path / "near.toml",
        {
            "report": {"min_ram_gb": ram_gb, "min_free_disk_gb": disk_gb},
            # Port 1: no Ollama answers, which is a warning too, not a failure.
            "services": {"ollama": {"port": 1, "download": {"data_root": str(tmp_path)}}},
        },
    )
    code, out, _ = await olmd("verify-env", "--config", str(config), "--json")
    assert code == 0, out
    checks = {c["key"]: c["status"] for c in json.loads(out)["checks"]}
    assert checks == {"ram_total": "warn", "disk_free": "warn", "ollama_api": "warn"}


async def test_verify_env_require_ollama_and_output(olmd: Any, tmp_path: Path) -> None:
    config = write_settings(tmp_path / "s.toml", {"report": {"min_ram_gb": 0}})
    target = tmp_path / "elsewhere/report.md"
    code, out, _ = await olmd(
        "--config", str(config), "verify-env", "--require-ollama", "--output", str(target),
        "--ollama-url", "http://127.0.0.1:1",
    )  # fmt: skip
    assert code == 1
    assert "FAIL  Ollama API: no answer" in out
    assert target.is_file()
    assert target.with_suffix(".json").is_file()


async def test_verify_env_unknown_node_is_a_usage_error(olmd: Any) -> None:
    code, _, err = await olmd("verify-env", "--node", "nope")
    assert code == 2
    assert "no node named 'nope'" in err


# ---------------------------------------------------------------- healthcheck


async def test_healthcheck_every_node_with_a_dead_one(
    olmd: Any, tmp_path: Path, nodes: dict[str, Emulator]
) -> None:
    config = fleet_settings(tmp_path, nodes)
    code, out, _ = await olmd("--config", str(config), "healthcheck")
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith(f"OK    a  {nodes['a'].url}  ollama 0.12.3  2 model(s): ")
    assert "llama3.1:8b, qwen3:4b" in lines[0]
    assert lines[1].startswith("OK    b  ")
    assert lines[2].startswith(f"FAIL  dead  {nodes['dead'].url}  cannot connect")
    assert lines[3] == "2 of 3 node(s) healthy"

    code, out, _ = await olmd("--config", str(config), "healthcheck", "--json")
    assert code == 1
    body = json.loads(out)
    assert body["ok"] is False
    by_name = {n["name"]: n for n in body["nodes"]}
    assert [m["name"] for m in by_name["a"]["models"]] == MODELS
    assert by_name["a"]["models"][0]["digest"]
    assert by_name["dead"]["ok"] is False
    assert by_name["dead"]["error"]


async def test_healthcheck_selected_nodes_and_host(
    olmd: Any, tmp_path: Path, nodes: dict[str, Emulator]
) -> None:
    config = fleet_settings(tmp_path, nodes)
    code, out, _ = await olmd("--config", str(config), "healthcheck", "--node", "a", "--node", "b")
    assert code == 0, out
    assert out.splitlines()[-1] == "2 of 2 node(s) healthy"

    port = str(nodes["b"].port)
    code, out, _ = await olmd("healthcheck", "--host", "127.0.0.1", "--port", port, "--json")
    assert code == 0
    [node] = json.loads(out)["nodes"]
    assert node["name"] == f"127.0.0.1:{port}"
    assert node["version"] == "0.12.0"

    dead_port = str(nodes["dead"].port)
    code, out, _ = await olmd("healthcheck", "--host", "127.0.0.1", "--port", dead_port)
    assert code == 1
    assert out.startswith("FAIL")

    code, _, err = await olmd("--config", str(config), "healthcheck", "--node", "zzz")
    assert code == 2
    assert "no node named 'zzz'" in err


async def test_healthcheck_times_out_on_a_stalled_node(olmd: Any) -> None:
    # A listener that accepts and never answers.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = str(server.sockets[0].getsockname()[1])
    async with server:
        code, out, _ = await olmd(
            "healthcheck", "--host", "127.0.0.1", "--port", port, "--timeout", "0.3"
        )
    assert code == 1
    assert "timed out" in out


# ---------------------------------------------------------------- smoke


async def test_smoke_through_the_daemon_with_an_api_key(
    olmd: Any, tmp_path: Path, nodes: dict[str, Emulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    live = {"a": nodes["a"], "b": nodes["b"]}
    data = settings_dict([(name, 1, emu) for name, emu in live.items()])
    data["services"]["ollama"]["baseline_models"] = ["llama3.1:8b"]
    key = "smoke-key-123456"
    async with running_olmd({**data, "OLMD_API_KEYS": key}) as server:
        data["server"]["port"] = server.port
        config = write_settings(tmp_path / "daemon.toml", data)
        monkeypatch.setenv("OLMD_API_KEYS", key)
        monkeypatch.setenv("SMOKE_TEST_LLM_PROMPT", "Why is the sky blue?")
        code, out, _ = await olmd("--config", str(config), "smoke", "--json")
        assert code == 0, out
        [check] = json.loads(out)["checks"]
        assert check["target"] == "daemon"
        assert check["url"] == f"http://127.0.0.1:{server.port}"
        assert check["model"] == "llama3.1:8b"
        assert check["answer"]
        assert check["tokens"] >= 5
        assert check["ttft_seconds"] > 0
        assert check["tokens_per_second"] > 0

        monkeypatch.setenv("OLMD_API_KEYS", "not-the-right-key")
        code, out, _ = await olmd("--config", str(config), "smoke")
        assert code == 1
        assert "FAIL  daemon" in out
        assert "HTTP 401" in out


async def test_smoke_a_node_directly_and_a_dead_one(
    olmd: Any, nodes: dict[str, Emulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMOKE_TEST_OLLAMA_HOST", "127.0.0.1")
    monkeypatch.setenv("SMOKE_TEST_OLLAMA_PORT", str(nodes["b"].port))
    code, out, _ = await olmd("smoke")
    assert code == 0, out
    first, answer = out.splitlines()
    assert first.startswith(f"OK    node  {nodes['b'].url}  model llama3.1:8b  first token ")
    assert "tokens/s  5 tokens" in first
    assert answer.startswith("      answer: ")

    monkeypatch.setenv("SMOKE_TEST_OLLAMA_PORT", str(nodes["dead"].port))
    code, out, _ = await olmd("smoke", "--json")
    assert code == 1
    [check] = json.loads(out)["checks"]
    assert check["ok"] is False
    assert check["error"].startswith("cannot connect")


async def test_smoke_fails_on_an_error_in_the_stream(
    olmd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = EmulatorConfig(models=["llama3.1:8b"], fault="error_line", fault_after=2)
    async with Emulator(config) as emu:
        code, out, _ = await olmd(
            "smoke", "--ollama-host", "127.0.0.1", "--ollama-port", str(emu.port)
        )
    assert code == 1
    assert "error in the stream: llama runner process has terminated" in out


async def test_smoke_node_without_models_and_unknown_model(olmd: Any) -> None:
    async with Emulator(EmulatorConfig(models=[])) as emu:
        port = str(emu.port)
        code, out, _ = await olmd("smoke", "--ollama-host", "127.0.0.1", "--ollama-port", port)
        assert code == 1
        assert "the node lists no models" in out
        emu.state.update({"models": ["llama3.1:8b"]})
        code, out, _ = await olmd(
            "smoke", "--ollama-host", "127.0.0.1", "--ollama-port", port, "--model", "nope:1b"
        )
        assert code == 1
        assert "HTTP 404" in out


async def test_smoke_needs_something_to_check(olmd: Any) -> None:
    code, _, err = await olmd("smoke")
    assert code == 2
    assert "SMOKE_TEST_LLM_PROMPT" in err
    assert "SMOKE_TEST_OLLAMA_HOST" in err


def test_help_texts_name_the_variables_and_thresholds(capsys: pytest.CaptureFixture[str]) -> None:
    for command, expected in (
        ("verify-env", ["--node", "min_ram_gb", "known_hosts"]),
        ("healthcheck", ["--host", "--json", "/api/tags"]),
        ("smoke", ["SMOKE_TEST_LLM_PROMPT", "SMOKE_TEST_OLLAMA_PORT", "OLMD_API_KEYS"]),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        for text in expected:
            assert text in out, (command, text)
