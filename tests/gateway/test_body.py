"""Reading a proxied body: the model of a JSON body or of a multipart form, and the node's
own spelling put in its place with every other byte kept."""

from __future__ import annotations

import json

import pytest

from daemon.gateway.body import BadBody, parse_form, parse_json

BOUNDARY = "b0undary"
FORM_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def _form(*parts: tuple[str, bytes, str | None]) -> bytes:
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += value + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def test_a_json_body_keeps_every_byte_but_the_model() -> None:
    raw = b'{ "model" : "LLAMA3.1:8B", "think": true,\n "x": {"model": "other"}, "n": 1e-1}'
    body = parse_json(raw)
    assert body.name == "LLAMA3.1:8B"
    assert body.for_node("LLAMA3.1:8B") is raw  # the node's own spelling: untouched
    assert body.for_node(None) is raw
    assert body.for_node("llama3.1:8b") == raw.replace(b"LLAMA3.1:8B", b"llama3.1:8b")
    assert parse_json(b'{"model": "llama3"}').for_node("llama3:latest") == b'{"model": "llama3"}'
    assert parse_json(b'{"name": "Qwen3"}').for_node("qwen3:latest") == b'{"name": "qwen3:latest"}'


def test_a_model_found_twice_rewrites_the_object_without_losing_fields() -> None:
    raw = b'{"model": "A:1b", "tools": [{"model": "A:1b"}], "unknown": [1, null]}'
    data = json.loads(parse_json(raw).for_node("a:1b"))
    assert data == {"model": "a:1b", "tools": [{"model": "A:1b"}], "unknown": [1, None]}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{nope", "invalid JSON in the request body"),
        (b"[1]", "the request body must be a JSON object"),
        (b'{"model": ""}', "model is required"),
    ],
)
def test_json_bodies_olmd_cannot_route(raw: bytes, message: str) -> None:
    with pytest.raises(BadBody, match=message):
        parse_json(raw)


def test_the_form_model_is_found_after_a_file_and_rewritten_in_place() -> None:
    audio = b"RIFF" + bytes(range(256)) * 4 + b'name="model"'
    raw = _form(
        ("file", audio, "model"), ("model", b"Whisper:Small", None), ("language", b"en", None)
    )
    body = parse_form(raw, FORM_TYPE)
    assert body.name == "Whisper:Small" and body.is_form
    sent = body.for_node("whisper:small")
    assert sent == raw.replace(b"Whisper:Small", b"whisper:small")
    assert body.for_node("Whisper:Small") is raw


def test_forms_olmd_cannot_route() -> None:
    with pytest.raises(BadBody, match="model is required"):
        parse_form(_form(("file", b"x", "a.wav")), FORM_TYPE)
    with pytest.raises(BadBody, match="isn't multipart/form-data"):
        parse_form(b"{}", "application/json")
    with pytest.raises(BadBody, match="model is required"):
        parse_form(b"--b0undary\r\nContent-Disposition: form-data; name=", FORM_TYPE)
