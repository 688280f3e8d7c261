"""Load generators: wrk for non-streaming POSTs (a Python loop when wrk is missing) and an
aiohttp client for streams. Each stops itself after ``duration`` seconds, a request cap,
and a hard timeout on top."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiohttp
from procs import pin_prefix

T = TypeVar("T")
MAX_REQUESTS = 5_000_000  # per measurement: a bound, never reached in practice
REQUEST_TIMEOUT = 30.0
HEADERS = {"Content-Type": "application/json"}

# wrk prints its summary for people; done() prints one machine-readable line as well.
WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {{\\"requests\\": %d, \\"duration_us\\": %d, \\"errors\\": %d, " ..
    "\\"status_errors\\": %d, \\"p50\\": %.1f, \\"p90\\": %.1f, \\"p99\\": %.1f}}\\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


@dataclass
class PostResult:
    """Non-streaming requests at one concurrency."""

    tool: str
    concurrency: int
    requests: int
    seconds: float
    errors: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float


@dataclass
class StreamResult:
    """Streams at one concurrency: chunks are NDJSON lines received inside the window."""

    concurrency: int
    streams: int
    chunks: int
    seconds: float
    errors: int
    chunks_per_s: float
    ttfb_p50_ms: float
    ttfb_p99_ms: float


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def wrk_post(
    url: str, body: str, concurrency: int, duration: float, workdir: Path, cpu: int | None
) -> PostResult:
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT.format(body=body))
    seconds = max(1, round(duration))
    argv = [
        "wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s",
        "-s", str(script), url,
    ]  # fmt: skip
    done = subprocess.run(
        pin_prefix(cpu) + argv,
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=False,
        start_new_session=True,
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
    data = json.loads(line.removeprefix("WRKJSON "))
    return PostResult(
        tool="wrk",
        concurrency=concurrency,
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        errors=data["errors"] + data["status_errors"],
        rps=data["requests"] / max(data["duration_us"] / 1e6, 1e-9),
        p50_ms=data["p50"] / 1000,
        p90_ms=data["p90"] / 1000,
        p99_ms=data["p99"] / 1000,
    )


async def python_post(url: str, body: str, concurrency: int, duration: float) -> PostResult:
    """The same measurement as wrk_post, closed loop, from Python (slower, less precise)."""
    latencies: list[float] = []
    errors = 0
    data = body.encode()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + duration

        async def worker() -> None:
            nonlocal errors
            while loop.time() < deadline and len(latencies) + errors < MAX_REQUESTS:
                sent = time.perf_counter()
                try:
                    async with session.post(url, data=data, headers=HEADERS) as answer:
                        await answer.read()
                        ok = answer.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                if ok:
                    latencies.append((time.perf_counter() - sent) * 1000)
                else:
                    errors += 1

        async with asyncio.timeout(duration + REQUEST_TIMEOUT + 5):
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = loop.time() - start
    return PostResult(
        tool="python",
        concurrency=concurrency,
        requests=len(latencies) + errors,
        seconds=elapsed,
        errors=errors,
        rps=(len(latencies) + errors) / elapsed,
        p50_ms=percentile(latencies, 50),
        p90_ms=percentile(latencies, 90),
        p99_ms=percentile(latencies, 99),
    )


async def python_stream(url: str, body: str, concurrency: int, duration: float) -> StreamResult:
    """Streams back to back from ``concurrency`` clients; lines counted until the deadline."""
    ttfb: list[float] = []
    chunks = streams = errors = 0
    data = body.encode()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + duration

        async def worker() -> None:
            nonlocal chunks, streams, errors
            while loop.time() < deadline and streams + errors < MAX_REQUESTS:
                sent = time.perf_counter()
                first = True
                prev = tail = b""
                try:
                    async with session.post(url, data=data, headers=HEADERS) as answer:
                        if answer.status != 200:
                            errors += 1
                            await answer.read()
                            continue
                        async for piece in answer.content.iter_any():
                            if first:
                                ttfb.append((time.perf_counter() - sent) * 1000)
                                first = False
                            if loop.time() >= deadline:
                                return  # the window is over: stop counting, drop the stream
                            chunks += piece.count(b"\n")
                            prev, tail = tail, piece
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1
                    continue
                ending = prev + tail
                if b'"done":true' in ending or b'"done": true' in ending:
                    streams += 1
                else:
                    errors += 1

        async with asyncio.timeout(duration + REQUEST_TIMEOUT + 5):
            await asyncio.gather(*(worker() for _ in range(concurrency)))
    return StreamResult(
        concurrency=concurrency,
        streams=streams,
        chunks=chunks,
        seconds=duration,
        errors=errors,
        chunks_per_s=chunks / duration,
        ttfb_p50_ms=percentile(ttfb, 50),
        ttfb_p99_ms=percentile(ttfb, 99),
    )
