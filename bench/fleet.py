"""olmd's routing benchmark: multi-turn chats on three emulated nodes, several ways to route.

    .venv/bin/python bench/fleet.py [--workload NAME|all] [--quick] [--users N] ...

Five workloads (bench/fleet_workloads.py; ``all``, the default, runs each in turn):
``spread``, ``one-model``, ``contention``, ``ollama-defaults`` and
``ollama-defaults-cache``, each held to its own targets.

Three ``olmd emulate`` nodes with Ollama's performance model switched on (slots per
model with a KV cache each, chosen as llama-server chooses them, its host-RAM prompt
cache, a prompt rate, one resident model per node, a cold load to change it), warmed
on one model each. The same users (same seed) then hold the same conversations through
each peer, on freshly started nodes every time: nginx round-robin, olmd ``weighted``,
olmd ``adaptive``, and a client-side oracle that pins every user to a node holding its
model. Prints a table and the targets (adaptive against round-robin and
against the oracle); writes bench/fleet_results.md and bench/fleet_results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import fleet_report as report
from fleet_load import User, Workload, build_users, oracle_homes, run_users
from fleet_report import Peer
from fleet_workloads import PRESETS, Preset
from procs import LOOPBACK, Processes, cpu_pressure_us, cpu_seconds, free_port, wait_http
from run import clean_env, configure_emulators, nginx_conf, olmd_bin

from daemon.cli.common import run_async  # uvloop when installed, as olmd runs

HERE = Path(__file__).resolve().parent
MODELS = ("llama3.1:8b", "qwen3:8b")
NGINX_HINT = "apt-get install -y nginx"
Urls = tuple[Callable[[User], str], Callable[[User, str | None], str | None]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--workload", default="all", choices=["all", *PRESETS], help="which workload (all)")
    add("--quick", action="store_true", help="a smoke run: 12 users, 4 turns, shorter deadline")
    add("--users", type=int, help="users (default: the workload's)")
    add("--turns", type=int, default=6, help="turns per conversation (6)")
    add("--parallel", type=int, help="slots per model and node (default: the workload's)")
    add("--prompt-rate", type=float, default=2000.0, help="prompt tokens/s per slot (2000)")
    add("--token-delay", type=float, default=0.01, help="seconds per generated token (0.01)")
    add("--tokens", type=int, default=20, help="tokens per answer (20)")
    add("--load-delay", type=float, help="cold load seconds (default: the workload's)")
    add(
        "--cache-tokens",
        type=int,
        help="host-RAM prompt cache per model and node in tokens, 0 = off "
        "(default: the emulator's, llama-server's 8 GiB)",
    )
    add("--system-tokens", type=int, default=1500, help="shared system prompt (1500)")
    add("--first-tokens", type=int, default=3000, help="first message, a document (3000)")
    add("--followup-tokens", type=int, default=30, help="each follow-up (30)")
    add("--seed", type=int, default=7)
    add("--deadline", type=float, default=40.0, help="seconds of load per peer, at most (40)")
    add("--request-timeout", type=float, default=30.0, help="per request (30)")
    add("--peers", help="comma-separated subset to run (default: the workload's)")
    add("--out", type=Path, default=HERE, help="where fleet_results.md/.json go (bench/)")
    args = parser.parse_args()
    if args.quick:
        args.turns = min(args.turns, 4)
        args.deadline = min(args.deadline, 15.0)
    if args.peers is not None:
        args.peers = [p for p in args.peers.split(",") if p]
        if unknown := sorted(set(args.peers) - set(report.PEERS)):
            parser.error(f"unknown peers {unknown}; expected some of {list(report.PEERS)}")
    if not 1 <= (args.parallel or 1) <= 64 or not 1 <= args.deadline <= 300:
        parser.error("--parallel must be within 1..64 and --deadline within 1..300 s")
    if not 1 <= args.request_timeout <= 300 or (args.load_delay or 0) > 30:
        parser.error("--request-timeout must be within 1..300 s, --load-delay at most 30 s")
    return args


def for_preset(args: argparse.Namespace, preset: Preset) -> argparse.Namespace:
    """The run's arguments for one workload: the preset's, unless given on the command line."""
    out = argparse.Namespace(**vars(args))
    out.preset = preset
    out.users = args.users or (min(preset.users, 12) if args.quick else preset.users)
    out.parallel = args.parallel or preset.parallel
    out.load_delay = preset.load_delay if args.load_delay is None else args.load_delay
    out.cache_tokens = preset.cache_tokens if args.cache_tokens is None else args.cache_tokens
    out.peers = args.peers or list(preset.peers)
    out.placement = preset.placement
    if args.workload == "all":
        out.out = args.out / "fleet" / preset.name
    return out


def workload(args: argparse.Namespace) -> Workload:
    return Workload(
        users=args.users,
        turns=args.turns,
        models=MODELS,
        second_share=args.preset.second_share,
        system_tokens=args.system_tokens,
        first_tokens=args.first_tokens,
        followup_tokens=args.followup_tokens,
        think=(0.2, 0.8),
        stagger=3.0,
        seed=args.seed,
    )


def performance(args: argparse.Namespace) -> dict[str, Any]:
    """The emulators' performance model, posted to each one's /_emulator/config."""
    return {
        "num_parallel": args.parallel,
        "prompt_rate": args.prompt_rate,
        "token_delay": args.token_delay,
        "tokens": args.tokens,
        "load_delay": args.load_delay,
        "max_loaded": args.preset.max_loaded,
    } | ({} if args.cache_tokens is None else {"cache_tokens": args.cache_tokens})


def choose_cpus() -> tuple[int | None, int | None, str]:
    """(client and nodes' core, proxy's core, a sentence saying so)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None, f"not pinned: only {len(cpus)} core available to the benchmark"
    os.sched_setaffinity(0, {cpus[0]})  # this process is the client
    note = f"client and emulated nodes on core {cpus[0]}; nginx or olmd on core {cpus[1]}"
    return cpus[0], cpus[1], note


