"""Gateways as real olmd processes for the cluster tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import ROOT
from tests.helpers import olmd_command, write_settings


async def wait_ready(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, f"{url} never became ready"
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def gateway(
    tmp_path: Path, name: str, data: dict[str, Any], redis_url: str, **env: str
) -> AsyncIterator[str]:
    """``olmd serve`` as gateway ``name`` of a cluster on ``redis_url``; yields its URL."""
    data = {**data, "cluster": {"enabled": True, "name": name, **data.get("cluster", {})}}
    config = write_settings(tmp_path / f"{name}.toml", data)
    environ = {**os.environ, "OLMD_REDIS_URL": redis_url, "PYTHONPATH": str(ROOT), **env}
    proc = await asyncio.create_subprocess_exec(
        *olmd_command("--config", str(config), "--log-format", "json", "serve"),
        env=environ,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{data['server']['port']}"
    try:
        await wait_ready(url)
        yield url
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                await proc.wait()


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float | None:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None
