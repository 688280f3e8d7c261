"""What the distribution tests share: a registry, emulated nodes, olmd in gateway mode."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ollama
from aiohttp.test_utils import TestServer

from daemon.emulator.registry import EmulatedRegistry
from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.runtime import RUNTIME, Phase
from daemon.service import build_app
from daemon.settings import Settings
from tests.helpers import free_port

TOKEN = "admin-token-for-tests"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
SIZES = [300_000, 2_000]
MODELS = ["llama3.1:8b", "qwen3:8b"]


def gateway_settings(
    tmp_path: Path,
    registry: EmulatedRegistry,
    nodes: list[tuple[str, Emulator]],
    *,
    port: int | None = None,
    mode: str = "gateway",
    models: list[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    port = port or free_port()
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "routing": {"probe_interval": 0.5, "strategy": "weighted"},
        "distribution": {
            "mode": mode,
            "registry": registry.url,
            "cache_dir": str(tmp_path / "cache"),
            "advertise_url": f"http://127.0.0.1:{port}",
            "download_parts": 2,
            "part_size_mb": 1,
        },
        "services": {
            "ollama": {
                "health_timeout": 2.0,
                "baseline_models": MODELS if models is None else models,
                "fallback_models": [],
                "nodes": [{"name": n, "host": "127.0.0.1", "port": e.port} for n, e in nodes],
                "download": {
                    "allowed_window": "00:00-23:59 UTC",
                    "stall_timeout": 5.0,
                    "max_parallel_jobs": 3,
                    "retry": {"max_attempts": 2, "backoff_seconds": 0.01},
                },
            }
        },
        "jobs": {
            "ollama_sync": {"enabled": False, "manifest_path": str(tmp_path / "manifest.json")}
        },
        **extra,
    }


@contextlib.asynccontextmanager
async def olmd(settings: Settings) -> AsyncIterator[TestServer]:
    """The daemon on ``settings.server.port`` (the port the nodes are told to pull from)."""
    server = TestServer(
        build_app(settings), host="127.0.0.1", port=settings.server.port,
        handler_cancellation=True,
    )  # fmt: skip
    await server.start_server()
    server.app[RUNTIME].set_phase(Phase.READY)
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def fleet(count: int) -> AsyncIterator[list[tuple[str, Emulator]]]:
    """``count`` emulated nodes holding no model."""
    async with contextlib.AsyncExitStack() as stack:
        nodes = []
        for i in range(count):
            emu = Emulator(EmulatorConfig(name=f"n{i}", models=[]))
            await stack.enter_async_context(emu)
            nodes.append((f"n{i}", emu))
        yield nodes


async def listed(emu: Emulator) -> dict[str, str]:
    """What the node's /api/tags lists: name → digest."""
    async with ollama.AsyncClient(host=emu.url) as client:
        models = (await client.list()).models
    return {m.model or "": m.digest or "" for m in models}


def publish(registry: EmulatedRegistry, models: list[str] = MODELS) -> dict[str, str]:
    """Put ``models`` on the registry; name → manifest digest (bare hex, as /api/tags)."""
    return {m: registry.add_model(m, SIZES, seed=i) for i, m in enumerate(models)}
