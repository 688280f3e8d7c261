"""The emulator's data and Ollama's wire formats: config, requests, response bodies.

Everything here is pure (no I/O; the clock only where a timestamp is the point), so the
handlers in ``daemon.emulator`` stay short. Field order follows the Go structs in
ollama's ``api/types.go`` and ``openai/openai.go``, error texts are copied from its
``server/routes.go`` and ``server/sched.go``, and fields Go marks ``omitempty`` are left
out when zero, as the real server does.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import random
import re
import struct
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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

FaultKind = Literal["none", "refuse", "http500", "http503", "stall", "cut", "error_line"]
JobKind = Literal["generate", "chat", "v1chat", "v1completion"]
GENERATING_ROUTES = (
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
)
FAULT_ROUTES = (*GENERATING_ROUTES, "/api/pull")

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-/:]*$")
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)([bm])\b", re.IGNORECASE)
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# (name prefix, GGUF family); the first match wins, so longer prefixes come first.
_FAMILIES = (
    ("nomic-embed", "nomic-bert"),
    ("all-minilm", "bert"),
    ("mxbai-embed", "bert"),
    ("qwen3", "qwen3"),
    ("qwen", "qwen2"),
    ("gemma3", "gemma3"),
    ("gemma", "gemma2"),
    ("phi", "phi3"),
    ("deepseek", "qwen2"),
)
_WORDS = (
    "The", "sky", "is", "blue", "because", "air", "scatters", "short", "light",
    "waves", "more", "than", "long", "ones", "at", "noon",
)  # fmt: skip
_STOPS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
TEMPLATE = (
    "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>"
    "{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}"
    "<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}"
    "<|eot_id|>"
)


# ---------------------------------------------------------------- configuration


class EmulatorConfig(BaseModel):
    """How the emulated node behaves. Every field can be changed while it runs."""

    model_config = ConfigDict(extra="forbid")

    name: str = "emulator"
    version: str = "0.12.0"
    models: list[str] = Field(default_factory=lambda: ["llama3.1:8b"])
    digests: dict[str, str] = Field(default_factory=dict, description="name → 64 hex digits")
    tokens: int = Field(8, ge=0, description="tokens per answer")
    token_delay: float = Field(0.0, ge=0, description="seconds between tokens")
    load_delay: float = Field(0.0, ge=0, description="cold load before an unloaded model answers")
    pull_size: int = Field(1_000_000, ge=1, description="bytes a pull transfers")
    pull_speed: float = Field(0.0, ge=0, description="pull bytes per second, 0 = unlimited")
    concurrency: int = Field(0, ge=0, description="requests generating at once, 0 = unlimited")
    queue: int = Field(512, ge=0, description="requests waiting beyond that before a 503")
    embedding_dim: int = Field(8, ge=1, le=8192)
    unavailable: list[str] = Field(default_factory=list, description="names a pull cannot find")
    fault: FaultKind = "none"
    fault_after: int = Field(0, ge=0, description="chunks sent before cut / error_line")
    fault_routes: list[str] = Field(default_factory=lambda: list(FAULT_ROUTES))
    fault_count: int = Field(0, ge=0, description="requests faulted before it clears, 0 = all")

    @field_validator("models", "unavailable")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        out: list[str] = []
        for raw in names:
            if not valid_name(raw.strip()):
                raise ValueError(f"invalid model name {raw!r}")
            name = normalize(raw)
            if all(name.lower() != seen.lower() for seen in out):
                out.append(name)
        return out

    @field_validator("digests")
    @classmethod
    def _digests(cls, digests: dict[str, str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in digests.items():
            digest = value.lower().removeprefix("sha256:")
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"digest of {name!r} must be 64 hex digits")
            out[normalize(name).lower()] = digest
        return out

    @field_validator("fault_routes")
    @classmethod
    def _routes(cls, routes: list[str]) -> list[str]:
        unknown = sorted(set(routes) - set(FAULT_ROUTES))
        if unknown:
            raise ValueError(f"unknown routes {unknown}; expected some of {list(FAULT_ROUTES)}")
        return routes


def describe(exc: ValidationError) -> str:
    """A one-line account of a config error, naming each bad key."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
    )


