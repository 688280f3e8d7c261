"""The ``olmd`` command line: ``--config`` on either side of every subcommand, ``config
check`` naming what it read, ``verify-env`` checking the configured nodes' APIs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from daemon.cli import main as cli
from daemon.emulator.server import Emulator, EmulatorConfig
from tests.helpers import run_cli, settings_dict, write_settings

COMMANDS = [
    ["serve"],
    ["config", "check"],
    ["config", "show"],
    ["sync"],
    ["verify-env"],
    ["healthcheck"],
    ["smoke"],
    ["status"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_config_goes_before_or_after_every_subcommand(command: list[str]) -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["--config", "a.toml", *command]).config == "a.toml"
    assert parser.parse_args([*command, "--config", "b.toml"]).config == "b.toml"
    assert parser.parse_args(command).config is None


async def test_config_check_names_the_file_it_read(tmp_path: Path, capsys) -> None:
    code, out, _ = await run_cli(capsys, "config", "check")
    assert code == 0
    first, second = out.splitlines()
    assert first.startswith("settings OK: 1 node(s)")
    assert second == (
        "no settings file found (settings.toml, /etc/olmd/settings.toml): "
        "defaults and environment only"
    )
    config = write_settings(tmp_path / "olmd.toml", {"server": {"port": 11500}})
    code, out, _ = await run_cli(capsys, "config", "check", "--config", str(config))
    assert code == 0
    assert out.splitlines() == [
        "settings OK: 1 node(s) (127.0.0.1), strategy adaptive, listening on 127.0.0.1:11500",
        f"read {config}",
    ]
    (tmp_path / "settings.toml").write_text("[server]\nport = 11501\n")
    code, out, _ = await run_cli(capsys, "config", "check")
    assert out.splitlines()[1] == f"read {tmp_path / 'settings.toml'}"


async def test_verify_env_checks_the_configured_nodes_apis(tmp_path: Path, capsys) -> None:
    a = Emulator(EmulatorConfig(name="a", models=["llama3.1:8b"], version="0.12.3"))
    b = Emulator(EmulatorConfig(name="b", models=[]))
    async with a, b:
        data: dict[str, Any] = settings_dict([("a", 1, a), ("b", 1, b)])
        data["report"] = {"min_ram_gb": 0, "min_free_disk_gb": 0, "path": "out/health.md"}
        data["services"]["ollama"]["baseline_models"] = ["llama3.1:8b"]
        config = write_settings(tmp_path / "settings.toml", data)
        code, out, _ = await run_cli(capsys, "verify-env", "--config", str(config), "--json")
        assert code == 0, out
        checks = {c["key"]: c for c in json.loads(out)["checks"]}
        assert {k: c["status"] for k, c in checks.items() if ":" in k} == {
            "ollama_api:a": "pass",
            "baseline_models:a": "pass",
            "ollama_api:b": "pass",
            "baseline_models:b": "warn",
        }
        assert checks["ollama_api:b"]["threshold"] == f"answers at {b.url}"
        assert checks["baseline_models:b"]["detail"].startswith("missing: llama3.1:8b")
        assert "ollama_api" not in checks  # not 127.0.0.1:11434

        del data["services"]["ollama"]["nodes"][1]
        write_settings(config, data)
        code, out, _ = await run_cli(capsys, "verify-env", "--config", str(config), "--json")
        report = json.loads(out)
        assert report["facts"]["ollama_url"] == a.url
        assert {c["key"]: c["status"] for c in report["checks"]}["ollama_api"] == "pass"
