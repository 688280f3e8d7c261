"""The Ollama emulator's wire formats over raw HTTP: bodies, headers, errors, loads."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import aiohttp
import ollama
import pytest

from daemon.emulator.server import Emulator, EmulatorConfig
from tests.emulator.support import CHAT, DURATIONS, HEX64, call, configure


async def test_root_version_and_head(emu: Emulator, http: aiohttp.ClientSession) -> None:
    assert await call(http, emu, "/", method="GET") == (
        200,
        "text/plain; charset=utf-8",
        "Ollama is running",
    )
    async with http.head(emu.url + "/") as resp:
        assert resp.status == 200
    status, kind, text = await call(http, emu, "/api/version", method="GET")
    assert (status, kind, json.loads(text)) == (
        200,
        "application/json; charset=utf-8",
        {"version": "0.12.0"},
    )


async def test_tags_fields_and_digests(emu: Emulator, http: aiohttp.ClientSession) -> None:
    _, _, text = await call(http, emu, "/api/tags", method="GET")
    models = json.loads(text)["models"]
    for entry in models:
        assert list(entry) == ["name", "model", "modified_at", "size", "digest", "details"]
        assert entry["name"] == entry["model"] and HEX64.match(entry["digest"])
        assert isinstance(entry["size"], int) and entry["size"] > 0
        assert datetime.fromisoformat(entry["modified_at"]).tzinfo is not None
        assert set(entry["details"]) == {
            "parent_model",
            "format",
            "family",
            "families",
            "parameter_size",
            "quantization_level",
        }
    by_name = {m["name"]: m for m in models}
    assert by_name["llama3.1:8b"]["details"]["parameter_size"] == "8.0B"

    other = "ab" * 32
    same = EmulatorConfig(models=["llama3.1:8b"])
    differs = EmulatorConfig(models=["llama3.1:8b"], digests={"llama3.1:8b": other})
    async with Emulator(same) as twin, Emulator(differs) as odd:
        twin_tags = json.loads((await call(http, twin, "/api/tags", method="GET"))[2])
        odd_tags = json.loads((await call(http, odd, "/api/tags", method="GET"))[2])
    assert twin_tags["models"][0]["digest"] == by_name["llama3.1:8b"]["digest"]
    assert odd_tags["models"][0]["digest"] == other


async def test_generate_stream_fields(emu: Emulator, http: aiohttp.ClientSession) -> None:
    body = {"model": "llama3.1", "prompt": "hi", "options": {"num_predict": 3}}
    emu.state.update({"models": ["llama3.1"]})  # stored as llama3.1:latest
    status, kind, text = await call(http, emu, "/api/generate", body)
    assert (status, kind) == (200, "application/x-ndjson")
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 4
    for line in lines[:-1]:
        assert list(line) == ["model", "created_at", "response", "done"]
        assert line["model"] == "llama3.1" and line["done"] is False
        assert line["created_at"].endswith("Z")
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "length"
    assert final["response"] == "" and all(isinstance(i, int) for i in final["context"])
    assert all(isinstance(final[k], int) and final[k] > 0 for k in DURATIONS)
    assert final["eval_count"] == 3

    status, kind, text = await call(http, emu, "/api/generate", {**body, "stream": False})
    assert (status, kind) == (200, "application/json; charset=utf-8")
    single = json.loads(text)
    assert single["response"] == "".join(line["response"] for line in lines)


async def test_chat_final_chunk(emu: Emulator, http: aiohttp.ClientSession) -> None:
    _, _, text = await call(http, emu, "/api/chat", CHAT)
    *tokens, final = [json.loads(line) for line in text.splitlines()]
    assert tokens[0]["message"] == {"role": "assistant", "content": tokens[0]["message"]["content"]}
    assert final["message"] == {"role": "assistant", "content": ""}
    assert final["done_reason"] == "stop" and "context" not in final
    assert all(isinstance(final[k], int) for k in DURATIONS)


async def test_load_and_unload_with_empty_prompt(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    status, _, text = await call(http, emu, "/api/generate", {"model": "llama3.1:8b"})
    assert status == 200 and json.loads(text)["done_reason"] == "load"
    assert "llama3.1:8b" in emu.state.loaded
    unload = {"model": "llama3.1:8b", "messages": [], "keep_alive": 0}
    status, _, text = await call(http, emu, "/api/chat", unload)
    assert json.loads(text)["done_reason"] == "unload" and not emu.state.loaded


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        ("/api/generate", {"model": "nope", "prompt": "x"}, 404, "model 'nope' not found"),
        ("/api/chat", {"model": "nope", "messages": []}, 404, "model 'nope' not found"),
        ("/api/generate", {"prompt": "x"}, 400, "model is required"),
        ("/api/chat", {"messages": []}, 400, "model is required"),
        ("/api/generate", None, 400, "missing request body"),
        ("/api/show", {"model": "nope"}, 404, "model 'nope' not found"),
        ("/api/delete", {"model": "nope"}, 404, "model 'nope' not found"),
        (
            "/api/embed",
            {"model": "nope", "input": "x"},
            404,
            'model "nope" not found, try pulling it first',
        ),
        (
            "/api/generate",
            {"model": "nomic-embed-text", "prompt": "x"},
            400,
            '"nomic-embed-text" does not support generate',
        ),
        ("/api/pull", {"model": ""}, 400, "invalid model name"),
    ],
)
async def test_ollama_error_bodies(
    emu: Emulator, http: aiohttp.ClientSession, path: str, body: Any, status: int, error: str
) -> None:
    method = "DELETE" if path == "/api/delete" else "POST"
    got, kind, text = await call(http, emu, path, body, method=method)
    assert (got, kind, json.loads(text)) == (
        status,
        "application/json; charset=utf-8",
        {"error": error},
    )


async def test_openai_error_bodies(emu: Emulator, http: aiohttp.ClientSession) -> None:
    status, kind, text = await call(http, emu, "/v1/chat/completions", {"model": "nope"})
    assert (status, kind) == (400, "application/json")
    assert json.loads(text) == {
        "error": {
            "message": "[] is too short - 'messages'",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    status, _, text = await call(http, emu, "/v1/chat/completions", CHAT | {"model": "nope"})
    assert status == 404 and json.loads(text)["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        (
            "/v1/completions",
            {"model": "llama3.1:8b", "prompt": ["a"]},
            "json: cannot unmarshal array into Go value of type string",
        ),
        ("/v1/embeddings", {"model": "nomic-embed-text", "input": []}, "invalid input"),
        (
            "/v1/embeddings",
            {"model": "nomic-embed-text", "input": "x", "encoding_format": "hex"},
            "Invalid value for 'encoding_format' = hex. Supported values: ['float', 'base64'].",
        ),
    ],
)
async def test_openai_bad_requests(
    emu: Emulator, http: aiohttp.ClientSession, path: str, body: Any, message: str
) -> None:
    status, _, text = await call(http, emu, path, body)
    assert status == 400 and json.loads(text)["error"]["message"] == message


async def test_openai_model_lookup(emu: Emulator, http: aiohttp.ClientSession) -> None:
    status, kind, text = await call(http, emu, "/v1/models/llama3.1:8b", method="GET")
    assert (status, kind) == (200, "application/json")
    assert json.loads(text)["id"] == "llama3.1:8b"
    status, _, _ = await call(http, emu, "/v1/models/absent", method="GET")
    assert status == 404
    await configure(http, emu, models=[])
    _, _, text = await call(http, emu, "/v1/models", method="GET")
    assert json.loads(text) == {"object": "list", "data": None}  # as Go marshals a nil slice


async def test_delete_then_absent(emu: Emulator, http: aiohttp.ClientSession) -> None:
    status, _, text = await call(http, emu, "/api/delete", {"model": "nomic-embed-text"}, "DELETE")
    assert (status, text) == (200, "")
    _, _, tags = await call(http, emu, "/api/tags", method="GET")
    assert [m["name"] for m in json.loads(tags)["models"]] == ["llama3.1:8b"]


async def test_cold_load_delays_first_token_once(
    emu: Emulator, ollama_client: ollama.AsyncClient
) -> None:
    emu.state.update({"load_delay": 0.2})
    client = ollama_client
    assert not (await client.ps()).models
    first = await client.generate(model="llama3.1:8b", prompt="x")
    second = await client.generate(model="llama3.1:8b", prompt="x")
    assert (first.load_duration or 0) >= 200_000_000
    assert (second.load_duration or 0) < 100_000_000
    running = (await client.ps()).models
    assert [m.model for m in running] == ["llama3.1:8b"]
    assert running[0].expires_at is not None and running[0].size_vram
