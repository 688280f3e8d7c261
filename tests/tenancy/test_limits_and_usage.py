"""Rate limits, budgets and usage end to end: what a client sees (429, Retry-After,
OpenAI's headers and errors), what the record keeps across a restart, and that a key
never shows anywhere."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.gateway.support import MODEL
from tests.helpers import run_cli, running_olmd, write_settings
from tests.tenancy.support import KEYS, api_keys, bearer, generate, nodes, tenant_settings

RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
)


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLMD_API_KEYS", api_keys("chat", "capped"))


async def test_requests_per_minute_answer_429_with_the_headers_clients_read() -> None:
    tenants = [{"name": "chat"}, {"name": "capped", "requests_per_minute": 30}]
    async with nodes(1, num_parallel=0, tokens=2) as emus:
        async with running_olmd(tenant_settings(emus, tenants)) as s:
            url = str(s.make_url("")).rstrip("/")
            async with aiohttp.ClientSession() as http:
                results = await asyncio.gather(*(generate(http, url, "capped") for _ in range(40)))
                refused = [(status, h, body) for status, h, body in results if status == 429]
                assert len(refused) >= 10
                for _, headers, body in refused:
                    assert int(headers["Retry-After"]) >= 1
                    assert headers["x-ratelimit-limit-requests"] == "30"
                    assert all(name in headers for name in RATE_HEADERS)
                    assert "30 requests per minute" in body["error"]
                ok = [h for status, h, _ in results if status == 200]
                assert ok and all(h["x-ratelimit-limit-requests"] == "30" for h in ok)
                # Another tenant is not limited by this one.
                assert (await generate(http, url, "chat"))[0] == 200
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEYS["capped"], max_retries=0)
            with pytest.raises(openai.RateLimitError) as caught:
                await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}]
                )
            assert caught.value.code == "rate_limit_exceeded"
            assert caught.value.response.headers["x-ratelimit-remaining-requests"] == "0"
            await client.close()


async def test_tokens_per_minute_count_what_the_answers_said() -> None:
    tenants = [{"name": "chat"}, {"name": "capped", "tokens_per_minute": 300}]
    async with nodes(1, num_parallel=0, tokens=20) as emus:
        async with running_olmd(tenant_settings(emus, tenants)) as s:
            url = str(s.make_url("")).rstrip("/")
            async with aiohttp.ClientSession() as http:
                statuses = []
                for _ in range(6):  # each asks ~250 tokens: the second finds the bucket dry
                    status, headers, body = await generate(
                        http, url, "capped", tokens=20, prompt="word " * 200
                    )
                    statuses.append(status)
                    assert headers["x-ratelimit-limit-tokens"] == "300"
                    if status == 429:
                        assert "300 tokens per minute" in body["error"]
                        assert int(headers["Retry-After"]) >= 1
                        break
    # The first answer used its ~200 prompt and 20 completion tokens of the 300.
    assert statuses == [200, 429]


async def test_a_spent_budget_stays_spent_across_a_restart(tmp_path: Path) -> None:
    tenants = [{"name": "chat"}, {"name": "capped", "budget_tokens": 40, "budget_period": "1d"}]
    async with nodes(1, num_parallel=0, tokens=30) as emus:
        settings = tenant_settings(emus, tenants)
        client_args = {"api_key": KEYS["capped"], "max_retries": 0}
        async with running_olmd(settings) as s:
            url = str(s.make_url("")).rstrip("/")
            async with aiohttp.ClientSession() as http:
                first = await generate(http, url, "capped", tokens=30, prompt="word " * 20)
                assert first[0] == 200
                status, headers, body = await generate(http, url, "capped")
                assert status == 429 and "budget of 40 tokens per 1d" in body["error"]
                assert int(headers["Retry-After"]) > 60  # renews with the next UTC day
        record = json.loads((tmp_path / "olmd-usage.json").read_text())
        assert record["budgets"]["capped"]["used"] >= 40
        async with running_olmd(settings) as s:  # a restart: the record is read back
            url = str(s.make_url("")).rstrip("/")
            client = openai.AsyncOpenAI(base_url=url + "/v1", **client_args)
            with pytest.raises(openai.RateLimitError) as caught:
                await client.completions.create(model=MODEL, prompt="hi")
            assert caught.value.code == "insufficient_quota"
            await client.close()


async def test_usage_equals_what_the_nodes_counted_and_no_key_shows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tenants = [{"name": "chat"}, {"name": "capped", "models": ["qwen3*"]}]
    async with nodes(2, num_parallel=0, tokens=5) as emus:
        settings = tenant_settings(emus, tenants)
        settings["usage"] = {"access_log": str(tmp_path / "access.log")}
        async with running_olmd(settings) as s, aiohttp.ClientSession() as http:
            url = str(s.make_url("")).rstrip("/")
            prompt_sum = completion_sum = 0
            for i in range(6):
                status, _, final = await generate(http, url, "chat", prompt="word " * (i + 3))
                assert status == 200
                prompt_sum += final["prompt_eval_count"]
                completion_sum += final["eval_count"]
            # A model outside a tenant's list: not found, and not in its catalogs.
            status, _, body = await generate(http, url, "capped")
            assert (
                status == 404
                and body["error"] == f'model "{MODEL}" not found, try pulling it first'
            )
            async with http.get(url + "/api/tags", headers=bearer("capped")) as resp:
                names = [m["name"] for m in (await resp.json())["models"]]
            assert names == ["qwen3:8b"]
            async with http.get(url + "/admin/usage?tenant=chat&since=7d") as resp:
                view = await resp.json()
            [chat] = view["tenants"]
            totals = chat["usage"]["totals"]
            assert (totals["prompt_tokens"], totals["completion_tokens"]) == (
                prompt_sum,
                completion_sum,
            )
            assert totals["requests"] == 6 and totals["by_status"] == {"200": 6}
            config = write_settings(tmp_path / "settings.toml", settings)
            code, out, _ = await run_cli(
                capsys, "--config", str(config), "usage", "--url", url, "--since", "7d"
            )
            assert code == 0
            row = next(line for line in out.splitlines() if line.startswith("chat "))
            assert f"{prompt_sum:,}" in row and f"{completion_sum:,}" in row
            pages = [out]
            for path in ("/metrics", "/admin/usage", "/admin/nodes", "/ui", "/ui/status.json"):
                async with http.get(url + path) as resp:
                    pages.append(await resp.text())
        logs = capsys.readouterr()
        access = (tmp_path / "access.log").read_text().splitlines()
        assert len(access) == 7 and json.loads(access[0])["tenant"] == "chat"
        record = (tmp_path / "olmd-usage.json").read_text()
    everything = "\n".join([*pages, logs.out, logs.err, *access, record])
    for key in KEYS.values():
        assert key not in everything
    assert 'olmd_tenant_tokens_total{kind="prompt",model="llama3.1:8b",tenant="chat"}' in pages[1]


@pytest.mark.parametrize(
    ("trusted", "expected"), [(["127.0.0.0/8"], (200, 403)), (["10.0.0.0/8"], (401, 401))]
)
async def test_a_tenant_header_counts_only_from_trusted_proxies(
    trusted: list[str], expected: tuple[int, int]
) -> None:
    tenants = [{"name": "chat", "requests_per_minute": 100}, {"name": "capped"}]
    async with nodes(1, num_parallel=0, tokens=2) as emus:
        settings = tenant_settings(emus, tenants)
        settings["server"] |= {"tenant_header": "X-Forwarded-User", "trusted_proxies": trusted}
        async with running_olmd(settings) as s, aiohttp.ClientSession() as http:
            url = str(s.make_url("")).rstrip("/")
            body = {"model": MODEL, "prompt": "hi", "stream": False}
            statuses = []
            for user in ("chat", "mallory"):
                headers = {"X-Forwarded-User": user}
                async with http.post(url + "/api/generate", json=body, headers=headers) as resp:
                    statuses.append(resp.status)
                    if resp.status == 200:
                        assert resp.headers["x-ratelimit-limit-requests"] == "100"
            assert tuple(statuses) == expected


async def test_a_keys_file_with_every_key_revoked_still_requires_a_key(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    keys_file.write_text('{"keys": []}\n')
    keys_file.chmod(0o600)
    async with nodes(1, num_parallel=0, tokens=2) as emus:
        settings = tenant_settings(emus, [{"name": "chat"}, {"name": "capped"}])
        settings["server"]["keys_file"] = str(keys_file)
        async with running_olmd(settings) as s, aiohttp.ClientSession() as http:
            url = str(s.make_url("")).rstrip("/")
            body = {"model": MODEL, "prompt": "hi", "stream": False}
            async with http.post(url + "/api/generate", json=body) as resp:
                assert resp.status == 401


async def test_a_model_key_in_another_letter_case_is_refused() -> None:
    tenants = [{"name": "chat"}, {"name": "capped", "models": ["qwen3*"]}]
    async with nodes(1, num_parallel=0, tokens=2) as emus:
        async with running_olmd(tenant_settings(emus, tenants)) as s:
            url = str(s.make_url("")).rstrip("/")
            # Ollama reads keys ignoring case, the last one winning: this would run llama.
            raw = '{"model": "qwen3:8b", "MODEL": "llama3.1:8b", "prompt": "hi"}'
            headers = {**bearer("capped"), "Content-Type": "application/json"}
            async with aiohttp.ClientSession() as http:
                async with http.post(url + "/api/generate", data=raw, headers=headers) as resp:
                    assert resp.status == 400
                    assert "letter case" in (await resp.json())["error"]
