"""The Ollama emulator against the official ollama and openai clients, on 127.0.0.1."""

from __future__ import annotations

import base64
import struct
from typing import Any

import ollama
import openai
import pytest

from daemon.emulator.server import Emulator
from tests.emulator.support import QUESTION, drain


async def test_ollama_client_chat_generate_embed_list_show(
    ollama_client: ollama.AsyncClient,
) -> None:
    client = ollama_client
    reply = await client.chat(model="llama3.1:8b", messages=QUESTION)
    assert reply.done and reply.done_reason == "stop"
    assert reply.message.role == "assistant" and len(reply.message.content or "") > 0
    assert reply.eval_count == 8 and (reply.eval_duration or 0) > 0

    parts = [p async for p in await client.chat("llama3.1:8b", QUESTION, stream=True)]
    assert [p.done for p in parts] == [False] * 8 + [True]
    assert "".join(p.message.content or "" for p in parts) == reply.message.content

    generated = await client.generate(model="llama3.1:8b", prompt="Why is the sky blue?")
    assert generated.response == reply.message.content and generated.context
    chunks = [c async for c in await client.generate("llama3.1:8b", "hello", stream=True)]
    assert chunks[-1].done and chunks[-1].context and not chunks[-1].response
    assert "".join(c.response or "" for c in chunks[:-1]).strip()

    embedded = await client.embed(model="nomic-embed-text", input=["a", "b"])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 8
    again = await client.embed(model="nomic-embed-text", input="a")
    assert again.embeddings[0] == embedded.embeddings[0]  # deterministic
    legacy = await client.embeddings(model="nomic-embed-text", prompt="a")
    assert len(legacy.embedding) == 8

    listed = await client.list()
    assert {m.model for m in listed.models} == {"llama3.1:8b", "nomic-embed-text:latest"}
    shown = await client.show("llama3.1:8b")
    assert shown.capabilities == ["completion"] and shown.details
    assert shown.details.family == "llama"
    running = await client.ps()
    assert {m.model for m in running.models} == {"llama3.1:8b", "nomic-embed-text:latest"}

    with pytest.raises(ollama.ResponseError) as missing:
        await client.chat(model="absent", messages=QUESTION)
    assert missing.value.status_code == 404
    assert missing.value.error == "model 'absent' not found"


async def test_ollama_client_pull_reports_progress_then_lists(
    emu: Emulator, ollama_client: ollama.AsyncClient
) -> None:
    emu.state.update({"pull_size": 40_000, "pull_speed": 400_000})
    client = ollama_client
    statuses: list[str] = []
    completed: list[int] = []
    async for progress in await client.pull("qwen3:0.6b", stream=True):
        statuses.append(progress.status or "")
        completed.append(progress.completed or 0)
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    layers = [s for s in statuses if s.startswith("pulling ") and s != "pulling manifest"]
    assert len(set(layers)) == 2 and all(len(s) == len("pulling ") + 12 for s in layers)
    assert len(layers) > 3  # rate limited: several progress lines per layer
    assert max(completed) == 36_000
    assert "qwen3:0.6b" in {m.model for m in (await client.list()).models}

    result = await client.pull("qwen3:0.6b")  # already present: cache hits, one object
    assert result.status == "success"
    emu.state.update({"unavailable": ["nonesuch"]})
    with pytest.raises(ollama.ResponseError, match="file does not exist"):
        await drain(await client.pull("nonesuch", stream=True))


async def test_openai_client_chat_completions_embeddings_models(
    openai_client: openai.AsyncOpenAI,
) -> None:
    client = openai_client
    chat = await client.chat.completions.create(model="llama3.1:8b", messages=QUESTION)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert chat.choices[0].finish_reason == "stop"
    assert chat.usage is not None and chat.usage.completion_tokens == 8

    stream = await client.chat.completions.create(
        model="llama3.1:8b",
        messages=QUESTION,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 8

    done = await client.completions.create(model="llama3.1:8b", prompt="hi", max_tokens=3)
    assert done.object == "text_completion" and done.choices[0].finish_reason == "length"
    streamed = await client.completions.create(model="llama3.1:8b", prompt="hi", stream=True)
    pieces = [piece async for piece in streamed]
    assert {p.object for p in pieces} == {"text_completion"}
    assert pieces[-1].choices[0].finish_reason == "stop"

    vectors = await client.embeddings.create(model="nomic-embed-text", input=["a", "b"])
    assert [d.index for d in vectors.data] == [0, 1] and len(vectors.data[0].embedding) == 8
    packed = await client.embeddings.create(
        model="nomic-embed-text", input="a", encoding_format="base64"
    )
    raw: Any = packed.data[0].embedding  # the client may leave base64 undecoded
    unpacked = struct.unpack("<8f", base64.b64decode(raw)) if isinstance(raw, str) else raw
    assert unpacked == pytest.approx(vectors.data[0].embedding, abs=1e-6)

    models = [m async for m in client.models.list()]
    assert {m.id for m in models} == {"llama3.1:8b", "nomic-embed-text:latest"}
    assert {m.owned_by for m in models} == {"library"}

    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="absent", messages=QUESTION)
