from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests never see the developer's OLMD_* or OLLAMA_* variables, .env or settings.toml."""
    for name in list(os.environ):
        if name.startswith(("OLMD_", "OLLAMA_", "NOTIFY_SOCKET", "WATCHDOG_")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
async def redis_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real Redis server for this test (skipped where redis-server is not installed)."""
    from tests.helpers import RedisServer

    server = RedisServer(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
