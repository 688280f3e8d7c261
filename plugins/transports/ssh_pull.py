"""Pull a model by running ``ollama pull NAME`` on the node over SSH (asyncssh).

For nodes whose API olmd may not drive pulls through (``transport = "ssh"``). The host
key must already be in the known_hosts file: an unknown or changed key aborts the node
before any command runs. The model name is validated against Ollama's grammar first and
then passed as one shell-quoted argument, so it can never become shell syntax.
"""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

from daemon.domain import ModelRef
from daemon.ports import PullError, PullProgress, PullTarget

with warnings.catch_warnings():
    # cryptography 51 deprecates DSA, and asyncssh names its DSA key classes when imported:
    # a notice about asyncssh's support for old keys, nothing olmd does, so not printed.
    warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"asyncssh\.")
    import asyncssh

# CSI and other escape sequences the ollama CLI uses to redraw its progress bars.
_ESCAPES = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_])")
_LINE_BREAKS = re.compile(r"[\r\n]")
# The CLI's spinner (braille dots) turns on every redraw; it is not progress.
_SPINNER = re.compile(r"[\u2800-\u28ff]")
# The bar itself (block elements); what is left of the line is the status text.
_BAR = re.compile(r"[\u2580-\u259f]")
# "pulling 8eeb52dfb3bb:  42% ▕██    ▏ 2.0 GB/4.7 GB  50 MB/s  54s"; a finished layer
# shows only its size: "pulling 8eeb52dfb3bb: 100% ▕██████▏ 4.7 GB".
_LAYER = re.compile(r"pulling (?P<id>[0-9a-f]{6,64})\b")
_DONE_OF_TOTAL = re.compile(
    r"(?P<done>\d+(?:\.\d+)?)\s*(?P<du>[KMGT]?B)\s*/\s*"
    r"(?P<total>\d+(?:\.\d+)?)\s*(?P<tu>[KMGT]?B)"
)
_SIZE = re.compile(r"(?P<size>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]?B)\s*$")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # ollama's HumanBytes
_COMMAND_NOT_FOUND = 127


def pull_command(model: str, *, insecure: bool = False) -> str:
    """The remote command for ``model``: validated, then quoted as one argument.

    Raises ``ValueError`` for a name Ollama would refuse; no command is built for it.
    """
    name = ModelRef.parse(model).name
    return shlex.join(["ollama", "pull", *(["--insecure"] if insecure else []), name])


def copy_command(source: str, destination: str) -> str:
    names = [ModelRef.parse(source).name, ModelRef.parse(destination).name]
    return shlex.join(["ollama", "cp", *names])


def delete_command(model: str) -> str:
    return shlex.join(["ollama", "rm", ModelRef.parse(model).name])


class SshPullTransport:
    """Runs ``ollama pull`` on the node over SSH. Satisfies ``PullTransport``.

    One connection per attempt: pulls are few and long, and a fresh connection means a
    failed one never poisons the next attempt. Progress is parsed from the CLI's bars
    (best effort: bytes when the bar shows them, the status text otherwise).
    """

    async def pull(self, target: PullTarget, model: str, progress: PullProgress) -> None:
        """One attempt at pulling ``model`` onto ``target``."""
        await self.pull_from(target, model, progress, insecure=False)

    async def pull_from(
        self, target: PullTarget, model: str, progress: PullProgress, *, insecure: bool
    ) -> None:
        """One attempt; ``insecure``: ``ollama pull --insecure`` (olmd's endpoint)."""
        command = pull_command(model, insecure=insecure)  # before any connection is made
        await self._session(target, command, progress)

    async def copy(self, target: PullTarget, source: str, destination: str) -> None:
        await self._session(target, copy_command(source, destination), _ignore)

    async def delete(self, target: PullTarget, model: str) -> None:
        try:
            await self._session(target, delete_command(model), _ignore)
        except PullError as exc:
            if "not found" not in str(exc):
                raise

    async def _session(self, target: PullTarget, command: str, progress: PullProgress) -> None:
        where = f"{target.name} ({target.ssh_host}:{target.ssh_port})"
        known_hosts = _known_hosts_file(target, where)
        try:
            options = _connect_options(target, known_hosts, where)
            async with asyncssh.connect(**options) as conn:
                await _run(conn, command, where, progress)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise PullError(
                f"{where}: host key not verified against {known_hosts} ({exc.reason}); the "
                "key is unknown or has changed, so no command was run. Check the node's "
                "fingerprint and update the known_hosts file",
                node_fatal=True,
            ) from exc
        except asyncssh.PermissionDenied as exc:
            raise PullError(
                f"{where}: SSH login refused for user {target.ssh_user or '(local user)'}: "
                f"{exc.reason}",
                node_fatal=True,
            ) from exc
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise PullError(f"{where}: SSH connection failed: {reason}") from exc

    async def aclose(self) -> None:
        """Nothing to release: connections live only for one attempt."""


