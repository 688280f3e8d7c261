"""olmd's proxy benchmark: direct vs nginx vs bare aiohttp vs olmd on loopback, one run.

    .venv/bin/python bench/run.py [--quick] [--duration S] [--rounds N] [--profile]

Starts two emulated Ollama nodes (``olmd emulate``) and, in front of both, nginx (the
plain-proxy reference), a bare aiohttp pass-through (the floor for a Python proxy) and
olmd. Measures non-streaming requests/s and latency (wrk), streaming time to first byte
and chunks/s (an aiohttp client), the proxies' CPU and olmd's resident memory. The load
generator and the nodes share one core, the proxy under test gets the other. Prints a
table and the ratios against the targets; writes bench/results.md and bench/results.json,
and (full runs only) the results section of bench/README.md.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any

import aiohttp
import loadgen
import report
from procs import (
    LOOPBACK,
    Processes,
    RssSampler,
    cpu_pressure_us,
    cpu_seconds,
    free_port,
    rss_mb,
    wait_http,
)
from report import POST_CONCURRENCY, STREAM_CONCURRENCY, Column

from daemon.cli.common import run_async  # uvloop when installed, as olmd runs

HERE = Path(__file__).resolve().parent
MODEL = "llama3.1:8b"
POST_BODY = json.dumps({"model": MODEL, "prompt": "hi", "stream": False})
STREAM_BODY = json.dumps({"model": MODEL, "prompt": "hi", "stream": True})
POST_TOKENS = 8
INSTALL_HINT = "apt-get install -y nginx wrk"
WARM_UP = 1.0  # seconds of load before each non-streaming measurement, not counted
SETTLE = 0.3  # seconds between two measurements


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="a smoke run: 1 round of 2 s measurements")
    add("--duration", type=float, default=5.0, help="seconds per measurement (default 5)")
    add("--rounds", type=int, default=3, help="rounds; the table shows medians (default 3)")
    add("--stream-tokens", type=int, default=100, help="tokens per stream (default 100)")
    add("--token-delay", type=float, default=0.01, help="seconds between tokens (default 0.01)")
    add("--profile", action="store_true", help="then record olmd under load with py-spy")
    add("--out", type=Path, default=HERE, help="where results.md/.json go (default bench/)")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds = min(args.duration, 2.0), 1
    if not 1 <= args.duration <= 600 or not 1 <= args.rounds <= 20:
        parser.error("--duration must be within 1..600 seconds and --rounds within 1..20")
    return args


def choose_cpus() -> tuple[int | None, int | None, str]:
    """(load-generator core, proxy core, a sentence saying so)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None, f"not pinned: only {len(cpus)} core available to the benchmark"
    load, proxy = cpus[0], cpus[1]
    os.sched_setaffinity(0, {load})  # this process is the streaming load generator
    note = (
        f"load generator (wrk, Python client) and emulated nodes on core {load}; "
        f"the proxy under test (nginx with worker_processes 1, bare aiohttp, olmd) on core {proxy}"
    )
    return load, proxy, note


def olmd_bin() -> str:
    local = Path(sys.executable).parent / "olmd"
    found = str(local) if local.exists() else shutil.which("olmd")
    if found is None:
        raise SystemExit("olmd is not installed: run `make bench` or use .venv/bin/python")
    return found


def clean_env() -> dict[str, str]:
    """The environment without OLMD_*/OLLAMA_* overrides, so only our settings file counts."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("OLMD_", "OLLAMA_"))}


# ---------------------------------------------------------------- the processes


def olmd_settings(port: int, nodes: list[int]) -> str:
    node_tables = "".join(
        f'\n[[services.ollama.nodes]]\nname = "node-{i}"\nhost = "{LOOPBACK}"\nport = {p}\n'
        for i, p in enumerate(nodes)
    )
    return f"""\
[server]
host = "{LOOPBACK}"
port = {port}

[routing]
strategy = "round_robin"
parallel = 256  # far above the tested concurrency per node: nothing waits in olmd
queue_limit = 1024

