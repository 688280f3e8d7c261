"""The cluster's deploy/ examples are valid for the programs that read them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import ROOT
from tests.helpers import free_port

DEPLOY = ROOT / "deploy"


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_the_nginx_example_passes_nginx_t(tmp_path: Path) -> None:
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {tmp_path};\n"
        f"  proxy_temp_path {tmp_path};\n  include {DEPLOY}/nginx-gateways.conf.example;\n}}\n"
    )
    argv = ["nginx", "-t", "-q", "-c", str(main), "-p", str(tmp_path)]
    done = subprocess.run(
        [*argv, "-e", str(tmp_path / "error.log")], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_the_haproxy_example_passes_haproxy_c() -> None:
    done = subprocess.run(
        ["haproxy", "-c", "-f", str(DEPLOY / "haproxy.cfg.example")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr


async def test_redis_runs_on_the_example_settings(tmp_path: Path) -> None:
    import asyncio

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    port = free_port()
    # The example's own file, with only where it listens and writes changed.
    proc = await asyncio.create_subprocess_exec(
        binary, str(DEPLOY / "redis-olmd.conf.example"), "--bind", "127.0.0.1",
        "--port", str(port), "--dir", str(tmp_path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    client = aioredis.Redis(port=port, password="change-me-redis-password")
    try:
        for _ in range(100):
            try:
                assert await client.ping()
                break
            except (OSError, aioredis.ConnectionError):
                assert proc.returncode is None, "redis-server refused the example settings"
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("redis-server did not answer")
        assert (await client.config_get("appendonly"))["appendonly"] == "yes"
    finally:
        await client.aclose()
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