def _known_hosts_file(target: PullTarget, where: str) -> Path:
    path = Path(target.known_hosts).expanduser()
    if not path.is_file():
        raise PullError(
            f"{where}: known_hosts file {path} does not exist; add the node's host key to "
            "it (ssh-keyscan, then check the fingerprint)",
            node_fatal=True,
        )
    return path


def _connect_options(target: PullTarget, known_hosts: Path, where: str) -> dict[str, object]:
    options: dict[str, object] = {
        "host": target.ssh_host,
        "port": target.ssh_port,
        "username": target.ssh_user,
        # Always a file: asyncssh skips host key checks when given None, and silently
        # when its default file is missing.
        "known_hosts": str(known_hosts),
        "connect_timeout": target.connect_timeout,
        # Settings are the one source of truth: no ~/.ssh/config surprises.
        "config": None,
        # Only known_hosts decides: no X.509 host certificates from ~/.ssh/ca-bundle.crt.
        "x509_trusted_certs": None,
    }
    if target.ssh_key_path:
        options["client_keys"] = [_client_key(target.ssh_key_path, where)]
    return options


def _client_key(path: str, where: str) -> asyncssh.SSHKey:
    # Read here rather than by asyncssh so that no error message carries the key's path:
    # it comes from the secrets and must not reach logs or /admin output.
    try:
        return asyncssh.read_private_key(Path(path).expanduser())
    except (OSError, asyncssh.KeyImportError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise PullError(
            f"{where}: cannot read the SSH key (OLLAMA_SSH_KEY_PATH): {reason}", node_fatal=True
        ) from None


async def _run(
    conn: asyncssh.SSHClientConnection, command: str, where: str, progress: PullProgress
) -> None:
    parser = _ProgressParser(progress)
    async with conn.create_process(
        command, stderr=asyncssh.STDOUT, encoding="utf-8", errors="replace"
    ) as process:
        pending = ""
        while chunk := await process.stdout.read(4096):
            *lines, pending = _LINE_BREAKS.split(pending + chunk)
            for line in lines:
                parser.feed(line)
        parser.feed(pending)
        result = await process.wait()
    status = result.exit_status
    if status == 0:
        return
    if status == _COMMAND_NOT_FOUND:
        raise PullError(f"{where}: `ollama` is not on the remote PATH", retryable=False)
    detail = parser.last_error or parser.last_line or f"exit status {status}"
    verb = " ".join(shlex.split(command)[:2])
    raise PullError(f"{where}: {verb} failed: {detail}")


def _ignore(status: str, completed: int, total: int) -> None:
    """Progress of a command that reports none worth keeping (cp, rm)."""


class _ProgressParser:
    """Turns the CLI's redrawn bars into (status, completed, total) reports.

    The status is the whole progress line without the bar ("pulling 8eeb52dfb3bb: 42%
    2.0 GB/4.7 GB 50 MB/s 54s"): the CLI rounds bytes to three digits, so on a slow link
    they stand still for minutes while percent, speed and time left move, and the engine
    counts any change of status as activity.
    """

    def __init__(self, progress: PullProgress) -> None:
        self._progress = progress
        self._layers: dict[str, tuple[int, int]] = {}
        self.last_line = ""
        self.last_error = ""

    def feed(self, raw: str) -> None:
        line = _SPINNER.sub("", _ESCAPES.sub("", raw)).strip()
        if not line:
            return
        self.last_line = line
        if line.startswith("Error:"):
            self.last_error = line.removeprefix("Error:").strip()
        status = " ".join(_BAR.sub(" ", line).split())
        layer = _LAYER.search(line)
        if layer is not None:
            counts = _DONE_OF_TOTAL.search(line)
            size = _SIZE.search(line)
            if counts is not None:
                done = _bytes(counts["done"], counts["du"])
                self._layers[layer["id"]] = (done, _bytes(counts["total"], counts["tu"]))
            elif size is not None and "100%" in line:
                total = _bytes(size["size"], size["unit"])
                self._layers[layer["id"]] = (total, total)
        self._progress(
            status,
            sum(done for done, _ in self._layers.values()),
            sum(total for _, total in self._layers.values()),
        )


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * _UNITS[unit])
