"""Ollama's request and answer formats: parsing a generate / chat request, rendering the answer.

Everything here is pure (no I/O; the clock only where a timestamp is the point), so the
handlers in ``daemon.emulator.handlers`` stay short. Field order follows the Go structs in
ollama's ``api/types.go`` and ``openai/openai.go``, error texts are copied from its
``server/routes.go`` and ``server/sched.go``, and fields Go marks ``omitempty`` are left
out when zero, as the real server does. Bodies that describe models (tags, ps, show,
pull progress, /v1/models) are in ``daemon.emulator.bodies``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
import time
from typing import Any, Literal

from daemon.emulator import tokens as tok

ERR_MAX_QUEUE = "server busy, please try again.  maximum pending requests exceeded"
ERR_MODEL_REQUIRED = "model is required"
ERR_MISSING_BODY = "missing request body"
ERR_INVALID_NAME = "invalid model name"
ERR_PULL_MANIFEST = "pull model manifest: file does not exist"
# Errors Ollama really sends mid-answer; injected faults reuse them.
ERR_RUNNER_GONE = "llama runner process has terminated: exit status 2"
ERR_PULL_EOF = "max retries exceeded: unexpected EOF"

KEEP_ALIVE_DEFAULT = 300.0
KEEP_ALIVE_FOREVER = 10 * 365 * 24 * 3600.0  # keep_alive < 0: Ollama shows a far expiry

# The last three are chat requests in other APIs' clothes (``daemon.emulator.dialects``).
JobKind = Literal[
    "generate", "chat", "v1chat", "v1completion", "messages", "responses", "transcription"
]

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_WORDS = (
    "The", "sky", "is", "blue", "because", "air", "scatters", "short", "light",
    "waves", "more", "than", "long", "ones", "at", "noon",
)  # fmt: skip


# ---------------------------------------------------------------- time


def rfc3339(ns: int | None = None) -> str:
    """UTC time as Go marshals a time.Time: nanoseconds with trailing zeros trimmed."""
    secs, frac = divmod(time.time_ns() if ns is None else ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    digits = f"{frac:09d}".rstrip("0")
    return f"{base}.{digits}Z" if digits else f"{base}Z"


def keep_alive_seconds(value: Any) -> float:
    """keep_alive as seconds: a number or a Go duration ("5m"); negative means forever."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.lstrip("+-")
        parts = _DURATION_RE.findall(text)
        if text.replace(".", "", 1).isdigit():
            seconds = sign * float(text)
        elif parts and "".join(a + u for a, u in parts) == text:
            seconds = sign * sum(float(a) * _UNIT_SECONDS[u] for a, u in parts)
    if seconds is None:
        return KEEP_ALIVE_DEFAULT
    return KEEP_ALIVE_FOREVER if seconds < 0 else seconds


# ---------------------------------------------------------------- requests


class Reject(Exception):
    """An error answer (status, message), given before any byte of the response."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclasses.dataclass(slots=True)
class Job:
    """A generate / chat request, Ollama's or OpenAI's, parsed; ``model`` as sent."""

    kind: JobKind
    model: str
    prompt: str
    stream: bool
    limit: int | None  # num_predict or max_tokens
    keep_alive: float = KEEP_ALIVE_DEFAULT
    context: int | None = None  # options.num_ctx: another than the runner's reloads it
    raw: bool = False
    load_only: bool = False  # an empty prompt only loads (or, keep_alive 0, unloads)
    include_usage: bool = False
    rid: str = ""
    created: int = 0
    tokens: list[int] = dataclasses.field(default_factory=list)  # the prompt, tokenized
    events: int = 0  # stream events sent so far (the APIs that number or open them)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # what a dialect echoes

    @property
    def openai(self) -> bool:
        """Not Ollama's own API: SSE when streamed, JSON without a charset."""
        return self.kind not in ("generate", "chat")

    @property
    def verb(self) -> str:
        return "chat" if self.kind in ("chat", "v1chat") else "generate"


def model_of(body: dict[str, Any]) -> str:
    model = body.get("model") or body.get("name")
    if not isinstance(model, str) or not model.strip():
        raise Reject(400, ERR_MODEL_REQUIRED)
    return model


def chat_text(messages: Any) -> str:
    parts: list[str] = []
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):  # OpenAI content parts
            parts += [p["text"] for p in content if isinstance(p, dict) and "text" in p]
    return "\n".join(parts)


def parse_job(kind: JobKind, body: dict[str, Any]) -> Job:
    if kind == "v1chat" and not body.get("messages"):
        raise Reject(400, "[] is too short - 'messages'")
    model = model_of(body)
    prompt = body.get("prompt") if kind in ("generate", "v1completion") else None
    if prompt is None:  # Go decodes null into ""
        prompt = ""
    if not isinstance(prompt, str):
        found = {list: "array", dict: "object", bool: "bool"}.get(type(prompt), "number")
        raise Reject(400, f"json: cannot unmarshal {found} into Go value of type string")
    if kind in ("chat", "v1chat"):
        prompt = chat_text(body.get("messages"))
        tokens = tok.chat(body.get("messages"))
    elif kind == "generate":
        tokens = tok.generate(prompt, body.get("system"), body.get("context"))
    else:
        tokens = tok.generate(prompt)
    if kind in ("v1chat", "v1completion"):
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        options = body.get("stream_options")
        prefix = "chatcmpl" if kind == "v1chat" else "cmpl"
        return Job(
            kind,
            model,
            prompt,
            stream=body.get("stream") is True,
            limit=limit if isinstance(limit, int) else None,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            rid=f"{prefix}-{random.randrange(999)}",
            created=int(time.time()),
            tokens=tokens,
        )
    options = body.get("options")
    limit = options.get("num_predict") if isinstance(options, dict) else None
    context = options.get("num_ctx") if isinstance(options, dict) else None
    return Job(
        kind,
        model,
        prompt,
        stream=body.get("stream") is not False,
        limit=limit if isinstance(limit, int) else None,
        context=context if isinstance(context, int) and context > 0 else None,
        keep_alive=keep_alive_seconds(body.get("keep_alive")),
        raw=body.get("raw") is True,
        load_only=not (prompt if kind == "generate" else body.get("messages")),
        tokens=tokens,
    )


