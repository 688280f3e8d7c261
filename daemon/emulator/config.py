"""The emulator's settings and counters: EmulatorConfig, Stats, model-name rules.

:class:`EmulatorConfig` is how the emulated node behaves (changeable while it runs,
through ``/_emulator/config``); :class:`Stats` is what it saw (``/_emulator/stats``).
Model names are validated and normalised here, since the config holds them. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

FaultKind = Literal["none", "refuse", "http500", "http503", "stall", "cut", "error_line"]
PromptCount = Literal["whole", "evaluated"]
# llama-server's --cache-ram default (8 GiB) over an 8B Llama's f16 KV cache per token
# (2 x 32 layers x 8 KV heads x 128 dims x 2 bytes = 128 KiB): 65,536 tokens.
CACHE_TOKENS_DEFAULT = 8 * 2**30 // (2 * 32 * 8 * 128 * 2)
GENERATING_ROUTES = (
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/messages",
    "/v1/responses",
    "/v1/audio/transcriptions",
)
FAULT_ROUTES = (*GENERATING_ROUTES, "/api/pull")

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-/:]*$")


class EmulatorConfig(BaseModel):
    """How the emulated node behaves. Every field can be changed while it runs."""

    model_config = ConfigDict(extra="forbid")

    name: str = "emulator"
    version: str = "0.12.0"
    models: list[str] = Field(default_factory=lambda: ["llama3.1:8b"])
    digests: dict[str, str] = Field(default_factory=dict, description="name → 64 hex digits")
    tokens: int = Field(8, ge=0, description="tokens per answer")
    token_delay: float = Field(
        0.0, ge=0, description="seconds between tokens: one slot's time to generate a token"
    )
    load_delay: float = Field(0.0, ge=0, description="cold load before an unloaded model answers")
    num_parallel: int = Field(
        0,
        ge=0,
        le=1024,
        description="slots per loaded model (OLLAMA_NUM_PARALLEL; embedding models get one), "
        "each with a KV cache of the last prompt it served; beyond them requests for a "
        "loaded model wait without bound; 0 = no slot model: no limit per model, no cache",
    )
    prompt_rate: float = Field(
        0.0, ge=0, description="prompt tokens a slot evaluates per second, 0 = instant"
    )
    prompt_count: PromptCount = Field(
        "whole",
        description="what prompt_eval_count counts: the whole prompt, cached tokens "
        "included (llama-server, Ollama since 0.30), or only the evaluated ones (older "
        "Ollama); prompt_eval_duration covers the evaluated ones either way",
    )
    cache_tokens: int = Field(
        CACHE_TOKENS_DEFAULT,
        ge=0,
        description="host-RAM prompt cache per loaded model, in tokens (llama-server's "
        "--cache-ram; the default is its 8 GiB for an 8B model): a slot's state is saved "
        "there when another prompt takes the slot, and restored for a prompt it serves "
        "better than any free slot; 0 = off",
    )
    restore_rate: float = Field(
        0.0,
        ge=0,
        description="tokens per second copied between a slot and the host cache (save or "
        "restore); 0 = ten times prompt_rate (instant when prompt_rate is 0)",
    )
    max_loaded: int = Field(
        3,
        ge=0,
        description="models in memory at once (OLLAMA_MAX_LOADED_MODELS: 3 per GPU by "
        "default); loading one more evicts the least recently used idle one; 0 = unlimited",
    )
    registry: str = Field(
        "",
        description="where a pull of a name without a host goes (http://host:port); "
        "empty: nowhere, the pull is simulated with pull_size and pull_speed",
    )
    pull_size: int = Field(1_000_000, ge=1, description="bytes a pull transfers")
    pull_speed: float = Field(0.0, ge=0, description="pull bytes per second, 0 = unlimited")
    concurrency: int = Field(
        0,
        ge=0,
        description="requests generating at once on the whole node, 0 = unlimited: a gate "
        "Ollama does not have (its limits are num_parallel and max_loaded), for tests",
    )
    queue: int = Field(
        512,
        ge=0,
        description="requests that may wait for a model to load (OLLAMA_MAX_QUEUE) or at "
        "the `concurrency` gate before a 503; requests for a loaded model wait for a slot "
        "without bound, as in Ollama",
    )
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
    """What the emulator saw; ``in_flight`` counts requests past the concurrency gate.

    ``cold_loads`` and ``evictions`` count models loaded and evicted for room (expiry is
    not eviction); ``prompt_tokens_evaluated`` and ``prompt_tokens_cached`` split the
    prompts of generations into tokens evaluated and tokens found in a slot's cache
    (restored ones included); ``cache_saved`` and ``cache_restored`` count the tokens
    copied to and from the host-RAM prompt cache;
    ``slots_in_use`` (a gauge) and ``max_slots_in_use`` count, per model, generations
    running on it (holding a slot, when num_parallel > 0).
    """

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
    cold_loads: int = 0
    evictions: int = 0
    prompt_tokens_evaluated: int = 0
    prompt_tokens_cached: int = 0
    cache_saved: int = 0
    cache_restored: int = 0
    slots_in_use: dict[str, int] = dataclasses.field(default_factory=dict)
    max_slots_in_use: dict[str, int] = dataclasses.field(default_factory=dict)

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
            slots_in_use=dict(self.slots_in_use),
            max_slots_in_use=dict(self.slots_in_use),
        )
        self.__dict__.update(fresh.__dict__)


# ---------------------------------------------------------------- model names


def valid_name(name: str) -> bool:
    return bool(_NAME_RE.match(name)) and not name.endswith((":", "/"))


def normalize(name: str) -> str:
    """``llama3`` → ``llama3:latest``; a name that has a tag keeps it."""
    name = name.strip()
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"
