"""The Ollama emulator's behaviour: queueing, disconnects, pulls, faults, control, CLI."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from daemon.emulator import formats as fmt
from daemon.emulator.server import (
    STATE_KEY,
    Emulator,
    EmulatorConfig,
    add_arguments,
    create_app,
    run_from_args,
)
from tests.emulator.support import (
    BUSY,
    CHAT,
    QUESTION,
    call,
    configure,
    drain,
    read_lines,
    stats,
    until,
)

# ---------------------------------------------------------------- behaviour


async def test_busy_queue_answers_503(emu: Emulator, http: aiohttp.ClientSession) -> None:
    await configure(http, emu, concurrency=1, queue=0, tokens=20, token_delay=0.01)
    first = asyncio.create_task(call(http, emu, "/api/chat", CHAT))
    await until(lambda: _in_flight(emu, 1))
    status, kind, text = await call(http, emu, "/api/chat", CHAT)
    assert (status, kind, json.loads(text)) == (
        503,
        "application/json; charset=utf-8",
        {"error": BUSY},
    )
    assert (await first)[0] == 200

    await configure(http, emu, queue=1)
    both = await asyncio.gather(*(call(http, emu, "/api/chat", CHAT) for _ in range(2)))
    assert [b[0] for b in both] == [200, 200]
    seen = await stats(http, emu)
    assert seen["max_in_flight"] == 1 and seen["rejected"] == 1 and seen["in_flight"] == 0


async def _in_flight(emu: Emulator, count: int) -> bool:
    return emu.state.stats.in_flight == count


async def test_client_disconnect_counted_within_a_second(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    await configure(http, emu, tokens=200, token_delay=0.05)
    async with http.post(emu.url + "/api/chat", json=CHAT) as resp:
        await resp.content.readline()
        await resp.content.readline()
        resp.close()  # the client walks away mid-stream
    await until(lambda: _cancelled(emu, 1), timeout=1.0)
    assert emu.state.stats.in_flight == 0 and emu.state.stats.completed == 0


async def _cancelled(emu: Emulator, count: int) -> bool:
    return emu.state.stats.cancelled == count


async def test_disconnect_seen_without_handler_cancellation(
    http: aiohttp.ClientSession,
) -> None:
    app = create_app(EmulatorConfig(tokens=200, token_delay=0.05))
    runner = web.AppRunner(app)  # aiohttp's default: handlers are not cancelled
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with http.post(f"http://127.0.0.1:{port}/api/chat", json=CHAT) as resp:
            await resp.content.readline()
            resp.close()
        state = app[STATE_KEY]
        for _ in range(100):
            if state.stats.cancelled:
                break
            await asyncio.sleep(0.01)
        assert state.stats.cancelled == 1 and state.stats.in_flight == 0
    finally:
        await runner.cleanup()


async def test_pull_resumes_after_disconnect(emu: Emulator, http: aiohttp.ClientSession) -> None:
    await configure(http, emu, pull_size=100_000, pull_speed=200_000)
    async with http.post(emu.url + "/api/pull", json={"model": "gemma3:1b"}) as resp:
        for _ in range(50):
            line = json.loads(await resp.content.readline())
            if line.get("completed", 0) > 10_000:
                break
        resp.close()
    await until(lambda: _cancelled(emu, 1))
    assert "gemma3:1b" not in {m["name"] for m in await _tags(http, emu)}

    async with http.post(emu.url + "/api/pull", json={"name": "gemma3:1b"}) as resp:
        lines = [json.loads(line) async for line in resp.content]
    assert lines[1]["completed"] > 10_000  # started where the last pull stopped
    assert lines[-1] == {"status": "success"}
    assert "gemma3:1b" in {m["name"] for m in await _tags(http, emu)}
    assert emu.state.stats.max_pulls_in_flight == 1


async def _tags(http: aiohttp.ClientSession, emu: Emulator) -> list[dict[str, Any]]:
    models: list[dict[str, Any]] = json.loads(
        (await call(http, emu, "/api/tags", method="GET"))[2]
    )["models"]
    return models


async def test_pull_errors_in_stream(emu: Emulator, http: aiohttp.ClientSession) -> None:
    await configure(http, emu, unavailable=["ghost"])
    status, kind, text = await call(http, emu, "/api/pull", {"model": "ghost"})
    assert (status, kind) == (200, "application/x-ndjson")
    assert [json.loads(line) for line in text.splitlines()] == [
        {"status": "pulling manifest"},
        {"error": "pull model manifest: file does not exist"},
    ]
    status, _, text = await call(http, emu, "/api/pull", {"model": "ghost", "stream": False})
    assert status == 500 and "file does not exist" in text
    status, _, text = await call(http, emu, "/api/pull", {"model": "x:1b", "stream": False})
    assert (status, json.loads(text)) == (200, {"status": "success"})


# ---------------------------------------------------------------- faults


async def test_fault_refuse_closes_without_answer(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    await configure(http, emu, fault="refuse")
    with pytest.raises(aiohttp.ClientError):
        await call(http, emu, "/api/chat", CHAT)
    assert (await call(http, emu, "/api/tags", method="GET"))[0] == 200  # not a generating route


@pytest.mark.parametrize(
    ("fault", "status", "error"),
    [("http500", 500, "llama runner process has terminated"), ("http503", 503, BUSY)],
)
async def test_fault_http_status(
    emu: Emulator, http: aiohttp.ClientSession, fault: str, status: int, error: str
) -> None:
    await configure(http, emu, fault=fault, fault_count=1)
    got, _, text = await call(http, emu, "/api/generate", {"model": "llama3.1:8b", "prompt": "x"})
    assert got == status and json.loads(text)["error"].startswith(error)
    assert (await call(http, emu, "/api/chat", CHAT))[0] == 200  # fault_count=1 used up
    config = json.loads((await call(http, emu, "/_emulator/config", method="GET"))[2])
    assert (config["fault"], config["fault_count"]) == ("none", 0)

    await configure(http, emu, fault=fault)
    got, _, text = await call(http, emu, "/v1/chat/completions", CHAT)
    assert got == status and json.loads(text)["error"]["message"].startswith(error)


async def test_fault_stall_hangs_until_client_leaves(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    await configure(http, emu, fault="stall")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(call(http, emu, "/api/chat", CHAT), timeout=0.2)
    await until(lambda: _cancelled(emu, 1))


async def test_fault_cut_drops_mid_stream(emu: Emulator, http: aiohttp.ClientSession) -> None:
    await configure(http, emu, fault="cut", fault_after=2)
    received: list[bytes] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        await read_lines(http, emu.url + "/api/chat", CHAT, received)
    assert len(received) == 2

    with pytest.raises(aiohttp.ClientPayloadError):
        await call(http, emu, "/api/chat", CHAT | {"stream": False})


async def test_fault_error_line(
    emu: Emulator, http: aiohttp.ClientSession, openai_client: openai.AsyncOpenAI
) -> None:
    await configure(http, emu, fault="error_line", fault_after=3)
    status, _, text = await call(http, emu, "/api/chat", CHAT)
    lines = [json.loads(line) for line in text.splitlines()]
    assert status == 200 and len(lines) == 4
    assert lines[-1] == {"error": "llama runner process has terminated: exit status 2"}

    stream = await openai_client.chat.completions.create(
        model="llama3.1:8b", messages=QUESTION, stream=True
    )
    with pytest.raises(openai.APIError):
        await drain(stream)

    status, _, text = await call(
        http, emu, "/api/embed", {"model": "nomic-embed-text", "input": "x"}
    )
    assert status == 500 and "error" in json.loads(text)


async def test_fault_limited_to_routes(emu: Emulator, http: aiohttp.ClientSession) -> None:
    await configure(http, emu, fault="error_line", fault_routes=["/api/pull"], fault_after=1)
    assert (await call(http, emu, "/api/chat", CHAT))[0] == 200
    _, _, text = await call(http, emu, "/api/pull", {"model": "phi3:mini"})
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines == [
        {"status": "pulling manifest"},
        {"error": "max retries exceeded: unexpected EOF"},
    ]


# ---------------------------------------------------------------- control and lifecycle


async def test_control_endpoint(emu: Emulator, http: aiohttp.ClientSession) -> None:
    status, _, text = await call(http, emu, "/_emulator/config", {"tokens": 3, "models": ["a"]})
    assert status == 200 and json.loads(text)["models"] == ["a:latest"]
    _, _, text = await call(http, emu, "/api/chat", CHAT | {"model": "a", "stream": False})
    assert json.loads(text)["eval_count"] == 3

    for bad in ({"tokens": -1}, {"fault": "explode"}, {"bogus": 1}, {"digests": {"a": "xyz"}}):
        status, _, text = await call(http, emu, "/_emulator/config", bad)
        assert status == 400 and next(iter(bad)) in json.loads(text)["error"]
    assert emu.state.config.tokens == 3  # a rejected update changes nothing

    seen = await stats(http, emu)
    assert seen["requests"]["/api/chat"] == 1 and seen["completed"] == 1
    status, _, text = await call(http, emu, "/_emulator/reset")
    assert status == 200 and json.loads(text)["requests"] == {}
    assert (await stats(http, emu))["completed"] == 0


async def test_stop_and_start_on_same_port(emu: Emulator, http: aiohttp.ClientSession) -> None:
    port = emu.port
    await emu.stop()
    await emu.stop()  # idempotent
    with pytest.raises(aiohttp.ClientConnectionError):
        await call(http, emu, "/", method="GET")
    await emu.start()
    assert emu.port == port and emu.url == f"http://127.0.0.1:{port}"
    assert (await call(http, emu, "/api/chat", CHAT))[0] == 200


async def test_stop_mid_stream_is_not_a_client_cancellation(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    await configure(http, emu, tokens=200, token_delay=0.05)
    received: list[bytes] = []

    async def stop_after_first(line: bytes) -> None:
        if not received:
            await asyncio.wait_for(emu.stop(), timeout=2)

    with pytest.raises(aiohttp.ClientPayloadError):
        await read_lines(http, emu.url + "/api/chat", CHAT, received, stop_after_first)
    assert len(received) == 1 and emu.state.stats.cancelled == 0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, 300.0), (10, 10.0), ("5m", 300.0), ("1h30m", 5400.0), ("0", 0.0), ("soon", 300.0)],
)
def test_keep_alive_parsing(value: Any, seconds: float) -> None:
    assert fmt.keep_alive_seconds(value) == seconds
    assert fmt.keep_alive_seconds(-1) > 365 * 24 * 3600  # negative: loaded for ever


def test_config_normalises_and_validates() -> None:
    config = EmulatorConfig(
        models=["llama3", "LLAMA3:latest", "user/x:7b"], digests={"Llama3": "sha256:" + "A" * 64}
    )
    assert config.models == ["llama3:latest", "user/x:7b"]
    assert config.digests == {"llama3:latest": "a" * 64}
    with pytest.raises(ValueError, match="fault_routes"):
        EmulatorConfig(fault_routes=["/api/tags"])


def test_cli_arguments_build_a_config() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.host, args.port, args.tokens, args.fault) == ("127.0.0.1", 11434, 8, "none")
    args = parser.parse_args(["--port", "0", "--models", "llama3", "--fault", "cut"])
    assert args.models == ["llama3"] and args.fault == "cut"
    with pytest.raises(SystemExit):
        parser.parse_args(["--fault", "explode"])
    bad = parser.parse_args(["--tokens", "-5"])
    assert run_from_args(bad) == 2


async def test_cli_serves_until_sigterm() -> None:
    script = (
        "import argparse, sys\n"
        "from daemon.emulator.server import add_arguments, run_from_args\n"
        "p = argparse.ArgumentParser(); add_arguments(p)\n"
        "sys.exit(run_from_args(p.parse_args(sys.argv[1:])))\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, "--port", "0", "--name", "cli-node", "--models", "llama3",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=10)).decode()
        url = line.rsplit(" ", 1)[-1].strip()
        assert "cli-node" in line and url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as session, session.get(url + "/api/tags") as resp:
            assert (await resp.json())["models"][0]["name"] == "llama3:latest"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