@dataclasses.dataclass
class Stats:
    """What the emulator saw; ``in_flight`` counts requests past the concurrency gate."""

    requests: dict[str, int] = dataclasses.field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    queued: int = 0
    pulls_in_flight: int = 0
    max_pulls_in_flight: int = 0
    cancelled: int = 0
    completed: int = 0
    rejected: int = 0
    faults: int = 0

    def snapshot(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def reset(self) -> None:
        """Clear the counters; gauges of what is running now stay true."""
        fresh = Stats(
            in_flight=self.in_flight,
            max_in_flight=self.in_flight,
            queued=self.queued,
            pulls_in_flight=self.pulls_in_flight,
            max_pulls_in_flight=self.pulls_in_flight,
        )
        self.__dict__.update(fresh.__dict__)


# ---------------------------------------------------------------- names and time


def valid_name(name: str) -> bool:
    return bool(_NAME_RE.match(name)) and not name.endswith((":", "/"))


def normalize(name: str) -> str:
    """``llama3`` → ``llama3:latest``; a name that has a tag keeps it."""
    name = name.strip()
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def namespace(name: str) -> str:
    """The owner /v1/models reports: ``library`` unless the name has a namespace."""
    parts = name.split(":", 1)[0].split("/")
    return parts[-2] if len(parts) >= 2 else "library"


def default_digest(name: str) -> str:
    """64 hex digits without ``sha256:``, equal on every emulator for one model name."""
    return hashlib.sha256(normalize(name).lower().encode()).hexdigest()


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


# ---------------------------------------------------------------- model metadata


def family(name: str) -> str:
    base = name.rsplit("/", 1)[-1].lower()
    return next((fam for prefix, fam in _FAMILIES if base.startswith(prefix)), "llama")


def is_embedding(name: str) -> bool:
    return family(name) in ("bert", "nomic-bert") or "embed" in name.lower()


def parameter_count(name: str) -> int:
    found = _SIZE_RE.search(name.rsplit(":", 1)[-1])
    if found is None:
        return 137_000_000 if is_embedding(name) else 3_210_000_000
    return int(float(found.group(1)) * (1e9 if found.group(2).lower() == "b" else 1e6))


def model_size(name: str) -> int:
    # Q4_K_M spends about 4.8 bits a parameter; embedding models ship as F16.
    count = parameter_count(name)
    return count * 2 if is_embedding(name) else int(count * 0.6)


def details(name: str) -> dict[str, Any]:
    count = parameter_count(name)
    size = f"{count / 1e9:.1f}B" if count >= 1_000_000_000 else f"{round(count / 1e6)}M"
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family(name),
        "families": [family(name)],
        "parameter_size": size,
        "quantization_level": "F16" if is_embedding(name) else "Q4_K_M",
    }


def tags_entry(name: str, digest: str, modified_ns: int) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": rfc3339(modified_ns),
        "size": model_size(name),
        "digest": digest,
        "details": details(name),
    }


def ps_entry(name: str, digest: str, expires_ns: int) -> dict[str, Any]:
    size = model_size(name)
    return {
        "name": name,
        "model": name,
        "size": size,
        "digest": digest,
        "details": details(name),
        "expires_at": rfc3339(expires_ns),
        "size_vram": size,
        "context_length": 4096,
    }


def show_body(name: str, digest: str, modified_ns: int, embedding_dim: int) -> dict[str, Any]:
    fam, embed = family(name), is_embedding(name)
    template = "{{ .Prompt }}" if embed else TEMPLATE
    stops = () if embed else _STOPS
    modelfile = (
        '# Modelfile generated by "ollama show"\n'
        "# To build a new Modelfile based on this, replace FROM with:\n"
        f"# FROM {name}\n\n"
        f"FROM /usr/share/ollama/.ollama/models/blobs/sha256-{digest}\n"
        f'TEMPLATE """{template}"""\n' + "".join(f"PARAMETER stop {json.dumps(s)}\n" for s in stops)
    )
    return {
        "license": "",
        "modelfile": modelfile,
        "parameters": "\n".join(f"{'stop':<30} {json.dumps(s)}" for s in stops),
        "template": template,
        "details": details(name),
        "model_info": {
            "general.architecture": fam,
            "general.file_type": 1 if embed else 15,
            "general.parameter_count": parameter_count(name),
            "general.quantization_version": 2,
            f"{fam}.context_length": 8192 if embed else 131072,
            f"{fam}.embedding_length": embedding_dim,
        },
        "capabilities": ["embedding"] if embed else ["completion"],
        "modified_at": rfc3339(modified_ns),
    }


