"""Tests for plugins.transports.ssh_pull against a real asyncssh server on 127.0.0.1.

The server runs each command through ``/bin/sh -c`` with a stand-in ``ollama`` first on
PATH, so a name that reached the shell unquoted would really run: the tests check that
no command does, and that the stand-in gets the name as exactly one argument.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import asyncssh
import pytest
from structlog.testing import capture_logs

from daemon.domain import ModelRef
from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.ports import PullError
from daemon.sync.plan import Target
from daemon.sync.service import SyncOptions, run_sync
from plugins.transports.ssh_pull import SshPullTransport, pull_command
from tests.sync.support import IN_WINDOW, FakeNow, make_settings

# Like the real CLI: redrawn bars with escape codes and a spinner, on stderr.
STAND_IN_OLLAMA = r"""#!/bin/sh
printf '%s\n' "$#" "$@" >> "$ARGV_LOG"
if [ "$1" != pull ]; then echo "Error: unknown command $1" >&2; exit 1; fi
case "$2" in
  ghost*) echo "Error: pull model manifest: file does not exist" >&2; exit 1 ;;
  slow*) printf 'pulling manifest\n' >&2; exec sleep 3 ;;
  crawl*)
    # A slow link: the rounded bytes stand still, percent/speed/time left move; then a
    # quiet digest check longer than the stall timeout (but within its allowance).
    for eta in 19m 18m 17m 16m 15m 14m 13m; do
      printf "\033[2Kpulling 8eeb52dfb3bb:  50%% 1.0 GB/2.0 GB  1.$eta KB/s  $eta\r" >&2
      sleep 0.12
    done
    printf "\033[2Kpulling 8eeb52dfb3bb: 100%% 2.0 GB\nverifying sha256 digest\n" >&2
    sleep 0.5
    printf 'writing manifest\nsuccess\n' >&2; exit 0 ;;
