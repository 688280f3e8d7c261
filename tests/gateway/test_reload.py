"""A reload applies to every component or to none."""

from __future__ import annotations

from collections import Counter

import aiohttp
import pytest

from daemon.gateway import component
from daemon.runtime import RUNTIME
from daemon.settings import Settings
from daemon.sync.service import SYNC
from tests.gateway.support import GENERATE, post
from tests.helpers import running_olmd, settings_dict


def reweighted(data: dict, a: int, b: int) -> dict:
    nodes = [dict(n) for n in data["services"]["ollama"]["nodes"]]
    nodes[0]["weight"], nodes[1]["weight"] = a, b
    return {**data, "services": {"ollama": {**data["services"]["ollama"], "nodes": nodes}}}


async def split(http: aiohttp.ClientSession, server: object, n: int) -> Counter[str]:
    return Counter([(await post(http, server, "/api/generate", GENERATE))[1] for _ in range(n)])


async def test_a_component_that_fails_leaves_every_component_on_the_old_settings(three) -> None:
    data = settings_dict(three[:2])  # a and b, weights 3 and 1
    async with running_olmd(data) as server, aiohttp.ClientSession() as http:
        runtime = server.app[RUNTIME]
        old = runtime.settings

        async def refuses(settings: Settings) -> None:
            if settings is not old:
                raise RuntimeError("cannot take these settings")

        runtime.on_reload.append(refuses)  # after the gateway and the sync service took them
        failed = await runtime.apply(Settings(**reweighted(data, 1, 1)))
        assert failed == [refuses.__qualname__]
        assert runtime.settings is old
        assert server.app[SYNC].settings is old
        assert await split(http, server, 40) == {"a": 30, "b": 10}  # the old weights
        # Without the refusing component the same settings apply everywhere.
        runtime.on_reload.remove(refuses)
        new = Settings(**reweighted(data, 1, 1))
        assert await runtime.apply(new) == []
        assert runtime.settings is new and server.app[SYNC].settings is new
        assert await split(http, server, 40) == {"a": 20, "b": 20}


async def test_a_gateway_that_cannot_load_the_strategy_changes_nothing(
    three, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = settings_dict(three[:2])
    async with running_olmd(data) as server, aiohttp.ClientSession() as http:
        runtime = server.app[RUNTIME]
        old = runtime.settings

        def broken(routing: object) -> object:
            raise ImportError("the plugin's module is gone")

        monkeypatch.setattr(component, "make_balancer", broken)
        failed = await runtime.apply(Settings(**reweighted(data, 1, 1)))
        assert len(failed) == 1 and "reload" in failed[0]
        assert runtime.settings is old and server.app[SYNC].settings is old
        assert await split(http, server, 40) == {"a": 30, "b": 10}
