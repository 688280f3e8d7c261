"""envcheck: parsers, thresholds, and ``verify-env --node`` against a real asyncssh server
on loopback that answers the fact commands with canned output."""

from __future__ import annotations

import asyncio
import json
import shlex
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from daemon.cli import main as cli
from daemon.cli import ops as ops_cli
from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.ops.envcheck import (
    GB,
    Completed,
    Facts,
    Status,
    evaluate,
    gather,
    parse_cpu_model,
    parse_df,
    parse_gpus,
    parse_loadavg,
    parse_meminfo,
)
from daemon.ops.smoke import NodeHealth
from daemon.settings import ReportSettings
from tests.helpers import run_cli, write_settings

MEMINFO = """\
MemTotal:       131841964 kB
MemFree:         2000000 kB
MemAvailable:   120000000 kB
Buffers:          123456 kB
"""
CPUINFO = """\
processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD EPYC 7543 32-Core Processor
processor	: 1
model name	: AMD EPYC 7543 32-Core Processor
"""
DATA_ROOT = "/data/ollama/models"  # does not exist on the node; /data/ollama does
DF = "        Avail Mounted on\n750123456789 /data\n"
CANNED = {
    "cat /proc/sys/kernel/hostname": "gpu-a-host\n",
    "cat /etc/os-release": 'NAME="Ubuntu"\nPRETTY_NAME="Ubuntu 22.04.4 LTS"\n',
    "cat /proc/cpuinfo": CPUINFO,
    "nproc": "32\n",
    "cat /proc/meminfo": MEMINFO,
    "cat /proc/loadavg": "0.50 0.40 0.30 1/123 4567\n",
    "df -B1 --output=avail,target /data/ollama": DF,
}


@dataclass
class FakeNode:
    port: int
    known_hosts: Path
    key_path: Path
    host_key: asyncssh.SSHKey
    commands: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)


