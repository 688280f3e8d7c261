"""Gateway mode over SSH: `ollama pull --insecure`, `ollama cp`, `ollama rm` on a real
asyncssh server, whose stand-in `ollama` drives an emulated node's API."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.emulator.registry import EmulatedRegistry
from daemon.settings import load_settings
from tests.distribution.support import fleet, gateway_settings, listed, olmd, publish
from tests.helpers import run_cli, write_settings

with warnings.catch_warnings():  # asyncssh names DSA classes on import: not our concern
    warnings.filterwarnings("ignore", message="DSA is deprecated")
    import asyncssh

# The ollama CLI's three commands, done through the node's API as the real CLI does.
STAND_IN = f"""#!{sys.executable}
import json, os, sys, urllib.error, urllib.request
args = sys.argv[1:]
with open(os.environ["ARGV_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
host = os.environ["OLLAMA_HOST"]
def call(method, path, body):
    request = urllib.request.Request(host + path, data=json.dumps(body).encode(),
                                     method=method, headers={{"Content-Type": "application/json"}})
    try:
        return urllib.request.urlopen(request)
    except urllib.error.HTTPError as exc:
        print("Error: " + json.load(exc).get("error", str(exc)), file=sys.stderr)
        sys.exit(1)
if args[0] == "pull":
    body = {{"model": args[-1], "insecure": "--insecure" in args}}
    for raw in call("POST", "/api/pull", body):
        line = json.loads(raw)
        if "error" in line:
            print("Error: " + line["error"], file=sys.stderr)
            sys.exit(1)
        print(line.get("status", ""), file=sys.stderr)
elif args[0] == "cp":
    call("POST", "/api/copy", {{"source": args[1], "destination": args[2]}})
elif args[0] == "rm":
    call("DELETE", "/api/delete", {{"model": args[1]}})
"""


@pytest.fixture(autouse=True)
def _captured_logs() -> Iterator[None]:
    with capture_logs():
        yield


@pytest.fixture
async def registry() -> AsyncIterator[EmulatedRegistry]:
    async with EmulatedRegistry() as reg:
        yield reg


async def test_an_ssh_node_pulls_from_olmd_then_renames(
    tmp_path: Path,
    registry: EmulatedRegistry,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    digests = publish(registry, ["llama3.1:8b"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ollama").write_text(STAND_IN)
    (bin_dir / "ollama").chmod(0o755)
    argv_log = tmp_path / "argv.log"
    async with fleet(2) as nodes:
        ssh_emu = nodes[1][1]

        async def run(process: asyncssh.SSHServerProcess[str]) -> None:
            env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "ARGV_LOG": str(argv_log),
                   "OLLAMA_HOST": ssh_emu.url}  # fmt: skip
            shell = await asyncio.create_subprocess_shell(
                process.command or "false", env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            assert shell.stdout is not None
            while chunk := await shell.stdout.read(1024):
                process.stdout.write(chunk.decode("utf-8", "replace"))
            process.exit(await shell.wait())

        host_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        server = await asyncssh.create_server(
            asyncssh.SSHServer, "127.0.0.1", 0, server_host_keys=[host_key],
            authorized_client_keys=asyncssh.import_authorized_keys(
                client_key.export_public_key().decode()
            ),
            process_factory=run,
        )  # fmt: skip
        try:
            port = server.get_port()
            key_file = tmp_path / "id_ed25519"
            client_key.write_private_key(str(key_file))
            key_file.chmod(stat.S_IRUSR | stat.S_IWUSR)
            known = tmp_path / "known_hosts"
            known.write_text(f"[127.0.0.1]:{port} {host_key.export_public_key().decode()}")
            monkeypatch.setenv("OLLAMA_SSH_KEY_PATH", str(key_file))
            data = gateway_settings(tmp_path, registry, nodes, models=["llama3.1:8b"])
            data["ssh"] = {"known_hosts": str(known)}
            data["services"]["ollama"]["nodes"][1].update(
                transport="ssh", ssh_host="127.0.0.1", ssh_port=port,
                ssh_user=os.environ.get("USER") or "olmd",
            )  # fmt: skip
            path = write_settings(tmp_path / "settings.toml", data)
            async with olmd(load_settings(path)):
                code, out, err = await run_cli(capsys, "sync", "--config", str(path))
                assert code == 0, out + err
                for _, emu in nodes:
                    assert await listed(emu) == {"llama3.1:8b": digests["llama3.1:8b"]}
        finally:
            server.close()
            await server.wait_closed()
    long_name = f"127.0.0.1:{data['server']['port']}/library/llama3.1:8b"
    assert [json.loads(line) for line in argv_log.read_text().splitlines()] == [
        ["pull", "--insecure", long_name],
        ["cp", long_name, "llama3.1:8b"],
        ["rm", long_name],
    ]
    assert registry.stats.total_bytes == registry.model_bytes("llama3.1:8b") + 3
