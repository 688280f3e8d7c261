"""Gateways as real ``olmd serve`` processes for the fleet-wide sync tests: settings whose
download window is open now and whose nightly time has passed (so every gateway's
scheduler is due at start), a handle to SIGKILL or restart one, and emulator counters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from daemon.emulator.server import Emulator
from tests.cluster.support import wait_ready
from tests.conftest import ROOT
from tests.helpers import free_port, olmd_command, write_settings

TOKEN = "admin-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODELS = ["llama3.1:8b", "qwen3:8b"]


def due_now_settings(
    name: str, nodes: list[Emulator], state_dir: Path, *, lease_seconds: float = 2.0
) -> dict[str, Any]:
    """Gateway ``name``: the window opened an hour ago, the nightly time was half an hour
    ago, and nothing ran: the scheduler's catch-up starts a sync at once."""
    now = datetime.now(UTC)
    start, end = now - timedelta(hours=1), now + timedelta(hours=1)
    due = now - timedelta(minutes=30)
    return {
        "server": {"host": "127.0.0.1", "port": free_port(), "drain_timeout": 5.0},
        "routing": {"probe_interval": 0.5, "strategy": "weighted"},
        "services": {
            "ollama": {
                "health_timeout": 2.0,
                "baseline_models": MODELS,
                "fallback_models": [],
                "nodes": [
                    {"name": e.state.config.name, "host": "127.0.0.1", "port": e.port}
                    for e in nodes
                ],
                "download": {
                    "allowed_window": f"{start:%H:%M}-{end:%H:%M} UTC",
                    "max_parallel_jobs": 2,
                    "stall_timeout": 10.0,
                    "retry": {"max_attempts": 2, "backoff_seconds": 0.1},
                },
            }
        },
        "jobs": {
            "ollama_sync": {
                "enabled": True,
                "schedule_cron": f"{due.minute} {due.hour} * * *",
                "manifest_path": str(state_dir / "manifest.json"),
            }
        },
        "cluster": {"enabled": True, "name": name, "lease_seconds": lease_seconds},
    }


class Gateway:
    """One ``olmd serve`` process of the cluster; its log (JSON lines) goes to a file."""

    def __init__(self, tmp_path: Path, data: dict[str, Any], redis_url: str) -> None:
        self.name = data["cluster"]["name"]
        self.data = data
        self.config = write_settings(tmp_path / f"{self.name}.toml", data)
        self.log = tmp_path / f"{self.name}.log"
        self.url = f"http://127.0.0.1:{data['server']['port']}"
        self.manifest = Path(data["jobs"]["ollama_sync"]["manifest_path"])
        self.redis_url = redis_url
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> Gateway:
        env = {**os.environ, "OLMD_REDIS_URL": self.redis_url, "OLMD_ADMIN_TOKEN": TOKEN,
               "PYTHONPATH": str(ROOT)}  # fmt: skip
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *olmd_command("--config", str(self.config), "--log-format", "json", "serve"),
                env=env, stdout=asyncio.subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        await wait_ready(self.url)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            if proc is not None:
                await proc.wait()
            return
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(20):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()

    def events(self) -> list[dict[str, Any]]:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    async def sync(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        async with http.get(self.url + "/admin/sync", headers=AUTH) as resp:
            assert resp.status == 200, await resp.text()
            body: dict[str, Any] = await resp.json()
            return body

    async def metrics(self, http: aiohttp.ClientSession) -> str:
        async with http.get(self.url + "/metrics") as resp:
            return await resp.text()


def count_completed_pulls(*emulators: Emulator) -> Counter[tuple[str, str]]:
    """(node, model) → pulls that ran to their end on it, from now on."""
    done: Counter[tuple[str, str]] = Counter()
    for emu in emulators:
        node, add = emu.state.config.name, emu.state.add_model

        def counted(model: str, node: str = node, add: Callable[[str], None] = add) -> None:
            done[(node, model)] += 1
            add(model)

        emu.state.add_model = counted  # type: ignore[method-assign]
    return done


def pull_requests(emu: Emulator) -> int:
    return emu.state.stats.requests.get("/api/pull", 0)


async def until(check: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    """Poll ``check`` (a coroutine function or a plain one) until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(step)


def finished(status: dict[str, Any]) -> bool:
    state = status.get("state") or {}
    return not status["running"] and state.get("last_outcome") == "ok"


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None
