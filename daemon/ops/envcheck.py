"""``olmd verify-env``: the facts of a machine, checked against the capacity thresholds.

Facts come from a handful of read-only commands (``cat /proc/meminfo``, ``df``, ``nproc``,
``nvidia-smi``, ...), run locally or on a node over SSH, so both paths share one parser;
the Ollama version and models come from the node's HTTP API. The result is a ``Report``:
a threshold table over the facts, rendered and written by ``daemon.ops.report``.

Sizes are decimal: 1 GB = 10**9 bytes (a "64 GB" machine reports about 67 GB of MemTotal).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import getpass
import os
import shlex
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import asyncssh

from daemon.ops.smoke import NodeHealth, check_nodes
from daemon.settings import NodeSettings, ReportSettings, Settings

__all__ = [
    "GB",
    "WARN_MARGIN",
    "Check",
    "Completed",
    "EnvCheckError",
    "Facts",
    "Report",
    "Runner",
    "Status",
    "evaluate",
    "format_gb",
    "gather",
    "ssh_runner",
    "verify",
]

GB = 1_000_000_000
WARN_MARGIN = 0.10  # a pass with less headroom than this over the threshold is a warning
_COMMAND_SECONDS = 15.0
_MISSING = 127  # the shell's "command not found"


class EnvCheckError(Exception):
    """No facts could be gathered at all (SSH refused, host key not trusted, ...)."""


class Status(enum.StrEnum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"


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
            return Completed(_MISSING, "", f"{argv[0]}: command not found")
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


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int | None


@dataclass
class Facts:
    """What was measured. ``None`` means unknown; ``notes`` say why."""

    target: str
    data_root: str
    ollama_url: str
    hostname: str | None = None
    os: str | None = None
    cpu_model: str | None = None
    cpu_cores: int | None = None
    ram_total_bytes: int | None = None
    ram_available_bytes: int | None = None
    disk_free_bytes: int | None = None
    disk_measured_at: str | None = None
    gpus: list[Gpu] | None = None  # None: nvidia-smi absent or failing
    load_average: tuple[float, float, float] | None = None
    ollama: NodeHealth | None = None
    notes: list[str] = field(default_factory=list)


def parse_meminfo(text: str) -> tuple[int | None, int | None]:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo (values there are kiB)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return values.get("MemTotal"), values.get("MemAvailable")


def parse_df(text: str) -> tuple[int, str]:
    """(bytes available, mount point) from ``df -B1 --output=avail,target``."""
    lines = [line for line in text.splitlines() if line.strip()]
    avail, _, target = (lines[-1] if lines else "").strip().partition(" ")
    return int(avail), target.strip()  # ValueError when it is not df's answer


def parse_loadavg(text: str) -> tuple[float, float, float] | None:
    try:
        one, five, fifteen = (float(v) for v in text.split()[:3])
    except ValueError:
        return None
    return one, five, fifteen


def parse_cpu_model(text: str) -> str | None:
    for key in ("model name", "Model", "Hardware", "cpu model"):
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key and value.strip():
                return " ".join(value.split())
    return None


def parse_gpus(text: str) -> list[Gpu]:
    """``nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits`` (MiB)."""
    gpus = []
    for line in text.splitlines():
        name, _, memory = line.rpartition(",")
        if not name.strip():
            continue
        mib = memory.strip()
        gpus.append(Gpu(name.strip(), int(mib) * 1024 * 1024 if mib.isdigit() else None))
    return gpus


def _df_candidates(data_root: str, *, local: bool) -> list[tuple[str, str]]:
    """(argument for df, path to show): data_root, then each parent, because data_root
    may not exist yet on a fresh node and its nearest existing parent is what fills up."""
    if local:
        path = PurePosixPath(os.path.expanduser(data_root))
    elif data_root == "~" or data_root.startswith("~/"):
        # An SSH command starts in the login's home directory: "~/x" is "x" there.
        relative = PurePosixPath(data_root[2:] or ".")
        return [(str(p), "~" if str(p) == "." else f"~/{p}") for p in (relative, *relative.parents)]
    else:
        path = PurePosixPath(data_root)
    return [(str(p), str(p)) for p in (path, *path.parents)]


async def gather(
    runner: Runner,
    *,
    target: str,
    data_root: str,
    ollama_url: str,
    health_timeout: float,
    local: bool,
) -> Facts:
    """Collect the facts; a command that fails leaves its fact unknown with a note."""
    facts = Facts(target=target, data_root=data_root, ollama_url=ollama_url)
    api = asyncio.ensure_future(check_nodes([(target, ollama_url)], time_limit=health_timeout))
    try:
        await _gather_commands(runner, facts, local=local)
    finally:
        facts.ollama = (await api)[0]
    return facts


async def _gather_commands(runner: Runner, facts: Facts, *, local: bool) -> None:
    async def read(*argv: str) -> str | None:
        done = await runner.run(argv)
        if done.exit_status == 0:
            return done.stdout
        reason = "not installed" if done.exit_status == _MISSING else done.stderr.strip()
        facts.notes.append(f"`{shlex.join(argv)}` failed: {reason or done.exit_status}")
        return None

    if text := await read("cat", "/proc/sys/kernel/hostname"):
        facts.hostname = text.strip()
    if text := await read("cat", "/etc/os-release"):
        pretty = [line for line in text.splitlines() if line.startswith("PRETTY_NAME=")]
        facts.os = pretty[0].partition("=")[2].strip().strip('"') if pretty else None
    if text := await read("cat", "/proc/cpuinfo"):
        facts.cpu_model = parse_cpu_model(text)
    if (text := await read("nproc")) and text.strip().isdigit():
        facts.cpu_cores = int(text.strip())
    if text := await read("cat", "/proc/meminfo"):
        facts.ram_total_bytes, facts.ram_available_bytes = parse_meminfo(text)
    if text := await read("cat", "/proc/loadavg"):
        facts.load_average = parse_loadavg(text)
    candidates = _df_candidates(facts.data_root, local=local)
    for candidate, shown in candidates:
        done = await runner.run(("df", "-B1", "--output=avail,target", candidate))
        if done.exit_status == 0:
            try:
                facts.disk_free_bytes, mount = parse_df(done.stdout)
            except ValueError:
                facts.notes.append(f"`df` printed something unexpected: {done.stdout[:120]!r}")
                break
            facts.disk_measured_at = shown
            if candidate != candidates[0][0]:
                facts.notes.append(
                    f"df could not measure {facts.data_root} (not created yet?); free space "
                    f"measured at {shown} (mounted on {mount})"
                )
            break
    if facts.disk_free_bytes is None:
        facts.notes.append(f"free space at {facts.data_root} could not be measured with df")
    query = ("nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits")
    done = await runner.run(query)
    if done.exit_status == 0:
        facts.gpus = parse_gpus(done.stdout)
    else:
        missing = done.exit_status == _MISSING
        facts.notes.append(
            "no NVIDIA GPU tools (nvidia-smi not installed)"
            if missing
            else f"nvidia-smi failed: {done.stderr.strip() or done.exit_status}"
        )


@dataclass(frozen=True)
class Check:
    key: str
    name: str
    threshold: str
    measured: str
    status: Status
    detail: str = ""


def format_gb(value: float | None) -> str:
    return "unknown" if value is None else f"{value / GB:,.1f} GB"


def _level(measured: float, minimum: float, *, strict: bool) -> Status:
    if measured < minimum or (strict and measured <= minimum):
        return Status.FAIL
    return Status.WARN if measured < minimum * (1 + WARN_MARGIN) else Status.PASS


def evaluate(
    facts: Facts, limits: ReportSettings, *, baseline: Sequence[str], require_ollama: bool
) -> list[Check]:
    """The threshold table. Unknown RAM or disk fails: a check that cannot run cannot pass."""
    checks = []
    ram_min = limits.min_ram_gb * GB
    ram = facts.ram_total_bytes
    checks.append(
        Check(
            "ram_total",
            "Total RAM",
            f">= {limits.min_ram_gb:g} GB",
            format_gb(ram),
            Status.FAIL if ram is None else _level(ram, ram_min, strict=False),
        )
    )
    disk_min = limits.min_free_disk_gb * GB
    disk = facts.disk_free_bytes
    checks.append(
        Check(
            "disk_free",
            f"Free disk at {facts.data_root}",
            f"> {limits.min_free_disk_gb:g} GB",
            format_gb(disk),
            Status.FAIL if disk is None else _level(disk, disk_min, strict=True),
            f"measured at {facts.disk_measured_at}" if facts.disk_measured_at else "",
        )
    )
    api = facts.ollama
    reachable = api is not None and api.ok
    checks.append(
        Check(
            "ollama_api",
            "Ollama API",
            f"answers at {facts.ollama_url}",
            f"version {api.version}" if api and api.ok else "no answer",
            Status.PASS if reachable else Status.FAIL if require_ollama else Status.WARN,
            "" if reachable or api is None else str(api.error),
        )
    )
    if reachable and api is not None and baseline:
        present = {m.name for m in api.models}
        missing = [m for m in baseline if m not in present]
        checks.append(
            Check(
                "baseline_models",
                "Baseline models present",
                f"{len(baseline)} of {len(baseline)}",
                f"{len(baseline) - len(missing)} of {len(baseline)}",
                Status.WARN if missing else Status.PASS,
                f"missing: {', '.join(missing)} (olmd sync fetches them)" if missing else "",
            )
        )
    return checks


@dataclass(frozen=True)
class Report:
    """One verify-env run; ``daemon.ops.report`` renders and writes it."""

    facts: Facts
    checks: list[Check]
    generated_at: datetime
    command: str

    @property
    def status(self) -> Status:
        found = {c.status for c in self.checks}
        return next((s for s in (Status.FAIL, Status.WARN) if s in found), Status.PASS)


async def verify(
    settings: Settings,
    *,
    node: NodeSettings | None = None,
    ollama_url: str | None = None,
    require_ollama: bool = False,
    command: str = "olmd verify-env",
) -> Report:
    """Gather and evaluate the facts of this machine, or of ``node`` over SSH."""
    ollama = settings.services.ollama
    local_url = f"{ollama.scheme}://{ollama.host}:{ollama.port}"
    url = ollama_url or (node.url if node else local_url)
    common: dict[str, Any] = {
        "data_root": ollama.download.data_root,
        "ollama_url": url,
        "health_timeout": ollama.health_timeout,
    }
    if node is None:
        facts = await gather(LocalRunner(), target="local", local=True, **common)
    else:
        async with ssh_runner(settings, node) as runner:
            facts = await gather(runner, target=node.name, local=False, **common)
    checks = evaluate(
        facts, settings.report, baseline=ollama.baseline_models, require_ollama=require_ollama
    )
    return Report(facts, checks, datetime.now(UTC), command)