def embed_input(raw: Any, *, openai: bool) -> list[str]:
    """The texts of /api/embed's or /v1/embeddings' ``input``, as each one accepts them."""
    if openai:
        texts = [raw] if isinstance(raw, str) else raw
        if not texts or not isinstance(texts, list):
            raise Reject(400, "invalid input")
    else:
        texts = ([raw] if raw else []) if isinstance(raw, str | None) else raw
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise Reject(400, "invalid input type")
    return texts


# ---------------------------------------------------------------- generation


def dumps(obj: Any) -> bytes:
    """Compact JSON, as Go's encoding/json writes it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def ndjson(obj: Any) -> bytes:
    return dumps(obj) + b"\n"


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def prompt_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def answer(prompt: str, count: int) -> list[str]:
    """``count`` tokens; the same prompt always gets the same answer."""
    seed = hashlib.sha256(prompt.encode()).digest()[0]
    return [("" if i == 0 else " ") + _WORDS[(seed + i) % len(_WORDS)] for i in range(count)]


def embedding(text: str, dim: int) -> list[float]:
    """A unit vector derived from the text: equal texts, equal vectors."""
    raw: list[float] = []
    while len(raw) < dim:
        block = hashlib.sha256(f"{len(raw)}:{text}".encode()).digest()
        raw.extend((b - 127.5) / 127.5 for b in block)
    norm = math.sqrt(sum(v * v for v in raw[:dim])) or 1.0
    return [round(v / norm, 7) for v in raw[:dim]]


def metrics(
    *, total: int, load: int, prompt_count: int, prompt_ns: int, eval_count: int, eval_ns: int
) -> dict[str, int]:
    """A final chunk's counters, durations in nanoseconds, zeros dropped (omitempty)."""
    fields = {
        "total_duration": total,
        "load_duration": load,
        "prompt_eval_count": prompt_count,
        "prompt_eval_duration": prompt_ns,
        "eval_count": eval_count,
        "eval_duration": eval_ns,
    }
    return {k: v for k, v in fields.items() if v}


def openai_error(status: int, message: str) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


# ---------------------------------------------------------------- rendering a job


def chunk(job: Job, token: str) -> bytes:
    """One streamed token in the job's dialect."""
    now = rfc3339()
    if job.kind == "generate":
        return ndjson({"model": job.model, "created_at": now, "response": token, "done": False})
    if job.kind == "chat":
        message = {"role": "assistant", "content": token}
        return ndjson({"model": job.model, "created_at": now, "message": message, "done": False})
    return sse(_openai_body(job, token, None, None))


def final(
    job: Job, text: str, reason: str, stats: dict[str, int], reply: str | None = None
) -> dict[str, Any]:
    """The whole answer when not streamed; with ``text=""`` the closing chunk of a stream,
    ``reply`` then the text streamed (a generate's ``context`` is prompt + reply tokens)."""
    now = rfc3339()
    if job.kind == "generate":
        body: dict[str, Any] = {"model": job.model, "created_at": now, "response": text}
        body.update(done=True, done_reason=reason)
        if not job.raw:
            body["context"] = job.tokens + tok.reply(text if reply is None else reply)
        return body | stats
    if job.kind == "chat":
        message = {"role": "assistant", "content": text}
        body = {"model": job.model, "created_at": now, "message": message}
        return body | {"done_reason": reason, "done": True} | stats
    usage = _usage(stats)
    return _openai_body(job, text, reason, None if job.stream else usage)


def closing(job: Job, reason: str, stats: dict[str, int], reply: str) -> bytes:
    """The bytes that end a streamed answer: final chunk, usage if asked, ``[DONE]``."""
    last = final(job, "", reason, stats, reply)
    if not job.openai:
        return ndjson(last)
    tail = sse({**last, "choices": [], "usage": _usage(stats)}) if job.include_usage else b""
    return sse(last) + tail + SSE_DONE


def load_reply(job: Job, reason: str) -> dict[str, Any]:
    """The answer to an empty prompt: done_reason "load" or "unload"."""
    body: dict[str, Any] = {"model": job.model, "created_at": rfc3339()}
    if job.kind == "generate":
        return body | {"response": "", "done": True, "done_reason": reason}
    return body | {
        "message": {"role": "assistant", "content": ""},
        "done_reason": reason,
        "done": True,
    }


def _usage(stats: dict[str, int]) -> dict[str, int]:
    prompt, completion = stats.get("prompt_eval_count", 0), stats.get("eval_count", 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _openai_body(
    job: Job, text: str, reason: str | None, usage: dict[str, int] | None
) -> dict[str, Any]:
    """A chat.completion(.chunk) or text_completion; ``usage`` only on a whole answer."""
    streamed = usage is None
    if job.kind == "v1chat":
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "delta" if streamed else "message": message, "finish_reason": reason}
        kind = "chat.completion.chunk" if streamed else "chat.completion"
    else:
        choice = {"text": text, "index": 0, "finish_reason": reason}
        kind = "text_completion"
    body: dict[str, Any] = {
        "id": job.rid,
        "object": kind,
        "created": job.created,
        "model": job.model,
        "system_fingerprint": "fp_ollama",
        "choices": [choice],
    }
    return body if usage is None else body | {"usage": usage}