@pytest.fixture
async def ssh_node(tmp_path: Path) -> AsyncIterator[FakeNode]:
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    key_path = tmp_path / "id_ed25519"
    client_key.write_private_key(str(key_path))
    commands: list[str] = []
    users: list[str] = []

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            users.append(username)
            return True

    def handle(process: asyncssh.SSHServerProcess[str]) -> None:
        command = process.command or ""
        commands.append(command)
        if command in CANNED:
            process.stdout.write(CANNED[command])
            process.exit(0)
        elif command.startswith("df "):
            process.stderr.write(f"df: {shlex.split(command)[-1]}: No such file or directory\n")
            process.exit(1)
        else:
            process.stderr.write(f"bash: {shlex.split(command)[0]}: command not found\n")
            process.exit(127)

    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_factory=Server,
        server_host_keys=[host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(
            client_key.export_public_key().decode()
        ),
        process_factory=handle,
    )
    port = server.get_port()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_key.export_public_key().decode()}")
    try:
        yield FakeNode(port, known_hosts, key_path, host_key, commands, users)
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
def olmd(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    monkeypatch.setattr(cli, "_plugins", lambda: [ops_cli.register])

    async def run(*argv: str) -> tuple[int, str, str]:
        return await run_cli(capsys, *argv)

    return run


def node_settings(tmp_path: Path, node: FakeNode, api_port: int, known_hosts: Path) -> Path:
    return write_settings(
        tmp_path / "settings.toml",
        {
            "report": {"path": str(tmp_path / "reports/ollama-health-report.md")},
            "ssh": {"known_hosts": str(known_hosts), "connect_timeout": 5.0},
            "services": {
                "ollama": {
                    "health_timeout": 2.0,
                    "baseline_models": ["llama3.1:8b", "gpt-oss:20b"],
                    "download": {"data_root": DATA_ROOT},
                    "nodes": [
                        {
                            "name": "gpu-a",
                            "host": "127.0.0.1",
                            "port": api_port,
                            "ssh_host": "127.0.0.1",
                            "ssh_port": node.port,
                        }
                    ],
                }
            },
        },
    )


async def test_verify_env_node_over_ssh(
    olmd: Any, tmp_path: Path, ssh_node: FakeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_SSH_USER", "deploy")
    monkeypatch.setenv("OLLAMA_SSH_KEY_PATH", str(ssh_node.key_path))
    emulator = EmulatorConfig(models=["llama3.1:8b", "mistral-nemo:12b"], version="0.12.6")
    async with Emulator(emulator) as api:
        config = node_settings(tmp_path, ssh_node, api.port, ssh_node.known_hosts)
        code, out, err = await olmd("--config", str(config), "verify-env", "--node", "gpu-a")
    assert code == 0, (out, err)  # RAM passes, disk only warns, a missing model only warns
    assert ssh_node.users == ["deploy"]
    assert "nproc" in ssh_node.commands
    assert "cat /proc/meminfo" in ssh_node.commands
    assert ssh_node.commands.count("df -B1 --output=avail,target /data/ollama/models") == 1

    report = tmp_path / "reports/ollama-health-report-gpu-a.md"
    markdown = report.read_text()
    assert "# Ollama health report: node gpu-a" in markdown
    assert "**Result: WARN** (0 fail, 2 warn, 2 pass)." in markdown
    assert "| Total RAM | >= 64 GB | 135.0 GB | PASS |  |" in markdown
    assert (
        f"| Free disk at {DATA_ROOT} | > 700 GB | 750.1 GB | WARN | measured at /data/ollama |"
        in markdown
    )
    assert "| Baseline models present | 2 of 2 | 1 of 2 | WARN | missing: gpt-oss:20b" in markdown
    assert "| CPU | AMD EPYC 7543 32-Core Processor (32 cores) |" in markdown
    assert "| OS | Ubuntu 22.04.4 LTS |" in markdown
    assert "| GPUs | none found (no nvidia-smi) |" in markdown
    assert "| Load average (1/5/15 min) | 0.50 / 0.40 / 0.30 |" in markdown
    assert "| mistral-nemo:12b |" in markdown
    assert "no NVIDIA GPU tools (nvidia-smi not installed)" in markdown

    facts = json.loads(report.with_suffix(".json").read_text())["facts"]
    assert facts["target"] == "gpu-a"
    assert facts["hostname"] == "gpu-a-host"
    assert facts["cpu_cores"] == 32
    assert facts["ram_total_bytes"] == 131841964 * 1024
    assert facts["ram_available_bytes"] == 120000000 * 1024
    assert facts["disk_free_bytes"] == 750123456789
    assert facts["disk_measured_at"] == "/data/ollama"
    assert facts["load_average"] == [0.5, 0.4, 0.3]
    assert facts["gpus"] is None
    assert facts["ollama"]["version"] == "0.12.6"
    assert "WARN  Free disk at /data/ollama/models: 750.1 GB" in out


async def test_unknown_host_key_aborts_before_any_command(
    olmd: Any, tmp_path: Path, ssh_node: FakeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_SSH_KEY_PATH", str(ssh_node.key_path))
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    changed = tmp_path / "changed_known_hosts"
    changed.write_text(f"[127.0.0.1]:{ssh_node.port} {other}")
    unknown = tmp_path / "unknown_known_hosts"
    unknown.write_text(f"[127.0.0.1]:1 {ssh_node.host_key.export_public_key().decode()}")
    for known_hosts in (changed, unknown):
        config = node_settings(tmp_path, ssh_node, 1, known_hosts)
        code, _out, err = await olmd("--config", str(config), "verify-env", "--node", "gpu-a")
        assert code == 1
        assert "host key of 127.0.0.1:" in err
        assert "is unknown or has changed" in err
        assert "nothing was run" in err
    assert ssh_node.commands == []
    assert ssh_node.users == []  # refused before authentication
    assert not (tmp_path / "reports").exists()  # no report replaced by an empty one


async def test_missing_known_hosts_file_aborts(
    olmd: Any, tmp_path: Path, ssh_node: FakeNode
) -> None:
    config = node_settings(tmp_path, ssh_node, 1, tmp_path / "absent")
    code, _, err = await olmd("--config", str(config), "verify-env", "--node", "gpu-a")
    assert code == 1
    assert "known_hosts file" in err
    assert "ssh-keyscan -p" in err
    assert ssh_node.commands == []


def test_parsers() -> None:
    assert parse_meminfo(MEMINFO) == (131841964 * 1024, 120000000 * 1024)
    assert parse_meminfo("garbage") == (None, None)
    assert parse_df(DF) == (750123456789, "/data")
    assert parse_df("Avail Mounted on\n5 /mnt/with space\n") == (5, "/mnt/with space")
    with pytest.raises(ValueError, match="invalid literal"):
        parse_df("df: unrecognized option '--output=avail,target'\n")
    assert parse_loadavg("0.50 0.40 0.30 1/123 4567\n") == (0.5, 0.4, 0.3)
    assert parse_loadavg("nonsense") is None
    assert parse_cpu_model(CPUINFO) == "AMD EPYC 7543 32-Core Processor"
    assert parse_cpu_model("Hardware\t: BCM2835\n") == "BCM2835"
    assert parse_cpu_model("") is None
    gpus = parse_gpus("NVIDIA A100-SXM4-80GB, 81920\nNVIDIA L4, [N/A]\n")
    assert [(g.name, g.memory_bytes) for g in gpus] == [
        ("NVIDIA A100-SXM4-80GB", 81920 * 1024 * 1024),
        ("NVIDIA L4", None),
    ]


def facts(ram: int | None, disk: int | None, api: NodeHealth | None = None) -> Facts:
    return Facts(
        target="t",
        data_root="/d",
        ollama_url="http://x:1",
        ram_total_bytes=ram,
        disk_free_bytes=disk,
        ollama=api or NodeHealth("t", "http://x:1", ok=True, version="1"),
    )


@pytest.mark.parametrize(
    ("ram_gb", "disk_gb", "expected"),
    [
        (64, 770.1, (Status.WARN, Status.PASS)),  # RAM exactly at >=: passes, no headroom
        (70.5, 700, (Status.PASS, Status.FAIL)),  # disk must be strictly above
        (63.9, 700.1, (Status.FAIL, Status.WARN)),
        (None, None, (Status.FAIL, Status.FAIL)),  # unmeasured cannot pass
    ],
)
def test_thresholds(
    ram_gb: float | None, disk_gb: float | None, expected: tuple[Status, Status]
) -> None:
    limits = ReportSettings()
    checks = evaluate(
        facts(
            None if ram_gb is None else int(ram_gb * GB),
            None if disk_gb is None else int(disk_gb * GB),
        ),
        limits,
        baseline=[],
        require_ollama=False,
    )
    assert (checks[0].status, checks[1].status) == expected
    assert [c.key for c in checks] == ["ram_total", "disk_free", "ollama_api"]


def test_unreachable_ollama_warns_unless_required() -> None:
    dead = NodeHealth("t", "http://x:1", ok=False, error="cannot connect")
    limits = ReportSettings(min_ram_gb=0, min_free_disk_gb=0)
    for required, expected in ((False, Status.WARN), (True, Status.FAIL)):
        checks = evaluate(facts(GB, GB, dead), limits, baseline=["a:1b"], require_ollama=required)
        assert checks[-1].key == "ollama_api"  # no baseline check without an answer
        assert (checks[-1].status, checks[-1].detail) == (expected, "cannot connect")


class CannedRunner:
    """A Runner answering from a table, as the SSH server above does, without SSH."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.seen: list[str] = []

    async def run(self, argv: Sequence[str]) -> Completed:
        command = shlex.join(argv)
        self.seen.append(command)
        if command in self.answers:
            return Completed(0, self.answers[command])
        return Completed(1, "", f"{argv[0]}: failed")


async def test_home_relative_data_root_and_odd_output() -> None:
    runner = CannedRunner(
        {
            "cat /proc/meminfo": "nothing useful\n",
            "cat /proc/loadavg": "garbage\n",
            "df -B1 --output=avail,target .": "Avail Mounted on\n123000000000 /home\n",
        }
    )
    facts = await gather(
        runner,
        target="n",
        data_root="~/.ollama",
        ollama_url="http://127.0.0.1:1",
        health_timeout=1.0,
        local=False,
    )
    # Over SSH, "~/.ollama" is ".ollama" relative to the login's home directory.
    assert runner.seen.index("df -B1 --output=avail,target .ollama") < runner.seen.index(
        "df -B1 --output=avail,target ."
    )
    assert (facts.disk_free_bytes, facts.disk_measured_at) == (123 * GB, "~")
    assert (facts.ram_total_bytes, facts.load_average, facts.cpu_cores) == (None, None, None)
    assert facts.ollama is not None
    assert not facts.ollama.ok
    assert any("`nproc` failed" in note for note in facts.notes)
    checks = evaluate(facts, ReportSettings(), baseline=[], require_ollama=False)
    assert [c.status for c in checks] == [Status.FAIL, Status.FAIL, Status.WARN]
    assert checks[0].measured == "unknown"


def test_unreadable_ssh_key_never_shows_its_path(tmp_path, monkeypatch) -> None:

    from daemon.ops import envcheck
    from daemon.settings import Settings

    known = tmp_path / "known_hosts"
    known.write_text("")
    secret = tmp_path / "very-secret-dir" / "id_olmd"
    monkeypatch.setenv("OLLAMA_SSH_KEY_PATH", str(secret))
    settings = Settings(
        ssh={"known_hosts": str(known)},
        services={"ollama": {"nodes": [{"name": "gpu-a", "host": "127.0.0.1", "ssh_port": 9}]}},
    )

    async def attempt() -> str:
        try:
            async with envcheck.ssh_runner(settings, settings.nodes()[0]):
                pass
        except envcheck.EnvCheckError as exc:
            return str(exc)
        return ""

    message = asyncio.run(attempt())
    assert "OLLAMA_SSH_KEY_PATH" in message
    assert "very-secret-dir" not in message


def test_secret_remote_host_is_not_the_node_name(monkeypatch) -> None:
    from daemon.settings import load_settings

    monkeypatch.setenv("OLLAMA_REMOTE_HOST", "gpu.internal.example")
    [node] = load_settings().nodes()
    assert node.host == "gpu.internal.example"
    assert node.name == "ollama"