esac
printf '\033[?25lpulling manifest \342\240\213\r' >&2
BAR='\342\226\225\342\226\210\342\226\210  \342\226\217'
printf "\033[2Kpulling 8eeb52dfb3bb:  50%% $BAR 1.0 GB/2.0 GB  100 MB/s  10s\r" >&2
sleep 0.05
printf "\033[2Kpulling 8eeb52dfb3bb: 100%% $BAR 2.0 GB\n" >&2
printf 'verifying sha256 digest\nwriting manifest\nsuccess\033[?25h\n' >&2
"""


@pytest.fixture(autouse=True)
def _captured_logs() -> Iterator[None]:
    """Log events go to a list, not to a stream an earlier test's CLI run configured
    (and pytest has since closed)."""
    with capture_logs():
        yield


@dataclass
class SshNode:
    port: int
    target: Target
    commands: list[str | None]
    argv_log: Path
    workdir: Path
    host_key: asyncssh.SSHKey
    calls: list[tuple[str, int, int]] = field(default_factory=list)

    def argv(self) -> list[list[str]]:
        """Each stand-in run's arguments (the log holds argc, then the arguments)."""
        lines = self.argv_log.read_text().splitlines() if self.argv_log.exists() else []
        runs = []
        while lines:
            count = int(lines.pop(0))
            runs.append(lines[:count])
            del lines[:count]
        return runs

    def progress(self, status: str, completed: int, total: int) -> None:
        self.calls.append((status, completed, total))


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
async def ssh_node(tmp_path: Path) -> AsyncIterator[SshNode]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write(bin_dir / "ollama", STAND_IN_OLLAMA, 0o755)
    workdir = tmp_path / "work"
    workdir.mkdir()
    argv_log = tmp_path / "argv.log"
    commands: list[str | None] = []
    shells: list[asyncio.subprocess.Process] = []

    async def run(process: asyncssh.SSHServerProcess[str]) -> None:
        commands.append(process.command)
        if process.command is None:
            process.exit(1)
            return
        shell = await asyncio.create_subprocess_shell(
            process.command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=workdir,
            env={"PATH": f"{bin_dir}:/usr/bin:/bin", "ARGV_LOG": str(argv_log)},
            start_new_session=True,  # one process group: the whole command can be killed
        )
        shells.append(shell)
        try:
            assert shell.stdout is not None
            while chunk := await shell.stdout.read(1024):
                process.stdout.write(chunk.decode("utf-8", "replace"))
            code = await shell.wait()
        except BaseException:
            shell.kill()
            await shell.wait()
            raise
        process.exit(code)

    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(
        asyncssh.SSHServer,
        "127.0.0.1",
        0,
        server_host_keys=[host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(
            client_key.export_public_key().decode()
        ),
        process_factory=run,
    )
    port = server.get_port()
    key_file = tmp_path / "id_ed25519"
    client_key.write_private_key(str(key_file))
    key_file.chmod(stat.S_IRUSR | stat.S_IWUSR)
    known_hosts = _write(tmp_path / "known_hosts", _known_line(port, host_key))
    target = Target(
        name="gpu-b",
        url="http://127.0.0.1:9",  # unused by the SSH transport
        transport="ssh",
        ssh_host="127.0.0.1",
        ssh_port=port,
        ssh_user=os.environ.get("USER") or "olmd",
        ssh_key_path=str(key_file),
        known_hosts=str(known_hosts),
        connect_timeout=5.0,
    )
    try:
        yield SshNode(port, target, commands, argv_log, workdir, host_key)
    finally:
        for shell in shells:  # a client that went away leaves its command behind
            if shell.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(shell.pid, signal.SIGKILL)
        server.close()
        await server.wait_closed()


def _known_line(port: int, key: asyncssh.SSHKey) -> str:
    return f"[127.0.0.1]:{port} {key.export_public_key().decode().strip()}\n"


# -- pulling ----------------------------------------------------------------------------


async def test_pull_runs_ollama_with_the_name_as_one_argument(ssh_node):
    await SshPullTransport().pull(ssh_node.target, "Llama3.1:8b", ssh_node.progress)
    assert ssh_node.commands == ["ollama pull llama3.1:8b"]
    assert ssh_node.argv() == [["pull", "llama3.1:8b"]]
    statuses = [status for status, _, _ in ssh_node.calls]
    assert statuses[0] == "pulling manifest"  # escape codes and spinner stripped
    # The whole line without the bar: any change in it is activity for the engine.
    line = "pulling 8eeb52dfb3bb: 50% 1.0 GB/2.0 GB 100 MB/s 10s"
    assert statuses[1] == line
    assert statuses[-1] == "success"
    assert (line, 1_000_000_000, 2_000_000_000) in ssh_node.calls
    assert ssh_node.calls[-1][1:] == (2_000_000_000, 2_000_000_000)


async def test_a_failed_pull_raises_with_ollamas_error(ssh_node):
    with pytest.raises(PullError, match="file does not exist") as caught:
        await SshPullTransport().pull(ssh_node.target, "ghost:1b", ssh_node.progress)
    assert caught.value.retryable
    assert not caught.value.node_fatal


async def test_ollama_missing_on_the_node_is_not_retried(ssh_node, tmp_path):
    (tmp_path / "bin" / "ollama").unlink()
    with pytest.raises(PullError, match="not on the remote PATH") as caught:
        await SshPullTransport().pull(ssh_node.target, "llama3.1:8b", ssh_node.progress)
    assert not caught.value.retryable


async def test_a_cancelled_pull_returns_at_once(ssh_node):
    pull = asyncio.create_task(
        SshPullTransport().pull(ssh_node.target, "slow:1b", ssh_node.progress)
    )
    for _ in range(100):
        if ssh_node.calls:
            break
        await asyncio.sleep(0.01)
    assert ssh_node.calls == [("pulling manifest", 0, 0)]
    started = asyncio.get_running_loop().time()
    pull.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pull
    assert asyncio.get_running_loop().time() - started < 1


# -- host keys --------------------------------------------------------------------------


async def test_an_unknown_host_key_aborts_before_any_command(ssh_node, tmp_path):
    other = asyncssh.generate_private_key("ssh-ed25519")
    changed = _write(tmp_path / "changed_hosts", _known_line(ssh_node.port, other))
    unknown = _write(tmp_path / "unknown_hosts", _known_line(1, other))  # other hosts only
    for known_hosts in (changed, unknown):
        target = replace(ssh_node.target, known_hosts=str(known_hosts))
        with pytest.raises(PullError, match="no command was run") as caught:
            await SshPullTransport().pull(target, "llama3.1:8b", ssh_node.progress)
        assert caught.value.node_fatal
        assert not caught.value.retryable
    assert ssh_node.commands == []
    assert not ssh_node.argv_log.exists()


async def test_a_missing_known_hosts_file_never_connects(ssh_node, tmp_path):
    target = replace(ssh_node.target, known_hosts=str(tmp_path / "absent"))
    with pytest.raises(PullError, match="does not exist") as caught:
        await SshPullTransport().pull(target, "llama3.1:8b", ssh_node.progress)
    assert caught.value.node_fatal
    assert ssh_node.commands == []


async def test_a_refused_login_aborts_the_node(ssh_node, tmp_path):
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    stranger.write_private_key(str(tmp_path / "stranger"))
    target = replace(ssh_node.target, ssh_key_path=str(tmp_path / "stranger"))
    with pytest.raises(PullError, match="login refused") as caught:
        await SshPullTransport().pull(target, "llama3.1:8b", ssh_node.progress)
    assert caught.value.node_fatal
    assert ssh_node.commands == []


async def test_an_unreadable_key_is_reported_without_its_path(ssh_node, tmp_path):
    secret = tmp_path / "very-secret-key-location"
    target = replace(ssh_node.target, ssh_key_path=str(secret))
    with pytest.raises(PullError, match="cannot read the SSH key") as caught:
        await SshPullTransport().pull(target, "llama3.1:8b", ssh_node.progress)
    assert "very-secret" not in str(caught.value)
    assert caught.value.node_fatal
    assert ssh_node.commands == []


# -- hostile names ----------------------------------------------------------------------

HOSTILE = [
    "llama3; touch PWNED",
    "$(touch PWNED)",
    "`touch PWNED`",
    "llama3 && touch PWNED",
    "llama3|touch PWNED",
    "llama3\ntouch PWNED",
    "-rf",
    "--insecure",
    "llama3:'quoted'",
    "../../../etc/passwd",
    "",
    "a" * 400,
]


@pytest.mark.parametrize("name", HOSTILE)
async def test_hostile_names_are_refused_before_anything_is_sent(ssh_node, name):
    with pytest.raises(ValueError, match="invalid model name"):
        pull_command(name)
    with pytest.raises(ValueError, match="invalid model name"):
        await SshPullTransport().pull(ssh_node.target, name, ssh_node.progress)
    assert ssh_node.commands == []
    assert not (ssh_node.workdir / "PWNED").exists()


async def test_a_name_that_slipped_past_validation_is_still_one_argument(ssh_node, monkeypatch):
    # Defence in depth: with the grammar check disabled, quoting alone keeps it inert.
    hostile = "x'; touch PWNED; echo '$(touch PWNED2)"

    class Anything:
        def __init__(self, name: str) -> None:
            self.name = name

    monkeypatch.setattr(ModelRef, "parse", Anything)
    command = pull_command(hostile)
    assert shlex.split(command) == ["ollama", "pull", hostile]
    await SshPullTransport().pull(ssh_node.target, hostile, ssh_node.progress)
    assert ssh_node.argv() == [["pull", hostile]]
    assert not (ssh_node.workdir / "PWNED").exists()
    assert not (ssh_node.workdir / "PWNED2").exists()


# -- through the engine -------------------------------------------------------------------


async def test_the_engine_pulls_over_ssh_and_aborts_a_node_with_an_unknown_key(ssh_node, tmp_path):
    # The node's API (an emulator) gives the inventory and digests; pulls go over SSH.
    async with Emulator(EmulatorConfig(models=[])) as api:
        settings = make_settings(
            tmp_path, [("gpu-b", api)], fallback=[], download={"max_parallel_jobs": 1}
        )
        data = settings.model_dump(mode="json", include={"services", "jobs"})
        node = data["services"]["ollama"]["nodes"][0]
        node.update(transport="ssh", ssh_host="127.0.0.1", ssh_port=ssh_node.port)
        data["ssh"] = {"known_hosts": ssh_node.target.known_hosts}
        settings = type(settings)(
            **data, OLLAMA_SSH_KEY_PATH=ssh_node.target.ssh_key_path, OLLAMA_SSH_USER="olmd"
        )
        result = await run_sync(settings, SyncOptions(), now=FakeNow(IN_WINDOW))
        # The stand-in does not really add models to the API: the engine says so.
        assert [o.status for o in result.outcomes] == ["failed", "failed"]
        assert all("does not list the model" in str(o.error) for o in result.outcomes)
        assert ssh_node.argv() == [["pull", "llama3.1:8b"], ["pull", "qwen3:8b"]]

        other = asyncssh.generate_private_key("ssh-ed25519")
        _write(Path(ssh_node.target.known_hosts), _known_line(ssh_node.port, other))
        ssh_node.commands.clear()
        result = await run_sync(settings, SyncOptions(), now=FakeNow(IN_WINDOW))
    first, second = result.outcomes
    assert first.status == second.status == "failed"
    assert "no command was run" in str(first.error)
    assert first.attempts == 1  # not retried
    assert second.attempts == 0  # the node was abandoned: never tried
    assert second.error == first.error
    assert ssh_node.commands == []


async def test_a_slow_but_moving_pull_and_a_long_digest_check_are_not_stalls(ssh_node, tmp_path):
    # Bytes as the CLI rounds them never change for 0.84 s, and the digest check is
    # silent for 0.5 s, against a stall timeout of 0.3 s: neither is a stall.
    async with Emulator(EmulatorConfig(models=["crawl:1b"])) as api:
        settings = make_settings(
            tmp_path, [("gpu-b", api)], models=["crawl:1b"], fallback=[],
            download={"stall_timeout": 0.3},
        )  # fmt: skip
        data = settings.model_dump(mode="json", include={"services", "jobs"})
        node = data["services"]["ollama"]["nodes"][0]
        node.update(transport="ssh", ssh_host="127.0.0.1", ssh_port=ssh_node.port)
        data["ssh"] = {"known_hosts": ssh_node.target.known_hosts}
        settings = type(settings)(
            **data, OLLAMA_SSH_KEY_PATH=ssh_node.target.ssh_key_path, OLLAMA_SSH_USER="olmd"
        )
        with capture_logs() as logs:
            result = await run_sync(settings, SyncOptions(), now=FakeNow(IN_WINDOW))
    (outcome,) = result.outcomes
    assert not [e for e in logs if e["event"] == "sync.pull_retry"]
    assert (outcome.status, outcome.attempts, outcome.error) == ("pulled", 1, None)
    assert ssh_node.argv() == [["pull", "crawl:1b"]]
