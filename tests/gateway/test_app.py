"""The front door: a handler that fails answers a JSON error in its route's dialect."""

from __future__ import annotations

import aiohttp
import pytest

from daemon.gateway import catalog
from tests.gateway.support import url
from tests.helpers import running_olmd, settings_dict


async def test_a_failing_handler_answers_json_in_the_routes_dialect(
    three, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> dict[str, object]:
        raise RuntimeError("a bug")

    for name in ("tags", "openai_models"):
        monkeypatch.setattr(catalog, name, broken)
    async with running_olmd(settings_dict(three)) as server, aiohttp.ClientSession() as http:
        async with http.get(url(server, "/api/tags")) as resp:
            assert resp.status == 500
            assert "internal error" in (await resp.json())["error"]
        async with http.get(url(server, "/v1/models")) as resp:
            assert resp.status == 500
            body = await resp.json()
            assert (
                body["error"]["type"] == "server_error"
                and "internal error" in body["error"]["message"]
            )
        async with http.get(url(server, "/api/version")) as resp:
            assert resp.status == 200  # the others are unaffected
