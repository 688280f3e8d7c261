"""``olmd verify-env``: the facts of a machine, checked against the capacity thresholds.

Facts come from a handful of read-only commands (``cat /proc/meminfo``, ``df``, ``nproc``,
``nvidia-smi``, ...), run locally or on a node over SSH by ``daemon.ops.runners``, so both
paths share one parser; the Ollama version and models come from the node's HTTP API. The
result is a ``Report``: a threshold table over the facts, rendered and written by
``daemon.ops.report``.

Sizes are decimal: 1 GB = 10**9 bytes (a "64 GB" machine reports about 67 GB of MemTotal).
"""

from __future__ import annotations

import asyncio
import enum
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from daemon.ops.runners import MISSING, Completed, EnvCheckError, LocalRunner, Runner, ssh_runner
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


class Status(enum.StrEnum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"


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
        reason = "not installed" if done.exit_status == MISSING else done.stderr.strip()
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
        missing = done.exit_status == MISSING
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