def pull_layers(name: str, digest: str, total: int) -> list[tuple[str, int]]:
    """(``sha256:…`` digest, size) per layer: the weights, then a small params layer."""
    small = total // 10
    sizes = [s for s in (total - small, small) if s > 0]
    return [
        ("sha256:" + hashlib.sha256(f"{digest}/{i}/{name}".encode()).hexdigest(), size)
        for i, size in enumerate(sizes)
    ]


def progress(layer: str, total: int, completed: int) -> dict[str, Any]:
    line: dict[str, Any] = {"status": f"pulling {layer[7:19]}", "digest": layer, "total": total}
    if completed:
        line["completed"] = completed
    return line


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
    raw: bool = False
    load_only: bool = False  # an empty prompt only loads (or, keep_alive 0, unloads)
    include_usage: bool = False
    rid: str = ""
    created: int = 0

    @property
    def openai(self) -> bool:
        return self.kind.startswith("v1")

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
        )
    options = body.get("options")
    limit = options.get("num_predict") if isinstance(options, dict) else None
    return Job(
        kind,
        model,
        prompt,
        stream=body.get("stream") is not False,
        limit=limit if isinstance(limit, int) else None,
        keep_alive=keep_alive_seconds(body.get("keep_alive")),
        raw=body.get("raw") is True,
        load_only=not (prompt if kind == "generate" else body.get("messages")),
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


def embedding_list(
    model: str, vectors: list[list[float]], prompt_count: int, encoding: str
) -> dict[str, Any]:
    data: list[dict[str, Any]] = []
    for i, vec in enumerate(vectors):
        value: Any = vec
        if encoding.lower() == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "embedding": value, "index": i})
    usage = {"prompt_tokens": prompt_count, "total_tokens": prompt_count}
    return {"object": "list", "data": data, "model": model, "usage": usage}


def model_object(name: str, modified_ns: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": modified_ns // 1_000_000_000,
        "owned_by": namespace(name),
    }


def model_list(entries: list[tuple[str, int]]) -> dict[str, Any]:
    """/v1/models from (name, modified ns); Go leaves ``data`` null when there is none."""
    return {"object": "list", "data": [model_object(n, ns) for n, ns in entries] or None}


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


def final(job: Job, text: str, reason: str, stats: dict[str, int]) -> dict[str, Any]:
    """The whole answer when not streamed; with ``text=""`` the closing chunk of a stream."""
    now = rfc3339()
    if job.kind == "generate":
        body: dict[str, Any] = {"model": job.model, "created_at": now, "response": text}
        body.update(done=True, done_reason=reason)
        if not job.raw:
            count = stats.get("prompt_eval_count", 0) + stats.get("eval_count", 0)
            seed = int.from_bytes(hashlib.sha256(job.prompt.encode()).digest()[:2], "big")
            body["context"] = [(seed + 7 * i) % 128_000 for i in range(count)]
        return body | stats
    if job.kind == "chat":
        message = {"role": "assistant", "content": text}
        body = {"model": job.model, "created_at": now, "message": message}
        return body | {"done_reason": reason, "done": True} | stats
    usage = _usage(stats)
    return _openai_body(job, text, reason, None if job.stream else usage)


def closing(job: Job, reason: str, stats: dict[str, int]) -> bytes:
    """The bytes that end a streamed answer: final chunk, usage if asked, ``[DONE]``."""
    last = final(job, "", reason, stats)
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
