"""What routing reads from a request body: the prompt's prefix chain and its size.

A prompt is cut into segments: for chat requests one per message (role, content, images
by digest), for completions the system prompt and the prompt in blocks of
``BLOCK_CHARS``. Each segment's hash chains the one before it, so two requests share a
chain prefix exactly when they share that prompt prefix; the prefix index keeps chains.
An assistant message hashes by its role and position only: a client sends the node's
reply back as the next turn's history, and the node's cache holds that reply already,
whatever olmd saw of it (olmd does not parse streamed chunks). Tokens are estimated at
``CHARS_PER_TOKEN`` characters each, plus a few per message for the chat template.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from daemon.ports import RouteRequest

# Options a runner is loaded with: a request asking for other values makes Ollama reload
# the model (its scheduler's needsReload compares them).
RUNNER_OPTIONS = frozenset(
    {"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap"}
)
EMBEDDING_ROUTES = frozenset({"/api/embed", "/api/embeddings", "/v1/embeddings"})
CHARS_PER_TOKEN = 4
TEMPLATE_TOKENS = 2  # role markers and separators a chat template adds per message
BLOCK_CHARS = 256
MAX_SESSION_CHARS = 128
_PERSON = b"olmd-prefix"


@dataclass(frozen=True, slots=True)
class Prompt:
    """A request's prefix chain: ``hashes[i]`` covers segments 0..i, ``tokens[i]`` their
    estimated tokens. ``conversation`` is the chain's hash through the first user message
    (the conversation's start), None when there is no prompt."""

    hashes: tuple[int, ...]
    tokens: tuple[int, ...]
    conversation: int | None

    @property
    def total_tokens(self) -> int:
        return self.tokens[-1] if self.tokens else 0


EMPTY = Prompt((), (), None)


def _chain(prev: int, *parts: str) -> int:
    h = hashlib.blake2b(prev.to_bytes(8, "big"), digest_size=8, person=_PERSON)
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "big")


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts
        out = []
        for part in value:
            if isinstance(part, Mapping):
                text = part.get("text")
                if isinstance(text, str):
                    out.append(text)
                image = part.get("image_url")
                if isinstance(image, Mapping) and isinstance(image.get("url"), str):
                    out.append("\x01img:" + _digest(image["url"]))
        return "\n".join(out)
    return ""


def _digest(data: str) -> str:
    return hashlib.blake2b(data.encode(), digest_size=8).hexdigest()


def _tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)


def chat_prompt(messages: Any, model: str) -> Prompt:
    if not isinstance(messages, list) or not messages:
        return EMPTY
    hashes: list[int] = []
    tokens: list[int] = []
    conversation: int | None = None
    h, total = _chain(0, model), 0
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        role = message.get("role")
        role = role if isinstance(role, str) else ""
        content = _text(message.get("content"))
        images = message.get("images")
        if isinstance(images, list):
            content += "".join("\x01img:" + _digest(str(i)) for i in images)
        # The reply hashes by role only (see the module docstring); its length still counts.
        h = _chain(h, role) if role == "assistant" else _chain(h, role, content)
        total += _tokens(content) + TEMPLATE_TOKENS
        hashes.append(h)
        tokens.append(total)
        if conversation is None and role == "user":
            conversation = h
    if not hashes:
        return EMPTY
    return Prompt(tuple(hashes), tuple(tokens), conversation or hashes[-1])


def completion_prompt(prompt: Any, system: Any, context: Any, model: str) -> Prompt:
    segments: list[str] = []
    if isinstance(context, list) and context:
        # Token ids of an earlier answer (/api/generate): one segment, matched exactly.
        segments.append("\x01ctx:" + _digest(",".join(map(str, context))))
    if isinstance(system, str) and system:
        segments.append("\x01sys:" + system)
    if isinstance(prompt, list):  # OpenAI completions accept a list of prompts
        prompt = "\n".join(p for p in prompt if isinstance(p, str))
    if isinstance(prompt, str) and prompt:
        segments.extend(prompt[i : i + BLOCK_CHARS] for i in range(0, len(prompt), BLOCK_CHARS))
    if not segments:
        return EMPTY
    hashes: list[int] = []
    tokens: list[int] = []
    h, total = _chain(0, model), 0
    for segment in segments:
        h = _chain(h, segment)
        total += len(context) if segment.startswith("\x01ctx:") else _tokens(segment)
        hashes.append(h)
        tokens.append(total)
    return Prompt(tuple(hashes), tuple(tokens), hashes[0])


def read_prompt(upstream: str, payload: Mapping[str, Any], model: str) -> Prompt:
    """The prefix chain of a request to ``upstream`` (the node's path), from its body."""
    if upstream in ("/api/chat", "/v1/chat/completions"):
        return chat_prompt(payload.get("messages"), model)
    if upstream in ("/v1/messages", "/v1/responses"):  # a system prompt of their own
        system = payload.get("system") or payload.get("instructions")
        messages = payload.get("messages") or payload.get("input")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if system and isinstance(messages, list):
            messages = [{"role": "system", "content": system}, *messages]
        return chat_prompt(messages, model)
    if upstream in ("/api/generate", "/v1/completions"):
        return completion_prompt(
            payload.get("prompt"), payload.get("system"), payload.get("context"), model
        )
    return EMPTY


def route_facts(
    request: web.Request,
    openai: bool,
    upstream: str,
    payload: Mapping[str, Any],
    key: str,
    *,
    with_prompt: bool,
) -> tuple[RouteRequest, Prompt]:
    """What the router needs of a request: its model, its session key (``X-Olmd-Session``,
    or OpenAI's ``user``), and, for a cost balancer only, its prompt's chain and size."""
    session = request.headers.get("X-Olmd-Session")
    if session is None and openai:
        user = payload.get("user")
        session = user if isinstance(user, str) and user else None
    if session is not None and len(session) > MAX_SESSION_CHARS:
        # Kept per session, and shared with other gateways: a fixed size, whatever sent.
        session = "#" + hashlib.blake2b(session.encode(), digest_size=16).hexdigest()
    embedding = upstream in EMBEDDING_ROUTES
    if not with_prompt:
        return RouteRequest(key, session=session, embedding=embedding), EMPTY
    options = payload.get("options")
    runner: tuple[tuple[str, object], ...] = ()
    if isinstance(options, Mapping):
        runner = tuple(sorted((k, v) for k, v in options.items() if k in RUNNER_OPTIONS))
    prompt = read_prompt(upstream, payload, key)
    facts = RouteRequest(key, prompt.total_tokens, prompt.conversation, session, runner, embedding)
    return facts, prompt