[jobs.ollama_sync]
enabled = false
{node_tables}"""


def nginx_conf(port: int, nodes: list[int], prefix: Path) -> str:
    servers = "".join(f"        server {LOOPBACK}:{p};\n" for p in nodes)
    temp = "".join(
        f"    {kind}_temp_path {prefix}/tmp/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp}    keepalive_requests 1000000;
    upstream nodes {{
{servers}        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen {LOOPBACK}:{port};
        location / {{
            proxy_pass http://nodes;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def start_emulators(procs: Processes, cpu: int | None) -> list[int]:
    ports = [free_port(), free_port()]
    for i, port in enumerate(ports):
        argv = [olmd_bin(), "--log-format", "json", "--log-level", "warning", "emulate"]
        argv += ["--host", LOOPBACK, "--port", str(port), "--models", MODEL, "--name", f"node-{i}"]
        procs.start(f"emulator-{i}", argv, cpu=cpu, env=clean_env())
    for port in ports:
        wait_http(f"http://{LOOPBACK}:{port}/api/version", procs)
    return ports


def configure_emulators(ports: list[int], **patch: Any) -> None:
    for port in ports:
        request = urllib.request.Request(
            f"http://{LOOPBACK}:{port}/_emulator/config",
            data=json.dumps(patch).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5):
            pass


def start_nginx(
    procs: Processes, work: Path, nodes: list[int], cpu: int | None
) -> tuple[int, Any] | None:
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if nginx is None:
        print(f"nginx not found: the nginx column is skipped (install: {INSTALL_HINT})")
        return None
    prefix = work / "nginx"
    (prefix / "tmp").mkdir(parents=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(port, nodes, prefix))
    proc = procs.start("nginx", [nginx, "-c", str(conf), "-p", str(prefix)], cpu=cpu)
    wait_http(f"http://{LOOPBACK}:{port}/api/version", procs)
    return port, proc


def start_bare(procs: Processes, nodes: list[int], cpu: int | None) -> tuple[int, Any]:
    port = free_port()
    argv = [sys.executable, str(HERE / "bare_proxy.py"), "--port", str(port), "--nodes"]
    proc = procs.start("bare-aiohttp", argv + [str(p) for p in nodes], cpu=cpu)
    wait_http(f"http://{LOOPBACK}:{port}/api/version", procs)
    return port, proc


def start_olmd(procs: Processes, work: Path, nodes: list[int], cpu: int | None) -> tuple[int, Any]:
    port = free_port()
    config = work / "olmd.toml"
    config.write_text(olmd_settings(port, nodes))
    argv = [olmd_bin(), "--config", str(config), "--log-format", "json"]
    argv += ["--log-level", "warning", "serve"]
    proc = procs.start("olmd", argv, cpu=cpu, cwd=work, env=clean_env())
    wait_http(f"http://{LOOPBACK}:{port}/readyz", procs)
    return port, proc


def sanity_check(column: Column, requests: int = 6) -> None:
    """A few requests before the load: each must answer 200; olmd names its nodes."""
    seen: set[str] = set()
    for _ in range(requests):
        request = urllib.request.Request(column.url + "/api/generate", data=POST_BODY.encode())
        with urllib.request.urlopen(request, timeout=5) as answer:
            json.loads(answer.read())
            if node := answer.headers.get("X-Olmd-Node"):
                seen.add(node)
    column.nodes_seen = sorted(seen)


# ---------------------------------------------------------------- measuring


def post_load(
    url: str, concurrency: int, seconds: float, work: Path, cpu: int | None
) -> loadgen.PostResult:
    if loadgen.have_wrk():
        return loadgen.wrk_post(url, POST_BODY, concurrency, seconds, work, cpu)
    return run_async(loadgen.python_post(url, POST_BODY, concurrency, seconds))


def measure_posts(
    column: Column, pid: int | None, args: argparse.Namespace, work: Path, cpu: int | None
) -> None:
    url = column.url + "/api/generate"
    post_load(url, POST_CONCURRENCY[-1], WARM_UP, work, cpu)  # fills the connection pools
    for concurrency in POST_CONCURRENCY:
        time.sleep(SETTLE)
        before, started = (cpu_seconds(pid) if pid else 0.0), time.monotonic()
        result = post_load(url, concurrency, args.duration, work, cpu)
        column.post.setdefault(concurrency, []).append(result)
        if pid and concurrency == POST_CONCURRENCY[-1]:
            used = cpu_seconds(pid) - before
            column.cpu_share_post.append(used / (time.monotonic() - started))
            column.cpu_us_per_request.append(used * 1e6 / max(result.requests, 1))


def measure_streams(column: Column, pid: int | None, args: argparse.Namespace) -> None:
    url = column.url + "/api/generate"
    for concurrency in STREAM_CONCURRENCY:
        time.sleep(SETTLE)
        before, started = (cpu_seconds(pid) if pid else 0.0), time.monotonic()
        result = run_async(loadgen.python_stream(url, STREAM_BODY, concurrency, args.duration))
        column.stream.setdefault(concurrency, []).append(result)
        if pid and concurrency == STREAM_CONCURRENCY[-1]:
            used = cpu_seconds(pid) - before
            column.cpu_share_stream.append(used / (time.monotonic() - started))


def profile_olmd(
    procs: Processes,
    url: str,
    pid: int,
    nodes: list[int],
    args: argparse.Namespace,
    work: Path,
    cpu: int | None,
) -> dict[str, str]:
    """py-spy stacks of olmd under both loads: an extra run, not part of the numbers."""
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if spy is None:
        print("py-spy not found: `.venv/bin/pip install py-spy` for --profile")
        return {}
    seconds = max(2, round(args.duration))
    (args.out / "profiles").mkdir(parents=True, exist_ok=True)
    summaries: dict[str, str] = {}
    for kind in ("non-streaming", "streaming"):
        path = args.out / "profiles" / f"olmd-{kind}.txt"
        argv = [spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "200"]
        argv += ["--format", "raw", "--output", str(path)]
        spy_proc = procs.start(f"py-spy-{kind}", argv, cpu=cpu)
        time.sleep(0.5)  # py-spy attaches
        if kind == "streaming":
            configure_emulators(nodes, tokens=args.stream_tokens, token_delay=args.token_delay)
            run_async(loadgen.python_stream(url, STREAM_BODY, 64, seconds + 1))
        else:
            configure_emulators(nodes, tokens=POST_TOKENS, token_delay=0.0)
            post_load(url, POST_CONCURRENCY[-1], seconds + 1, work, cpu)
        spy_proc.wait(30)
        print(procs.log_tail(f"py-spy-{kind}", 2))
        summaries[kind] = report.summarize_profile(path)
        print(f"\nolmd under {kind} load ({path}):\n{summaries[kind]}")
    return summaries


# ---------------------------------------------------------------- the run


def machine_facts(args: argparse.Namespace, pinning: str) -> dict[str, Any]:
    def first_line(argv: list[str]) -> str:
        if shutil.which(argv[0]) is None:
            return "not installed"
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        lines = (done.stdout + done.stderr).strip().splitlines()
        return lines[0] if lines else "?"  # (wrk --version exits 1)

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((x.split(":", 1)[1].strip() for x in cpuinfo if x.startswith("model name")), "?")
    wrk = "wrk" if loadgen.have_wrk() else "a Python aiohttp loop (wrk not installed)"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": f"nproc {os.cpu_count()}, {model}, Linux {platform.release()}",
        "python": f"{platform.python_version()}, aiohttp {aiohttp.__version__}",
        "olmd": first_line([olmd_bin(), "--version"]),
        "nginx": first_line(["nginx", "-v"]).removeprefix("nginx version: "),
        "wrk": first_line(["wrk", "--version"]).split(" [")[0],
        "pinning": pinning,
        "rounds": f"{args.rounds} x (every target, in a rotating order); medians reported",
        "non-streaming": f"POST /api/generate stream:false, {POST_TOKENS} tokens, no delay; "
        f"{wrk}, {args.duration:g} s per measurement after a {WARM_UP:g} s warm-up",
        "streaming": f"POST /api/generate stream:true, {args.stream_tokens} tokens "
        f"{args.token_delay * 1000:g} ms apart; aiohttp client counting NDJSON lines, "
        f"{args.duration:g} s per measurement",
        "proxies": "nginx: worker_processes 1, proxy_http_version 1.1, upstream keepalive, "
        "proxy_buffering off; olmd: round_robin, parallel=256, JSON logs at warning",
    }


def run(args: argparse.Namespace, procs: Processes, work: Path) -> int:
    load_cpu, proxy_cpu, pinning = choose_cpus()
    print(pinning)
    if not loadgen.have_wrk():
        print(f"wrk not found: non-streaming load comes from Python (install: {INSTALL_HINT})")
    meta = machine_facts(args, pinning)
    load_before, pressure_before, t0 = os.getloadavg()[0], cpu_pressure_us(), time.monotonic()

    nodes = start_emulators(procs, load_cpu)
    columns: dict[str, Column] = {"direct": Column(f"http://{LOOPBACK}:{nodes[0]}")}
    pids: dict[str, int | None] = {"direct": None}
    if started := start_nginx(procs, work, nodes, proxy_cpu):
        port, nginx = started
        columns["nginx"], pids["nginx"] = Column(f"http://{LOOPBACK}:{port}"), nginx.pid
    port, bare = start_bare(procs, nodes, proxy_cpu)
    columns["aiohttp"], pids["aiohttp"] = Column(f"http://{LOOPBACK}:{port}"), bare.pid
    port, olmd_proc = start_olmd(procs, work, nodes, proxy_cpu)
    columns["olmd"] = olmd = Column(f"http://{LOOPBACK}:{port}")
    pids["olmd"] = olmd_proc.pid
    for name in ("aiohttp", "olmd"):
        columns[name].rss_idle_mb = rss_mb(pids[name] or 0)
    for column in columns.values():
        sanity_check(column)
    print(f"olmd answers from {', '.join(olmd.nodes_seen)}")

    names = list(columns)
    with RssSampler(olmd_proc.pid) as olmd_rss, RssSampler(bare.pid) as bare_rss:
        for round_no in range(args.rounds):
            order = names[round_no % len(names) :] + names[: round_no % len(names)]
            print(f"round {round_no + 1}/{args.rounds}, order {', '.join(order)}", flush=True)
            configure_emulators(nodes, tokens=POST_TOKENS, token_delay=0.0)
            for name in order:
                measure_posts(columns[name], pids[name], args, work, load_cpu)
                procs.check()
            configure_emulators(nodes, tokens=args.stream_tokens, token_delay=args.token_delay)
            for name in order:
                measure_streams(columns[name], pids[name], args)
                procs.check()
    olmd.rss_max_mb, columns["aiohttp"].rss_max_mb = olmd_rss.max_mb, bare_rss.max_mb

    elapsed = time.monotonic() - t0
    pressure_after = cpu_pressure_us()
    noise = f"load average {load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end"
    if pressure_before is not None and pressure_after is not None:
        share = (pressure_after - pressure_before) / 1e6 / elapsed
        noise += f"; CPU pressure (PSI 'some') {share:.0%} of the run"
    meta["other load on the machine"] = noise
    profiles = {}
    if args.profile:
        url = olmd.url + "/api/generate"
        profiles = profile_olmd(procs, url, olmd_proc.pid, nodes, args, work, load_cpu)

    ideal = STREAM_CONCURRENCY[-1] / args.token_delay if args.token_delay else None
    rows = report.table_rows(columns, ideal)
    targets = report.evaluate(columns, "olmd")
    reference = report.evaluate(columns, "aiohttp")
    per_round = [
        report.evaluate(columns, "olmd", lambda xs, i=i: xs[i]) for i in range(args.rounds)
    ]
    print(f"\n{noise}\n\n{report.render_text(rows)}\n\n{report.render_targets(targets, reference)}")

    args.out.mkdir(parents=True, exist_ok=True)
    tables = report.render_tables(rows, targets, reference, per_round)
    (args.out / "results.md").write_text(report.render_markdown(meta, tables, profiles))
    if not args.quick and args.out == HERE:  # smoke runs do not replace the README's numbers
        readme = report.render_tables(rows, targets, reference, per_round, level="###")
        if report.update_readme(HERE / "README.md", meta, readme):
            print(f"updated the results in {HERE / 'README.md'}")
    data = {
        **meta,
        "columns": {name: report.column_json(c) for name, c in columns.items()},
        "targets": targets,
        "targets_per_round": per_round,
        "reference_targets_bare_aiohttp": reference,
    }
    (args.out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nwritten: {args.out / 'results.md'}, {args.out / 'results.json'}")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    # Ctrl-C (even when started with SIGINT ignored) and SIGTERM end the run alike:
    # through the finally clause below, which stops every child process group.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="olmd-bench-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx's worker may run as another user
        procs = Processes(work)
        try:
            return run(args, procs, work)
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
        finally:
            procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
