"""Where verify-env's read-only commands run: on this machine, or on a node over SSH."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import shlex
import warnings
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from daemon.settings import NodeSettings, Settings

with warnings.catch_warnings():
    # cryptography 51 deprecates DSA, and asyncssh names its DSA key classes when imported:
    # a notice about asyncssh's support for old keys, nothing olmd does, so not printed.
    warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"asyncssh\.")
    import asyncssh

__all__ = [
    "MISSING",
    "Completed",
    "EnvCheckError",
    "LocalRunner",
    "Runner",
    "SshRunner",
    "ssh_runner",
]

MISSING = 127  # the shell's "command not found"
_COMMAND_SECONDS = 15.0


class EnvCheckError(Exception):
    """No facts could be gathered at all (SSH refused, host key not trusted, ...)."""


@dataclass(frozen=True)
class Completed:
    exit_status: int
    stdout: str
    stderr: str = ""


class Runner(Protocol):
    """Runs one read-only command where the facts are gathered."""

    async def run(self, argv: Sequence[str]) -> Completed: ...


class LocalRunner:
    async def run(self, argv: Sequence[str]) -> Completed:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
        except FileNotFoundError:
            return Completed(MISSING, "", f"{argv[0]}: command not found")
        try:
            async with asyncio.timeout(_COMMAND_SECONDS):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return Completed(-1, "", f"{argv[0]}: no answer within {_COMMAND_SECONDS:g} s")
        return Completed(proc.returncode or 0, out.decode(errors="replace"), err.decode())


class SshRunner:
    def __init__(self, connection: asyncssh.SSHClientConnection) -> None:
        self._connection = connection

    async def run(self, argv: Sequence[str]) -> Completed:
        try:
            async with asyncio.timeout(_COMMAND_SECONDS):
                done = await self._connection.run(shlex.join(argv), check=False)
        except TimeoutError:
            return Completed(-1, "", f"{argv[0]}: no answer within {_COMMAND_SECONDS:g} s")
        except (OSError, asyncssh.Error) as exc:
            raise EnvCheckError(
                f"the SSH connection failed while running {argv[0]}: {exc}"
            ) from None
        exit_status = done.exit_status if done.exit_status is not None else -1
        return Completed(exit_status, str(done.stdout or ""), str(done.stderr or ""))


def _ssh_target(settings: Settings, node: NodeSettings) -> tuple[str, int, Path, dict[str, Any]]:
    known_hosts = (settings.ssh.known_hosts or Path("~/.ssh/known_hosts")).expanduser()
    host, port = node.ssh_host or node.host, node.ssh_port
    if not known_hosts.is_file():
        raise EnvCheckError(
            f"{node.name}: known_hosts file {known_hosts} does not exist; nothing was run. "
            f"Verify the node's host key fingerprint, then: "
            f"ssh-keyscan -p {port} {host} >> {known_hosts}"
        )
    options: dict[str, Any] = {
        "username": node.ssh_user or settings.ssh_user or getpass.getuser(),
        "known_hosts": str(known_hosts),  # never None: that would trust any key
        "connect_timeout": settings.ssh.connect_timeout,
        "config": None,  # as the sync: the settings decide, not ~/.ssh/config
        "x509_trusted_certs": None,  # only known_hosts decides, no X.509 host certificates
    }
    if settings.ssh_key_path:
        # Read here, not by asyncssh, so that no error message carries the key's path: it
        # comes from the secrets. Given keys: asyncssh skips the agent.
        path = Path(settings.ssh_key_path.get_secret_value()).expanduser()
        try:
            options["client_keys"] = [asyncssh.read_private_key(path)]
        except (OSError, asyncssh.KeyImportError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise EnvCheckError(
                f"{node.name}: cannot read the SSH key (OLLAMA_SSH_KEY_PATH): {reason}"
            ) from None
    return host, port, known_hosts, options


@contextlib.asynccontextmanager
async def ssh_runner(settings: Settings, node: NodeSettings) -> AsyncIterator[SshRunner]:
    """An SSH session to ``node`` that trusts only host keys already in known_hosts.

    An unknown or changed host key ends the connection during the handshake, before any
    authentication and before any command.
    """
    host, port, known_hosts, options = _ssh_target(settings, node)
    try:
        connection = await asyncssh.connect(host, port, **options)
    except asyncssh.HostKeyNotVerifiable as exc:
        raise EnvCheckError(
            f"{node.name}: the host key of {host}:{port} is unknown or has changed "
            f"(checked against {known_hosts}: {exc.reason}); nothing was run. If the node was "
            f"reinstalled, verify its fingerprint and replace its line in {known_hosts}"
        ) from None
    except asyncssh.PermissionDenied as exc:
        raise EnvCheckError(
            f"{node.name}: SSH login to {host}:{port} refused ({exc.reason}); set "
            "OLLAMA_SSH_USER / OLLAMA_SSH_KEY_PATH or the node's ssh_user"
        ) from None
    except (OSError, TimeoutError, asyncssh.Error) as exc:
        raise EnvCheckError(f"{node.name}: cannot reach {host}:{port} over SSH: {exc}") from None
    async with connection:
        yield SshRunner(connection)
