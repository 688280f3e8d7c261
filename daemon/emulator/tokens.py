"""The emulator's tokenizer: deterministic, prefix-stable, good enough for a KV-cache model.

A request renders as segments, one per message, ``"<role>\\n<content>\\n"`` (each image
of a message adds ``" [img <8 hex digits>]"`` to its content, a digest of the image). Each
segment is cut into pieces of 4 characters (the last one shorter) and each piece hashed to
a token id. Segments are cut separately, so the tokens of the first k messages are a
prefix of the tokens of k + 1 messages, and a client that appends the reply as an
assistant message finds the whole previous turn in a slot's cache.

A generate request is a ``system`` segment (if any) and a ``user`` segment of its prompt,
after the ints of its ``context`` (if any): the ``context`` a reply returns is the prompt
tokens plus :func:`reply` tokens, so sending it back is a cache hit. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

PIECE = 4  # characters per token


def token_id(piece: str) -> int:
    """A piece's id: 31 bits of its hash, an int every JSON client keeps exactly."""
    digest = hashlib.blake2b(piece.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF


def segment(role: str, content: str) -> str:
    return f"{role}\n{content}\n"


def encode(segments: Iterable[str]) -> list[int]:
    """Each segment cut into 4-character pieces, the pieces' ids in order."""
    return [token_id(text[i : i + PIECE]) for text in segments for i in range(0, len(text), PIECE)]


def _image(data: Any) -> str:
    raw = data if isinstance(data, str) else repr(data)
    return f" [img {hashlib.sha256(raw.encode()).hexdigest()[:8]}]"


def content_text(message: dict[str, Any]) -> str:
    """A message's text as its segment shows it: text (parts joined), then image digests."""
    content = message.get("content")
    text, images = "", list(message.get("images") or ())
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):  # OpenAI content parts
        for part in content:
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("text"), str):
                text += part["text"]
            elif "image_url" in part:
                url = part["image_url"]
                images.append(url.get("url") if isinstance(url, dict) else url)
    return text + "".join(_image(image) for image in images)


def chat(messages: Any) -> list[int]:
    """The tokens of a chat request's messages (anything but a list of dicts is skipped)."""
    segments = []
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, dict):
            role = message.get("role")
            segments.append(
                segment(role if isinstance(role, str) else "user", content_text(message))
            )
    return encode(segments)


def generate(prompt: str, system: Any = None, context: Any = None) -> list[int]:
    """The tokens of a generate request: its ``context`` ints, then system and prompt."""
    lead = [t for t in context if type(t) is int] if isinstance(context, list) else []
    segments = [segment("system", system)] if isinstance(system, str) and system else []
    return lead + encode([*segments, segment("user", prompt)])


def reply(text: str) -> list[int]:
    """The tokens a reply adds: the assistant message the next turn will present."""
    return encode([segment("assistant", text)])


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