# ---------------------------------------------------------------- the processes


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as answer:
        data: dict[str, Any] = json.loads(answer.read())
        return data


def start_nodes(procs: Processes, args: argparse.Namespace, cpu: int | None) -> list[int]:
    """Three fresh emulators, configured, each warmed on its placement model."""
    ports = [free_port() for _ in args.placement]
    for i, port in enumerate(ports):
        argv = [olmd_bin(), "--log-format", "json", "--log-level", "warning", "emulate"]
        argv += ["--host", LOOPBACK, "--port", str(port), "--name", f"node-{i}"]
        procs.start(f"emulator-{i}", [*argv, "--models", *MODELS], cpu=cpu, env=clean_env())
    for port in ports:
        wait_http(f"http://{LOOPBACK}:{port}/api/version", procs)
    configure_emulators(ports, **performance(args))

    async def warm(session: aiohttp.ClientSession, port: int, model: str) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False}
        url = f"http://{LOOPBACK}:{port}/api/chat"
        async with session.post(url, json=body) as answer:
            if answer.status != 200:
                raise RuntimeError(f"warming {url} answered {answer.status}")

    async def warm_all() -> None:
        timeout = aiohttp.ClientTimeout(total=args.load_delay + 15)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(
                *(warm(session, p, m) for p, m in zip(ports, args.placement, strict=True))
            )

    run_async(warm_all())
    return ports


def olmd_settings(port: int, nodes: list[int], strategy: str, args: argparse.Namespace) -> str:
    node_tables = "".join(
        f'\n[[services.ollama.nodes]]\nname = "node-{i}"\nhost = "{LOOPBACK}"\nport = {p}\n'
        f"max_loaded_models = {args.preset.max_loaded}\n"
        for i, p in enumerate(nodes)
    )
    return f"""\
[server]
host = "{LOOPBACK}"
port = {port}

[routing]
strategy = "{strategy}"
parallel = {args.parallel}
probe_interval = 1
cold_load_seconds = {args.load_delay}
affinity_entries_per_slot = {args.preset.entries_per_slot}
queue_limit = 1024
queue_timeout = {args.request_timeout}

[jobs.ollama_sync]
enabled = false
{node_tables}"""


def start_olmd(
    procs: Processes, work: Path, nodes: list[int], strategy: str, args: argparse.Namespace,
    cpu: int | None,
) -> tuple[int, int]:  # fmt: skip
    """olmd's port and process group, once it knows which model each node has loaded."""
    port = free_port()
    config = work / "olmd.toml"
    config.write_text(olmd_settings(port, nodes, strategy, args))
    argv = [olmd_bin(), "--config", str(config), "--log-format", "json"]
    argv += ["--log-level", "warning", "serve"]
    proc = procs.start("olmd", argv, cpu=cpu, cwd=work, env=clean_env())
    url = f"http://{LOOPBACK}:{port}"
    wait_http(url + "/readyz", procs)
    # Routing on what is loaded where needs a probe of /api/ps first: wait for it.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as answer:
            lines = answer.read().decode().splitlines()
        loaded = [x for x in lines if x.startswith("olmd_node_loaded_models{")]
        if len(loaded) == len(nodes) and all(float(x.split()[-1]) >= 1 for x in loaded):
            return port, proc.pid
        time.sleep(0.2)
    raise RuntimeError("olmd did not see the warm models within 10 s")


