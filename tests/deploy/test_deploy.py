"""deploy/*.sh and systemd/olmd.service: syntax, the staged bootstrap (twice: same tree),
the curl healthcheck against emulated nodes, and systemd-analyze on the unit."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.settings import SECRET_ENV, ServerSettings, load_settings
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
SCRIPTS = sorted(DEPLOY.glob("*.sh"))
UNIT = ROOT / "systemd/olmd.service"
ENV_EXAMPLE = ROOT / "systemd/olmd.env.example"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (apt-get install -y systemd)",
)


def run(*argv: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [str(a) for a in argv], capture_output=True, text=True, timeout=30, **kwargs
    )


def test_scripts_are_strict_executable_bash() -> None:
    assert {p.name for p in SCRIPTS} >= {"bootstrap.sh", "healthcheck.sh", "verify_env.sh"}
    for script in SCRIPTS:
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), script
        assert "\nset -euo pipefail\n" in text, script
        assert os.access(script, os.X_OK), script
        done = run("bash", "-n", script)
        assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_pass_shellcheck() -> None:
    done = run("shellcheck", *SCRIPTS)
    assert done.returncode == 0, done.stdout


# ---------------------------------------------------------------- bootstrap


def tree(root: Path) -> dict[str, tuple[str, int, str]]:
    """Every path under root: kind, mode and content hash or link target."""
    out = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        rel = str(path.relative_to(root))
        mode = stat.S_IMODE(info.st_mode)
        if path.is_symlink():
            out[rel] = ("link", 0, os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir", mode, "")
        else:
            out[rel] = ("file", mode, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def bootstrap(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run(DEPLOY / "bootstrap.sh", *args)


def test_bootstrap_root_is_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "stage"
    first = bootstrap("--root", root, "--no-venv")
    assert first.returncode == 0, first.stderr
    staged = tree(root)
    assert bootstrap("--root", root, "--no-venv").returncode == 0
    assert tree(root) == staged  # the second run changes nothing

    assert staged["etc/olmd/settings.toml"][:2] == ("file", 0o644)
    assert staged["etc/olmd/olmd.env"] == (
        "file",
        0o600,
        hashlib.sha256(ENV_EXAMPLE.read_bytes()).hexdigest(),
    )
    assert staged["etc/systemd/system/olmd.service"][2] == (
        hashlib.sha256(UNIT.read_bytes()).hexdigest()
    )
    assert staged["etc/systemd/system/multi-user.target.wants/olmd.service"] == (
        "link",
        0,
        "/etc/systemd/system/olmd.service",
    )
    assert not any(name.startswith(("opt", "var")) for name in staged)  # --no-venv
    assert not list((root / "etc/olmd").glob(".settings*"))  # no temp file left behind

    # The daemon may write only to its StateDirectory: the settings point there.
    settings = load_settings(root / "etc/olmd/settings.toml", env_file=None)
    assert settings.jobs.ollama_sync.manifest_path == Path(
        "/var/lib/olmd/ollama-models-manifest.json"
    )
    assert settings.report.path == Path("/var/lib/olmd/ollama-health-report.md")
    shipped = load_settings(ROOT / "settings.toml", env_file=None)
    assert settings.nodes() == shipped.nodes()  # nothing else changed


def test_bootstrap_keeps_the_operators_files(tmp_path: Path) -> None:
    root = tmp_path / "stage"
    assert bootstrap("--root", root, "--no-venv").returncode == 0
    settings = root / "etc/olmd/settings.toml"
    settings.write_text("[server]\nport = 9999\n")
    secrets = root / "etc/olmd/olmd.env"
    secrets.write_text("OLMD_API_KEYS=operator-key-1\n")
    secrets.chmod(0o644)  # someone loosened it
    again = bootstrap("--root", root, "--no-venv")
    assert again.returncode == 0, again.stderr
    assert "kept (exists" in again.stdout
    assert settings.read_text() == "[server]\nport = 9999\n"
    assert secrets.read_text() == "OLMD_API_KEYS=operator-key-1\n"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600  # and tightened again


def test_bootstrap_dry_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "stage"
    done = bootstrap("--dry-run", "--root", root, "--python", sys.executable)
    assert done.returncode == 0, done.stderr
    assert not root.exists()
    out = done.stdout
    for expected in (
        f"-m venv {root}/opt/olmd",
        f"{root}/opt/olmd/bin/pip install --quiet --upgrade {ROOT}",
        f"install -m 0600 {ENV_EXAMPLE} {root}/etc/olmd/olmd.env",
        f"install -m 0644 {UNIT} {root}/etc/systemd/system/olmd.service",
        "would write it from",
    ):
        assert expected in out, expected


def test_bootstrap_usage_errors(tmp_path: Path) -> None:
    done = bootstrap("--bogus")
    assert done.returncode == 2
    assert "unknown argument: --bogus" in done.stderr
    assert "--root DIR" in bootstrap("--help").stdout


# ---------------------------------------------------------------- healthcheck.sh, verify_env.sh


async def sh(*argv: str | Path | int, env: dict[str, str] | None = None) -> tuple[int, str]:
    # Asynchronous, so the test's loop keeps serving the emulator meanwhile.
    proc = await asyncio.create_subprocess_exec(
        *(str(a) for a in argv),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_healthcheck_sh_live_and_dead_nodes() -> None:
    config = EmulatorConfig(models=["llama3.1:8b", "qwen3:4b"], version="0.12.3")
    async with Emulator(config) as emu:
        code, out = await sh(DEPLOY / "healthcheck.sh", "--host", "127.0.0.1", "--port", emu.port)
        assert code == 0, out
        assert out.splitlines() == [
            f"OK    {emu.url}  ollama 0.12.3  2 model(s)",
            "      llama3.1:8b",
            "      qwen3:4b",
        ]
        env = {"OLLAMA_REMOTE_HOST": "127.0.0.1", "OLLAMA_REMOTE_PORT": str(emu.port)}
        code, out = await sh(DEPLOY / "healthcheck.sh", env=env)
        assert code == 0
        assert out.startswith("OK")
        port = emu.port
    # Stopped: the port now refuses connections.
    code, out = await sh(DEPLOY / "healthcheck.sh", "--host", "127.0.0.1", "--port", port)
    assert code == 1
    assert out.startswith(f"FAIL  http://127.0.0.1:{port}  /api/version: curl: (7)")
    code, out = await sh(DEPLOY / "healthcheck.sh", "--port", "eleven")
    assert code == 2


async def test_verify_env_sh_passes_arguments_to_olmd() -> None:
    code, out = await sh(DEPLOY / "verify_env.sh", "--node", "gpu-a", env={"OLMD_BIN": "echo"})
    assert (code, out) == (0, "verify-env --node gpu-a\n")


# ---------------------------------------------------------------- the unit


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return int(match[1]) * (60 if match[2] == "min" else 1)


def test_unit_has_the_required_settings() -> None:
    unit = directives(UNIT.read_text())
    one = {key: values[-1] for key, values in unit.items()}
    assert one["Type"] == "notify"
    assert one["ExecStart"] == "/opt/olmd/bin/olmd serve"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Restart"] == "on-failure"
    assert seconds(one["StartLimitIntervalSec"]) > 0
    assert int(one["StartLimitBurst"]) > 0
    assert seconds(one["WatchdogSec"]) > 0
    assert seconds(one["TimeoutStopSec"]) > ServerSettings().drain_timeout
    assert (one["User"], one["Group"], one["StateDirectory"]) == ("olmd", "olmd", "olmd")
    assert one["EnvironmentFile"] == "-/etc/olmd/olmd.env"
    assert one["Environment"] == "OLMD_CONFIG=/etc/olmd/settings.toml"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "UMask": "0077",
    }.items():
        assert one.get(key) == value, key
    assert "@system-service" in unit["SystemCallFilter"]


def test_env_example_documents_every_secret() -> None:
    text = ENV_EXAMPLE.read_text()
    for name in SECRET_ENV.values():
        assert re.search(rf"^#?{name}=", text, re.MULTILINE), name


def unit_for_analysis(tmp_path: Path) -> Path:
    """The unit as shipped, except that ExecStart names an executable that exists here:
    `systemd-analyze verify` checks that the command it would run is there."""
    fake = tmp_path / "olmd"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    text = UNIT.read_text()
    assert "ExecStart=/opt/olmd/bin/olmd serve\n" in text
    copy = tmp_path / "olmd.service"
    copy.write_text(text.replace("ExecStart=/opt/olmd/bin/olmd ", f"ExecStart={fake} "))
    return copy


@needs_systemd_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    done = run(SYSTEMD_ANALYZE or "", "verify", "--man=no", unit_for_analysis(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "olmd.service" not in done.stderr, done.stderr  # no warnings about our unit


@needs_systemd_analyze
def test_systemd_analyze_security_score(tmp_path: Path) -> None:
    done = run(
        SYSTEMD_ANALYZE or "",
        "security",
        "--offline=true",
        "--no-pager",
        unit_for_analysis(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    match = re.search(r"Overall exposure level for olmd\.service: (\d+\.\d+) (\w+)", done.stdout)
    assert match, done.stdout[-500:]
    assert float(match[1]) <= 2.5, done.stdout
