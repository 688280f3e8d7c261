"""A proxied request's body, read once: the model it names and how to send it to a node.

A JSON body is parsed once (the proxy's one parse per request). A multipart form
(``/v1/audio/transcriptions``) is not decoded: the part headers are scanned for the
``model`` field and its value read where it lies; an audio file passes as bytes. The
body is held whole, within ``max_body_bytes`` (aiohttp answers 413 beyond it), because a
request that fails before its first byte reached the client is sent again elsewhere.

Everything but the model's name goes to the node byte for byte (``think``, ``truncate``,
``shift``, ``logprobs``, fields olmd does not know). The name is rewritten only where a
node lists the model under another spelling (``FAKE-LLAMA:8B`` for ``fake-llama:8b``):
the node then gets its own spelling, and a 404 it answers is about the model it lists.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.helpers import parse_mimetype
from aiohttp.multipart import parse_content_disposition

from daemon.domain import DEFAULT_TAG

_DECODER = json.JSONDecoder()


class BadBody(Exception):
    """A body olmd cannot route: the message is the client's to read (a 400)."""


@dataclass(frozen=True, slots=True)
class Body:
    """``raw`` as received; ``payload`` the JSON object (for a form, its ``model``);
    ``name`` the model as the client spelled it, in ``payload[key]``; ``span`` where a
    form's model value lies in ``raw``."""

    raw: bytes
    payload: dict[str, Any]
    name: str
    key: str = "model"
    span: tuple[int, int] | None = None
    _spelled: dict[str, bytes] = field(default_factory=dict, compare=False)

    @property
    def is_form(self) -> bool:
        return self.span is not None

    def sent_as(self, listed: str | None) -> str:
        """The name a node that lists the model as ``listed`` is sent."""
        if listed is None or _same_spelling(self.name, listed):
            return self.name
        return listed

    def for_node(self, listed: str | None) -> bytes:
        """The bytes to send a node that lists the model as ``listed`` (None: unknown)."""
        name = self.sent_as(listed)
        if name == self.name:
            return self.raw
        data = self._spelled.get(name)
        if data is None:  # once per spelling and request: a failover may need it again
            data = self._spelled[name] = self._respelled(name)
        return data

    def _respelled(self, name: str) -> bytes:
        if self.span is not None:
            start, end = self.span
            return self.raw[:start] + name.encode() + self.raw[end:]
        return _json_respelled(self.raw, self.payload, self.key, self.name, name)


def _same_spelling(sent: str, listed: str) -> bool:
    """Whether ``sent`` names ``listed`` as the node spells it (``:latest`` implied)."""
    return sent == listed or sent + ":" + DEFAULT_TAG == listed


def parse_json(raw: bytes) -> Body:
    try:
        payload = json.loads(raw)
    except ValueError:
        raise BadBody("invalid JSON in the request body") from None
    if not isinstance(payload, dict):
        raise BadBody("the request body must be a JSON object")
    # Ollama's decoder matches keys ignoring case, the last one winning: a "MODEL" beside
    # "model" would run another model than the one olmd checked and routed.
    if any(k.lower() in ("model", "name") and k not in ("model", "name") for k in payload):
        raise BadBody('the model is named by a key in another letter case; use "model"')
    key = "model" if payload.get("model") else "name"
    name = payload.get(key)
    if not isinstance(name, str) or not name:
        raise BadBody("model is required")
    return Body(raw, payload, name, key)


def parse_form(raw: bytes, content_type: str) -> Body:
    """The ``model`` field of a ``multipart/form-data`` body, found without decoding it."""
    mime = parse_mimetype(content_type)
    boundary = mime.parameters.get("boundary", "")
    if (mime.type, mime.subtype) != ("multipart", "form-data") or not boundary:
        raise BadBody(
            "failed to parse multipart form: request Content-Type isn't multipart/form-data"
        )
    span = _form_field(raw, b"--" + boundary.encode("latin-1"), "model")
    if span is None:
        raise BadBody("model is required")
    try:
        name = raw[span[0] : span[1]].decode()
    except UnicodeDecodeError:
        raise BadBody("model is required") from None
    if not name:
        raise BadBody("model is required")
    return Body(raw, {"model": name}, name, "model", span)


async def read_body(request: web.Request, *, form: bool) -> Body:
    """The request's body, read once. Raises BadBody, or aiohttp's 413 past the limit."""
    raw = await request.read()
    if form:
        return parse_form(raw, request.headers.get("Content-Type", ""))
    return parse_json(raw)


def _form_field(raw: bytes, delimiter: bytes, wanted: str) -> tuple[int, int] | None:
    """Where the value of the form field ``wanted`` lies in ``raw``, or None.

    Only part headers are read: each part's end is found by searching for the next
    delimiter, so a file part costs one ``bytes.find``.
    """
    at = raw.find(delimiter)
    while at >= 0:
        start = at + len(delimiter)
        if raw.startswith(b"--", start):  # the closing delimiter
            return None
        head_end = raw.find(b"\r\n\r\n", start)
        if head_end < 0:
            return None
        end = raw.find(b"\r\n" + delimiter, head_end + 4)
        if end < 0:
            return None
        for line in raw[start:head_end].split(b"\r\n"):
            header, _, value = line.partition(b":")
            if header.strip().lower() == b"content-disposition":
                _, params = parse_content_disposition(value.decode("latin-1").strip())
                if params.get("name") == wanted and "filename" not in params:
                    return head_end + 4, end
        at = end + 2
    return None


def _json_respelled(raw: bytes, payload: dict[str, Any], key: str, old: str, new: str) -> bytes:
    """``raw`` with the top-level ``key``'s value ``old`` replaced by ``new``, every other
    byte kept. Where the value cannot be found exactly once (escaped oddly, or repeated in
    a nested object), the object is written again, its fields and values unchanged."""
    text = raw.decode("utf-8", "surrogatepass")
    pattern = re.compile(r'"' + re.escape(key) + r'"\s*:\s*"')
    found: list[tuple[int, int]] = []
    for match in pattern.finditer(text):
        value_start = match.end() - 1
        try:
            value, value_end = _DECODER.raw_decode(text, value_start)
        except ValueError:
            continue
        if value == old:
            found.append((value_start, value_end))
    if len(found) == 1:
        start, end = found[0]
        return (text[:start] + json.dumps(new, ensure_ascii=False) + text[end:]).encode(
            "utf-8", "surrogatepass"
        )
    return json.dumps({**payload, key: new}, ensure_ascii=False).encode()