def nginx_path() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def start_nginx(procs: Processes, work: Path, nodes: list[int], cpu: int | None) -> tuple[int, int]:
    nginx = nginx_path()
    if nginx is None:
        raise RuntimeError(f"nginx not installed ({NGINX_HINT})")
    prefix = work / "nginx"
    (prefix / "tmp").mkdir(parents=True)
    port = free_port()
    conf = nginx_conf(port, nodes, prefix).replace(
        "proxy_buffering off;",
        "proxy_buffering off;\n            add_header X-Upstream-Addr $upstream_addr always;",
    )
    (prefix / "nginx.conf").write_text(conf)
    argv = [nginx, "-c", str(prefix / "nginx.conf"), "-p", str(prefix)]
    proc = procs.start("nginx", argv, cpu=cpu)
    wait_http(f"http://{LOOPBACK}:{port}/api/version", procs)
    return port, proc.pid


# ---------------------------------------------------------------- one peer


def oracle_urls(users: list[User], nodes: list[int], placement: tuple[str, ...]) -> Urls:
    home = oracle_homes(users, placement)
    return (
        lambda u: f"http://{LOOPBACK}:{nodes[home[u.index]]}",
        lambda u, _: f"node-{home[u.index]}",
    )


def run_peer(
    name: str, args: argparse.Namespace, users: list[User], procs: Processes, work: Path,
    cpus: tuple[int | None, int | None],
) -> Peer:  # fmt: skip
    node_cpu, proxy_cpu = cpus
    peer = Peer(name)
    if name == "nginx" and nginx_path() is None:
        peer.skipped = f"nginx not installed ({NGINX_HINT})"
        return peer
    nodes = start_nodes(procs, args, node_cpu)
    by_addr = {f"{LOOPBACK}:{p}": f"node-{i}" for i, p in enumerate(nodes)}
    pid = None
    if name == "oracle":
        url_for, node_for = oracle_urls(users, nodes, args.placement)
        peer.note = "client-side: each user straight to a node warmed on its model"
    else:
        if name == "nginx":
            port, pid = start_nginx(procs, work, nodes, proxy_cpu)
            peer.note = "worker_processes 1, round-robin upstream, keepalive, proxy_buffering off"
        else:
            port, pid = start_olmd(procs, work, nodes, name, args, proxy_cpu)
            peer.note = f"olmd serve, strategy {name}, parallel {args.parallel}"
        url = f"http://{LOOPBACK}:{port}"
        url_for = lambda _: url  # noqa: E731
        node_for = lambda _, seen: by_addr.get(seen or "", seen)  # noqa: E731
    before = [get_json(f"http://{LOOPBACK}:{p}/_emulator/stats") for p in nodes]
    cpu_before = cpu_seconds(pid) if pid else 0.0
    turns, peer.wall_s, peer.unfinished = run_async(
        run_users(
            users, url_for, node_for, request_timeout=args.request_timeout, deadline=args.deadline
        )
    )
    peer.turns = turns
    if pid:
        peer.proxy_cpu_s = cpu_seconds(pid) - cpu_before
    procs.check()
    for i, (port, old) in enumerate(zip(nodes, before, strict=True)):
        new = get_json(f"http://{LOOPBACK}:{port}/_emulator/stats")
        peer.nodes[f"node-{i}"] = report.stats_delta(old, new)
    return peer


# ---------------------------------------------------------------- the run


