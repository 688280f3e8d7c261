"""The emulator answers Ollama's newer routes as current Ollama does: Anthropic's Messages
(events, errors), OpenAI's Responses and audio transcriptions, read with the official
``anthropic`` and ``openai`` clients and on the wire."""

from __future__ import annotations

import json

import aiohttp
import anthropic
import openai
import pytest

from daemon.emulator.server import Emulator
from tests.emulator.support import MODELS

MODEL = MODELS[0]
HI = [{"role": "user", "content": "hi"}]


async def test_messages_with_the_anthropic_client(emu: Emulator) -> None:
    async with anthropic.AsyncAnthropic(base_url=emu.url, api_key="x", max_retries=0) as client:
        message = await client.messages.create(
            model=MODEL,
            max_tokens=64,
            system=[{"type": "text", "text": "be brief"}],
            messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        )
        assert message.id.startswith("msg_") and len(message.id) == 28
        assert message.model == MODEL and message.stop_reason == "end_turn"
        async with client.messages.stream(model=MODEL, max_tokens=2, messages=HI) as stream:
            final = await stream.get_final_message()
        assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 2
        with pytest.raises(anthropic.NotFoundError) as caught:
            await client.messages.create(model="nope", max_tokens=8, messages=HI)
        assert caught.value.body["error"] == {
            "type": "not_found_error",
            "message": "model 'nope' not found",
        }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"max_tokens": 8, "messages": HI}, "model is required"),
        ({"model": MODEL, "messages": HI}, "max_tokens is required and must be positive"),
        ({"model": MODEL, "max_tokens": 8, "messages": []}, "messages is required"),
    ],
)
async def test_messages_checks_as_ollama(emu: Emulator, body, message) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{emu.url}/v1/messages", json=body) as response:
            assert response.status == 400
            error = await response.json()
    assert error["type"] == "error" and error["request_id"].startswith("req_")
    assert error["error"] == {"type": "invalid_request_error", "message": message}


async def test_the_messages_stream_on_the_wire(emu: Emulator) -> None:
    emu.state.update({"tokens": 2})
    body = {"model": MODEL, "max_tokens": 8, "messages": HI, "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{emu.url}/v1/messages", json=body) as response:
            assert response.headers["Content-Type"] == "text/event-stream"
            text = (await response.read()).decode()
    events = [line[7:] for line in text.split("\n") if line.startswith("event: ")]
    assert events == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    last_delta = json.loads(text.split("event: message_delta\ndata: ")[1].split("\n")[0])
    assert last_delta["delta"] == {"stop_reason": "end_turn"}
    assert last_delta["usage"]["output_tokens"] == 2


async def test_responses_and_transcriptions_with_the_openai_client(emu: Emulator) -> None:
    async with openai.AsyncOpenAI(base_url=emu.url + "/v1", api_key="x", max_retries=0) as client:
        response = await client.responses.create(
            model=MODEL, input="hi", max_output_tokens=3, temperature=0.5
        )
        assert response.id.startswith("resp_") and response.output[0].id.startswith("msg_")
        assert response.temperature == 0.5 and response.max_output_tokens == 3
        assert response.usage.output_tokens == 3 and response.completed_at
        stream = await client.responses.create(model=MODEL, input="hi", stream=True)
        numbers = [event.sequence_number async for event in stream]
        assert numbers == list(range(len(numbers)))
        transcript = await client.audio.transcriptions.create(
            model=MODEL, file=("a.wav", b"RIFF....", "audio/wav"), language="en"
        )
        assert transcript.text and transcript.text == transcript.text.strip()
        with pytest.raises(openai.BadRequestError, match="audio file is empty"):
            await client.audio.transcriptions.create(model=MODEL, file=("a.wav", b"", "audio/wav"))
    stats = emu.state.stats.snapshot()
    assert stats["requests"]["/v1/audio/transcriptions"] == 2
