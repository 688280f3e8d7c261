"""olmd's distribution benchmark: registry bytes and wall time, direct against gateway.

    .venv/bin/python bench/sync.py [--nodes 1,3,10] [--sizes 24,12]

An emulated registry with the public registry's behaviour (307 to another host name for
blobs, Range parts) publishes two models behind a link of ``--link-mbit`` (the site's
internet link, shared by every download); N emulated nodes start empty. ``direct``: each
node pulls every model from the registry itself (today's default). ``gateway``: olmd
downloads each blob once into its cache and the nodes pull from olmd's registry routes,
then copy to the short name. Both through ``run_sync``, the engine ``olmd sync`` runs.
Target: registry bytes at most 1.1x the models' size, whatever N. Prints a table and
writes it between the README's markers.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402

from daemon.emulator.registry import EmulatedRegistry  # noqa: E402
from daemon.emulator.server import Emulator, EmulatorConfig  # noqa: E402
from daemon.logs import configure  # noqa: E402
from daemon.runtime import RUNTIME, Phase  # noqa: E402
from daemon.service import build_app  # noqa: E402
from daemon.settings import Settings  # noqa: E402
from daemon.sync.service import SyncOptions, run_sync  # noqa: E402

MODELS = ["llama3.1:8b", "qwen3:8b"]
README_START = "<!-- bench/sync.py results: start -->"
README_END = "<!-- bench/sync.py results: end -->"
TARGET = 1.1


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_for(
    work: Path, registry: EmulatedRegistry, nodes: list[Emulator], mode: str, port: int
) -> Settings:
    return Settings(
        server={"host": "127.0.0.1", "port": port},
        distribution={
            "mode": mode,
            "registry": registry.url,
            "cache_dir": str(work / "cache"),
            "advertise_url": f"http://127.0.0.1:{port}",
        },
        services={
            "ollama": {
                "health_timeout": 10.0,
                "baseline_models": MODELS,
                "fallback_models": [],
                "nodes": [
                    {"name": f"n{i}", "host": "127.0.0.1", "port": e.port}
                    for i, e in enumerate(nodes)
                ],
                "download": {"max_parallel_jobs": 4, "retry": {"backoff_seconds": 0.1}},
            }
        },
        jobs={"ollama_sync": {"enabled": False, "manifest_path": str(work / "manifest.json")}},
    )


async def one_run(count: int, mode: str, sizes: list[int], link: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="olmd-bench-sync-") as tmp:
        work = Path(tmp)
        async with EmulatedRegistry(link_bytes_per_second=link) as registry:
            for i, model in enumerate(MODELS):
                registry.add_model(model, [sizes[i % len(sizes)], 4_000], seed=i)
            size = sum(registry.model_bytes(m) for m in MODELS)
            nodes = [Emulator(EmulatorConfig(name=f"n{i}", models=[])) for i in range(count)]
            for emu in nodes:
                await emu.start()
                if mode == "direct":
                    emu.state.update({"registry": registry.url})
            port = free_port()
            settings = settings_for(work, registry, nodes, mode, port)
            runner = web.AppRunner(build_app(settings), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runner.app[RUNTIME].set_phase(Phase.READY)
            try:
                started = time.perf_counter()
                result = await run_sync(settings, SyncOptions(ignore_window=True))
                seconds = time.perf_counter() - started
            finally:
                await runner.cleanup()
                for emu in nodes:
                    await emu.stop()
            return {
                "nodes": count,
                "mode": mode,
                "ok": result.ok,
                "model_bytes": size,
                "registry_bytes": registry.stats.total_bytes,
                "seconds": seconds,
            }


def render(rows: list[dict[str, Any]]) -> str:
    out = [
        "| nodes | mode | registry bytes | x the models' size | wall time | all pulled | target |",
        "|---:|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        ratio = r["registry_bytes"] / r["model_bytes"]
        met = "met" if ratio <= TARGET else "**missed**"
        out.append(
            f"| {r['nodes']} | {r['mode']} | {r['registry_bytes']:,} | {ratio:.2f}x | "
            f"{r['seconds']:.2f} s | {'yes' if r['ok'] else 'no'} | "
            f"{met if r['mode'] == 'gateway' else '-'} |"
        )
    return "\n".join(out)


def update_readme(table: str, meta: str) -> bool:
    path = ROOT / "README.md"
    text = path.read_text()
    head, start, rest = text.partition(README_START)
    _, end, tail = rest.partition(README_END)
    if not start or not end:
        return False
    path.write_text(head + start + f"\n{meta}\n\n{table}\n" + end + tail)
    return True


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,3,10", help="node counts (default 1,3,10)")
    parser.add_argument("--sizes", default="24,12", help="each model's big layer, MB")
    parser.add_argument(
        "--link-mbit", type=float, default=400.0, help="the site's internet link, Mbit/s"
    )
    parser.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    args = parser.parse_args(argv)
    configure("warning", "console")
    sizes = [int(float(s) * 1_000_000) for s in args.sizes.split(",")]
    rows = []
    for count in (int(n) for n in args.nodes.split(",")):
        for mode in ("direct", "gateway"):
            rows.append(await one_run(count, mode, sizes, args.link_mbit * 1e6 / 8))
            print(f"{count} nodes, {mode}: done", file=sys.stderr)
    table = render(rows)
    print(table)
    meta = (
        f"Run of {dt.date.today()}: {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; two models of "
        f"{rows[0]['model_bytes'] / 1e6:.1f} MB together; the registry's link limited to "
        f"{args.link_mbit:g} Mbit/s (the site's internet link), the LAN is loopback."
    )
    missed = [
        r
        for r in rows
        if r["mode"] == "gateway" and r["registry_bytes"] / r["model_bytes"] > TARGET
    ]
    if not args.no_readme and update_readme(table, meta):
        print("README.md updated", file=sys.stderr)
    return 1 if missed or not all(r["ok"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
