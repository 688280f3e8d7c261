"""The ``olmd verify-env`` report: Markdown for people, a JSON twin for machines.

Rendering only reads a :class:`~daemon.ops.envcheck.Report`; ``write_report`` writes both files
atomically, so a reader never sees half a report.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.atomicfile import write_atomic
from daemon.ops.envcheck import WARN_MARGIN, Facts, Report, Status, format_gb

__all__ = ["json_path_for", "to_json", "to_markdown", "write_report"]


def to_json(report: Report) -> dict[str, Any]:
    return {
        "schema": 1,
        "generated_at": report.generated_at.isoformat(timespec="seconds"),
        "olmd_version": __version__,
        "command": report.command,
        "status": str(report.status),
        "checks": [asdict(c) for c in report.checks],
        "facts": asdict(report.facts),
    }


def to_markdown(report: Report) -> str:
    facts, checks = report.facts, report.checks
    counts = ", ".join(
        f"{sum(c.status is s for c in checks)} {s}" for s in (Status.FAIL, Status.WARN, Status.PASS)
    )
    title = "this machine" if facts.target == "local" else f"node {facts.target}"
    lines = [
        f"# Ollama health report: {title}",
        "",
        f"Generated {report.generated_at:%Y-%m-%d %H:%M:%S %Z} by olmd {__version__} "
        f"(`{report.command}`). Sizes in GB of 10^9 bytes; a warning means less than "
        f"{WARN_MARGIN:.0%} headroom over the threshold.",
        "",
        f"**Result: {report.status.upper()}** ({counts}).",
        "",
        "## Capacity thresholds",
        "",
        *_table(
            ("Check", "Threshold", "Measured", "Result", "Detail"),
            [(c.name, c.threshold, c.measured, c.status.upper(), c.detail) for c in checks],
        ),
        "",
        "## Host",
        "",
        *_table(("Fact", "Value"), _fact_rows(facts)),
        "",
    ]
    models = facts.ollama.models if facts.ollama else ()
    lines += [f"## Models ({len(models)})", ""]
    if facts.ollama is None or not facts.ollama.ok:
        lines.append(f"Not listed: the Ollama API at {facts.ollama_url} did not answer.")
    elif not models:
        lines.append("The node has no models yet.")
    else:
        rows = [
            (m.name, format_gb(m.size), (m.digest or "")[:12], m.modified_at or "") for m in models
        ]
        lines += _table(("Model", "Size", "Digest", "Modified"), rows)
    if facts.notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in facts.notes)]
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows),
    ]


def _fact_rows(facts: Facts) -> list[tuple[str, str]]:
    unknown = "unknown"
    cores = f" ({facts.cpu_cores} cores)" if facts.cpu_cores else ""
    if facts.gpus is None:
        gpus = "none found (no nvidia-smi)"
    else:
        gpus = "; ".join(f"{g.name} ({format_gb(g.memory_bytes)})" for g in facts.gpus) or "none"
    load = facts.load_average
    api = facts.ollama
    ram = f"{format_gb(facts.ram_total_bytes)} total, {format_gb(facts.ram_available_bytes)}"
    return [
        ("Host name", facts.hostname or unknown),
        ("OS", facts.os or unknown),
        ("CPU", f"{facts.cpu_model or unknown}{cores}"),
        ("RAM", f"{ram} available"),
        (
            "Disk",
            f"{format_gb(facts.disk_free_bytes)} free at "
            f"{facts.disk_measured_at or facts.data_root}",
        ),
        ("GPUs", gpus),
        ("Load average (1/5/15 min)", " / ".join(f"{v:.2f}" for v in load) if load else unknown),
        (
            "Ollama",
            f"{api.version} at {api.url}" if api and api.ok else f"no answer at {facts.ollama_url}",
        ),
    ]


def json_path_for(path: Path) -> Path:
    """The JSON twin of a Markdown report: same name, ``.json`` suffix."""
    return path.with_suffix(".json")


def write_report(report: Report, path: Path) -> tuple[Path, Path]:
    """Write the Markdown report and its JSON twin, each atomically; returns both paths."""
    twin = json_path_for(path)
    write_atomic(path, to_markdown(report).encode())
    write_atomic(twin, (json.dumps(to_json(report), indent=2) + "\n").encode())
    return path, twin
