"""What the tenancy tests share: emulated nodes, settings with tenants, keyed requests."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from daemon.emulator.server import Emulator, EmulatorConfig
from tests.gateway.support import MODEL
from tests.helpers import settings_dict

# Each answer: `tokens` tokens `token_delay` apart; num_predict shortens one.
PERF: dict[str, Any] = {"num_parallel": 1, "prompt_rate": 100_000.0, "tokens": 40}
KEYS = {
    "chat": "chat-key-0123456789",
    "batch": "batch-key-0123456789",
    "batch2": "batch2-key-0123456789",
    "capped": "capped-key-0123456789",
}


def api_keys(*tenants: str) -> str:
    """``OLMD_API_KEYS`` for these tenants (all of KEYS by default)."""
    return ",".join(f"{t}:{KEYS[t]}" for t in tenants or KEYS)


def bearer(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@contextlib.asynccontextmanager
async def nodes(count: int = 1, **perf: Any) -> AsyncIterator[list[tuple[str, int, Emulator]]]:
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for i in range(count):
            config = EmulatorConfig(name=f"n{i}", models=[MODEL, "qwen3:8b"], **(PERF | perf))
            out.append((f"n{i}", 1, await stack.enter_async_context(Emulator(config))))
        yield out


def tenant_settings(
    emulators: list[tuple[str, int, Emulator]],
    tenants: list[dict[str, Any]],
    *,
    parallel: int = 1,
    **routing: Any,
) -> dict[str, Any]:
    data = settings_dict(emulators, parallel=parallel, **routing)
    data["tenants"] = tenants
    return data


async def generate(
    http: aiohttp.ClientSession,
    url: str,
    tenant: str,
    *,
    tokens: int = 2,
    prompt: str = "hello there",
    model: str = MODEL,
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """(status, headers, final chunk or error body) of one streamed generate."""
    body = {"model": model, "prompt": prompt, "options": {"num_predict": tokens}}
    async with http.post(url + "/api/generate", json=body, headers=bearer(tenant)) as resp:
        final: dict[str, Any] = {}
        async for line in resp.content:
            if line.strip():
                final = json.loads(line)
        return resp.status, dict(resp.headers), final