def machine_facts(args: argparse.Namespace, pinning: str, w: Workload) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((x.split(":", 1)[1].strip() for x in cpuinfo if x.startswith("model name")), "?")
    version = subprocess.run(
        [olmd_bin(), "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout.strip()
    second = round(w.users * w.second_share)
    return {
        "workload": f"{args.preset.name}: {args.preset.title}",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": f"nproc {os.cpu_count()}, {model}, Linux {platform.release()}",
        "python": f"{platform.python_version()}, aiohttp {aiohttp.__version__}",
        "olmd": version or "?",
        "pinning": pinning,
        "nodes": f"3 x `olmd emulate` with {', '.join(MODELS)}; warmed on "
        + ", ".join(f"node-{i} {m}" for i, m in enumerate(args.placement))
        + "; restarted for every peer",
        "performance model": ", ".join(f"{k}={v}" for k, v in performance(args).items()),
        "users": f"{w.users} ({w.users - second} on {MODELS[0]}, {second} on {MODELS[1]}), "
        f"{w.turns} turns each, starting within {w.stagger:g} s, think time "
        f"{w.think[0]:g}-{w.think[1]:g} s, seed {w.seed}",
        "prompts": f"system ~{w.system_tokens} tokens shared per model, first message "
        f"~{w.first_tokens} tokens, follow-ups ~{w.followup_tokens} tokens; streamed "
        "/api/chat, each reply appended to the history",
        "olmd settings": f"parallel={args.parallel}, probe_interval=1, "
        f"cold_load_seconds={args.load_delay:g}, "
        f"affinity_entries_per_slot={args.preset.entries_per_slot}, "
        f"max_loaded_models={args.preset.max_loaded} per node",
        "bounds": f"{args.request_timeout:g} s per request, {args.deadline:g} s of load per peer",
    }


def run(
    args: argparse.Namespace, registry: list[Processes], work: Path, cpus: tuple[Any, Any, str]
) -> dict[str, Any]:
    """One workload through every peer; its results (also written to args.out)."""
    node_cpu, proxy_cpu, pinning = cpus
    print(f"workload {args.preset.name}: {args.preset.title}", flush=True)
    w = workload(args)
    users = build_users(w)
    # Enough slots that the oracle keeps every conversation's cache: with fewer, even a
    # perfect router loses them, and the run would measure slot thrashing, not routing.
    homes = oracle_homes(users, args.placement)
    args.parallel = args.parallel or max(Counter(homes.values()).values())
    meta = machine_facts(args, pinning, w)
    t0, pressure_before = time.monotonic(), cpu_pressure_us()
    peers: dict[str, Peer] = {}
    for name in args.peers:
        print(f"peer {name} ...", flush=True)
        (work / args.preset.name / name).mkdir(parents=True)
        procs = Processes(work / args.preset.name / name)
        registry.append(procs)
        try:
            peer = run_peer(
                name, args, users, procs, work / args.preset.name / name, (node_cpu, proxy_cpu)
            )
        finally:
            procs.stop_all()
        peers[name] = peer
        print(f"  {peer.skipped or f'{len(peer.turns)} requests in {peer.wall_s:.1f} s'}")
    elapsed = time.monotonic() - t0
    noise = f"load average {os.getloadavg()[0]:.2f} at end"
    if pressure_before is not None and (after := cpu_pressure_us()) is not None:
        noise += f"; CPU pressure (PSI 'some') {(after - pressure_before) / 1e6 / elapsed:.0%}"
    meta["run"] = f"{elapsed:.0f} s in all; {noise}" + (" (--quick)" if args.quick else "")

    summaries = {name: report.summarize(peer) for name, peer in peers.items()}
    rows = report.table_rows(summaries)
    targets = report.evaluate(summaries, len(args.placement), args.preset.targets)
    notes = report.observations(summaries)
    print(f"\n{report.render_text(rows)}\n\n{report.render_targets(targets)}\n")
    print("\n".join(notes))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet_results.md").write_text(report.render_markdown(meta, rows, targets, notes))
    data = {
        **meta,
        "parameters": {k: v for k, v in vars(args).items() if k != "preset"}
        | {"out": str(args.out), "workload": args.preset.name},
        "targets": targets,
        "peers": {n: report.peer_json(p, summaries[n]) for n, p in peers.items()},
    }
    (args.out / "fleet_results.json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"\nwritten: {args.out / 'fleet_results.md'}, {args.out / 'fleet_results.json'}")
    return {"meta": meta, "rows": rows, "targets": targets}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    registry: list[Processes] = []
    with tempfile.TemporaryDirectory(prefix="olmd-fleet-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx's worker may run as another user
        try:
            cpus = choose_cpus()
            print(cpus[2])
            names = list(PRESETS) if args.workload == "all" else [args.workload]
            results = {n: run(for_preset(args, PRESETS[n]), registry, work, cpus) for n in names}
            if len(results) > 1:
                summary = report.render_summary(results)
                (args.out / "fleet_results.md").write_text(summary)
                print(f"\n{summary}\nwritten: {args.out / 'fleet_results.md'}")
            return 0
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
        except (RuntimeError, OSError, subprocess.SubprocessError, aiohttp.ClientError) as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
        finally:
            for procs in registry:
                procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
