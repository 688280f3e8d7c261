"""olmd's tenants benchmark: people chatting while a batch job floods the same fleet.

    .venv/bin/python bench/tenants.py [--quick] [--flood S] [--peers nginx,olmd,tenants] ...

Three ``olmd emulate`` nodes with Ollama's performance model (two slots per node, a
prompt rate, one model), warmed. An interactive tenant (3 people in multi-turn chats,
1 s think time) chats alone, then a batch tenant (24 workers sending ~2,000-token
summary requests back to back) floods the fleet while the people keep chatting. The same
load (same seed), on freshly started nodes each time, goes through nginx round-robin,
olmd without tenants (no keys: every request the same) and olmd with the two tenants
(``[[tenants]]`` and ``OLMD_API_KEYS``). Prints a table and the targets (with tenants, chat
p95 under the flood at most 1/8 of nginx's, batch throughput at least 80% of nginx's);
writes bench/tenants_results.md and bench/tenants_results.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import tenants_report as report
from fleet import choose_cpus, get_json, nginx_path, olmd_settings, start_nginx
from fleet_workloads import PRESETS
from procs import LOOPBACK, Processes, cpu_pressure_us, cpu_seconds, free_port, wait_http
from run import clean_env, configure_emulators, olmd_bin
from tenants_load import BatchRequest, Workload, run_load
from tenants_report import Peer

from daemon.cli.common import run_async  # uvloop when installed, as olmd runs

HERE = Path(__file__).resolve().parent
MODEL = "llama3.1:8b"
NODES = 3
NGINX_HINT = "apt-get install -y nginx"
# The two tenants' keys, given to olmd as OLMD_API_KEYS. Made up for the benchmark.
KEYS = {"chat": "chat-key-1", "batch": "batch-key-1"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="a smoke run: 5 s alone, 15 s of flood")
    add("--alone", type=float, default=10.0, help="seconds of chat before the flood (10)")
    add("--flood", type=float, default=30.0, help="seconds of chat under the flood (30)")
    add("--warm-up", type=float, default=3.0, help="flood seconds not in batch req/s (3)")
    add("--people", type=int, default=3, help="the interactive tenant's people (3)")
    add("--turns", type=int, default=6, help="turns per conversation (6)")
    add("--think", type=float, default=1.0, help="seconds between a person's turns (1.0)")
    add("--workers", type=int, default=24, help="the batch tenant's workers (24)")
    add("--batch-tokens", type=int, default=2000, help="tokens per batch prompt (2000)")
    add("--system-tokens", type=int, default=150, help="the chat's system prompt (150)")
    add("--message-tokens", type=int, default=40, help="each chat question (40)")
    add("--parallel", type=int, default=2, help="slots per node (2)")
    add("--prompt-rate", type=float, default=2000.0, help="prompt tokens/s per slot (2000)")
    add("--token-delay", type=float, default=0.01, help="seconds per generated token (0.01)")
    add("--tokens", type=int, default=20, help="tokens per answer (20)")
    add("--load-delay", type=float, default=2.0, help="cold load seconds, before warming (2)")
    add("--reserve", type=int, default=1, help="[routing] interactive_reserve (1)")
    add("--window", type=float, default=30.0, help="[routing] interactive_window (30)")
    add("--seed", type=int, default=7)
    add("--request-timeout", type=float, default=30.0, help="per request (30)")
    add("--peers", default=",".join(report.PEERS), help="comma-separated subset to run")
    add("--out", type=Path, default=HERE, help="where tenants_results.md/.json go (bench/)")
    args = parser.parse_args()
    if args.quick:
        args.alone, args.flood = min(args.alone, 5.0), min(args.flood, 15.0)
        args.warm_up = min(args.warm_up, 2.0)
    args.peers = [p for p in args.peers.split(",") if p]
    if unknown := sorted(set(args.peers) - set(report.PEERS)):
        parser.error(f"unknown peers {unknown}; expected some of {list(report.PEERS)}")
    if not 1 <= args.parallel <= 64 or not 1 <= args.request_timeout <= 300:
        parser.error("--parallel must be within 1..64 and --request-timeout within 1..300 s")
    if args.load_delay > 30 or not 0 <= args.reserve <= 64:
        parser.error("--load-delay must be at most 30 s and --reserve within 0..64")
    try:
        args.workload = workload(args)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def workload(args: argparse.Namespace) -> Workload:
    return Workload(
        model=MODEL,
        people=args.people,
        turns=args.turns,
        think=args.think,
        system_tokens=args.system_tokens,
        message_tokens=args.message_tokens,
        workers=args.workers,
        batch_tokens=args.batch_tokens,
        alone=args.alone,
        flood=args.flood,
        warm_up=args.warm_up,
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
        "max_loaded": 1,
    }


# ---------------------------------------------------------------- the processes


def start_nodes(procs: Processes, args: argparse.Namespace, cpu: int | None) -> list[int]:
    """Three fresh emulators, configured, each with the model loaded by a first request."""
    ports = [free_port() for _ in range(NODES)]
    for i, port in enumerate(ports):
        argv = [olmd_bin(), "--log-format", "json", "--log-level", "warning", "emulate"]
        argv += ["--host", LOOPBACK, "--port", str(port), "--name", f"node-{i}"]
        procs.start(f"emulator-{i}", [*argv, "--models", MODEL], cpu=cpu, env=clean_env())
    for port in ports:
        wait_http(f"http://{LOOPBACK}:{port}/api/version", procs)
    configure_emulators(ports, **performance(args))
    body = json.dumps({"model": MODEL, "prompt": "hi", "stream": False}).encode()
    for port in ports:  # one after the other: the cold loads are on the same core anyway
        warm = urllib.request.Request(f"http://{LOOPBACK}:{port}/api/generate", data=body)
        with urllib.request.urlopen(warm, timeout=args.load_delay + 15) as answer:
            answer.read()
    return ports


def settings(port: int, nodes: list[int], args: argparse.Namespace, *, tenants: bool) -> str:
    """olmd's settings: bench/fleet.py's for its one-model workload (adaptive, one resident
    model per node, one conversation remembered per slot), and for the tenants peer the
    headroom and the two tenants."""
    fleet_args = argparse.Namespace(**vars(args), preset=PRESETS["one-model"])
    text = olmd_settings(port, nodes, "adaptive", fleet_args)
    return tenants_settings(text, args) if tenants else text


def tenants_settings(base: str, args: argparse.Namespace) -> str:
    """``base`` (olmd's settings without tenants) plus the headroom and the two tenants."""
    head, jobs, tail = base.partition("\n[jobs.ollama_sync]")
    if not jobs:
        raise RuntimeError("fleet.olmd_settings has no [jobs.ollama_sync] table any more")
    routing = f"interactive_window = {args.window}\ninteractive_reserve = {args.reserve}\n"
    tenants = "".join(
        f'\n[[tenants]]\nname = "{name}"\npriority = "{priority}"\nweight = 1\n'
        for name, priority in (("chat", "interactive"), ("batch", "batch"))
    )
    return head + routing + jobs + tail + tenants


def olmd_env(tenants: bool) -> dict[str, str]:
    env = clean_env()
    if tenants:
        env["OLMD_API_KEYS"] = ",".join(f"{tenant}:{key}" for tenant, key in KEYS.items())
    return env


def refused(config: Path, env: dict[str, str]) -> str | None:
    """Why ``olmd config check`` refuses the settings, or None if it accepts them."""
    argv = [olmd_bin(), "--config", str(config), "config", "check"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env, check=False)
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return " ".join(x.strip() for x in lines[:3]) or f"exit status {done.returncode}"


def start_olmd(
    procs: Processes, config: Path, port: int, env: dict[str, str], nodes: list[int],
    cpu: int | None,
) -> int:  # fmt: skip
    """olmd's process group, once its probes have seen the model on every node."""
    argv = [olmd_bin(), "--config", str(config), "--log-format", "json"]
    argv += ["--log-level", "warning", "serve"]
    proc = procs.start("olmd", argv, cpu=cpu, cwd=config.parent, env=env)
    url = f"http://{LOOPBACK}:{port}"
    wait_http(url + "/readyz", procs)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as answer:
            lines = answer.read().decode().splitlines()
        loaded = [x for x in lines if x.startswith("olmd_node_loaded_models{")]
        if len(loaded) == len(nodes) and all(float(x.split()[-1]) >= 1 for x in loaded):
            return proc.pid
        time.sleep(0.2)
    raise RuntimeError("olmd did not see the warm model on every node within 10 s")


# ---------------------------------------------------------------- one peer


def run_peer(
    name: str, args: argparse.Namespace, procs: Processes, work: Path,
    cpus: tuple[int | None, int | None],
) -> Peer:  # fmt: skip
    node_cpu, proxy_cpu = cpus
    peer = Peer(name)
    if name == "nginx" and nginx_path() is None:
        peer.skipped = f"nginx not installed ({NGINX_HINT})"
        return peer
    nodes = start_nodes(procs, args, node_cpu)
    chat_headers: dict[str, str] = {}
    batch_headers: dict[str, str] = {}
    if name == "nginx":
        port, pid = start_nginx(procs, work, nodes, proxy_cpu)
        peer.note = "worker_processes 1, round-robin upstream, keepalive, proxy_buffering off"
    else:
        port, config, env = free_port(), work / "olmd.toml", olmd_env(name == "tenants")
        text = settings(port, nodes, args, tenants=name == "tenants")
        peer.note = f"olmd serve, adaptive, parallel {args.parallel}, no keys"
        if name == "tenants":
            chat_headers = {"Authorization": f"Bearer {KEYS['chat']}"}
            batch_headers = {"Authorization": f"Bearer {KEYS['batch']}"}
            peer.note = (
                f"olmd serve, adaptive, parallel {args.parallel}, tenants chat (interactive) "
                f"and batch (batch), interactive_reserve {args.reserve}"
            )
        config.write_text(text)
        if reason := refused(config, env):
            peer.skipped = f"olmd refuses the settings: {reason}"
            return peer
        pid = start_olmd(procs, config, port, env, nodes, proxy_cpu)
    by_addr = {f"{LOOPBACK}:{p}": f"node-{i}" for i, p in enumerate(nodes)}
    before = [get_json(f"http://{LOOPBACK}:{p}/_emulator/stats") for p in nodes]
    cpu_before = cpu_seconds(pid)
    peer.load = run_async(
        run_load(
            args.workload,
            f"http://{LOOPBACK}:{port}",
            chat_headers=chat_headers,
            batch_headers=batch_headers,
            request_timeout=args.request_timeout,
        )
    )
    peer.proxy_cpu_s = cpu_seconds(pid) - cpu_before
    for turn in peer.load.chats:
        turn.node = by_addr.get(turn.node or "", turn.node)
    for request in peer.load.batch:
        request.node = by_addr.get(request.node or "", request.node)
    procs.check()
    for i, (p, old) in enumerate(zip(nodes, before, strict=True)):
        new = get_json(f"http://{LOOPBACK}:{p}/_emulator/stats")
        peer.nodes[f"node-{i}"] = report.stats_delta(old, new)
    return peer


# ---------------------------------------------------------------- the run


def machine_facts(args: argparse.Namespace, pinning: str) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((x.split(":", 1)[1].strip() for x in cpuinfo if x.startswith("model name")), "?")
    version = subprocess.run(
        [olmd_bin(), "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout.strip()
    commit = subprocess.run(
        ["git", "-C", str(HERE), "describe", "--always", "--dirty"],
        capture_output=True, text=True, timeout=10, check=False,
    ).stdout.strip()  # fmt: skip
    w: Workload = args.workload
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": f"nproc {os.cpu_count()}, {model}, Linux {platform.release()}",
        "python": f"{platform.python_version()}, aiohttp {aiohttp.__version__}",
        "olmd": f"{version or '?'}, commit {commit or '?'}",
        "pinning": pinning,
        "nodes": f"{NODES} x `olmd emulate` with {MODEL}, warmed; restarted for every peer",
        "performance model": ", ".join(f"{k}={v}" for k, v in performance(args).items()),
        "interactive tenant": f"{w.people} people, conversations of {w.turns} streamed "
        f"/api/chat turns (system prompt ~{w.system_tokens} tokens, questions "
        f"~{w.message_tokens} tokens, replies appended), {w.think:g} s think time",
        "batch tenant": f"{w.workers} workers, non-streaming /api/generate of a different "
        f"~{w.batch_tokens}-token document each time, back to back",
        "phases": f"{w.alone:g} s of chat alone, then {w.flood:g} s of chat under the flood "
        f"(batch req/s counted after a {w.warm_up:g} s warm-up); seed {w.seed}",
        "olmd settings": f"adaptive, parallel={args.parallel}, probe_interval=1; with "
        f"tenants: [[tenants]] chat (interactive) and batch (batch), weight 1 each, "
        f"interactive_window={args.window:g}, interactive_reserve={args.reserve}, keys in "
        "OLMD_API_KEYS",
        "bounds": f"{args.request_timeout:g} s per request; no chat turn sent after "
        f"{w.alone + w.flood:g} s; at most {w.alone + w.flood + args.request_timeout + 2:g} s "
        "of load per peer",
    }


def run(args: argparse.Namespace, registry: list[Processes], work: Path) -> int:
    node_cpu, proxy_cpu, pinning = choose_cpus()
    print(pinning)
    meta = machine_facts(args, pinning)
    w: Workload = args.workload
    t0, pressure_before = time.monotonic(), cpu_pressure_us()
    peers: dict[str, Peer] = {}
    for name in args.peers:
        print(f"peer {name} ...", flush=True)
        (work / name).mkdir()
        procs = Processes(work / name)
        registry.append(procs)
        try:
            peer = run_peer(name, args, procs, work / name, (node_cpu, proxy_cpu))
        finally:
            procs.stop_all()
        peers[name] = peer
        load = peer.load
        print(f"  {peer.skipped or f'{len(load.chats)} chat turns, {len(load.batch)} batch'}")
    elapsed = time.monotonic() - t0
    noise = f"load average {os.getloadavg()[0]:.2f} at end"
    if pressure_before is not None and (after := cpu_pressure_us()) is not None:
        noise += f"; CPU pressure (PSI 'some') {(after - pressure_before) / 1e6 / elapsed:.0%}"
    meta["run"] = f"{elapsed:.0f} s in all; {noise}" + (" (--quick)" if args.quick else "")

    def batch_service(request: BatchRequest) -> float:
        """Seconds a batch request holds its slot, by the emulators' performance model: its
        prompt, saving the slot's previous occupant (a document about as long) to the
        host-RAM cache at ten times the prompt rate, then its answer."""
        tokens = (request.prompt_chars + len("user\n\n")) / 4
        return float(1.1 * tokens / args.prompt_rate + args.tokens * args.token_delay)

    summaries = {name: report.summarize(peer, w, batch_service) for name, peer in peers.items()}
    rows = report.table_rows(summaries)
    targets = report.evaluate(summaries)
    notes = report.observations(summaries)
    print(f"\n{report.render_table(rows)}\n\n{report.render_targets(targets)}\n")
    print("\n".join(notes))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tenants_results.md").write_text(report.render_markdown(meta, rows, targets, notes))
    parameters = {k: v for k, v in vars(args).items() if k != "workload"}
    data = {
        **meta,
        "parameters": parameters | {"out": str(args.out)},
        "targets": targets,
        "peers": {n: report.peer_json(p, summaries[n], w) for n, p in peers.items()},
    }
    (args.out / "tenants_results.json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"\nwritten: {args.out / 'tenants_results.md'}, {args.out / 'tenants_results.json'}")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    registry: list[Processes] = []
    with tempfile.TemporaryDirectory(prefix="olmd-tenants-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx's worker may run as another user
        try:
            return run(args, registry, work)
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
