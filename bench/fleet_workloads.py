"""The routing benchmark's workloads and the targets each is held to.

``spread`` is the original one: more slots than users need. The others are where routing
is hard: ``one-model`` and ``contention`` (four slots, a 3 s load, one resident model per
node, one user in four on a second model in ``contention``), and Ollama's defaults (one
slot, three resident models) without and with llama-server's host-RAM prompt cache, where
queueing dominates and a pinned client is a poor reference, so the targets are against
nginx round-robin alone.
"""

from __future__ import annotations

from dataclasses import dataclass

A, B = "llama3.1:8b", "qwen3:8b"


@dataclass(frozen=True, slots=True)
class Targets:
    """Adaptive's targets, as ratios to peers measured in the same run (None: not held)."""

    followup_vs_round_robin: float
    followup_vs_oracle: float | None = None
    first_vs_oracle: float | None = None
    cold_loads: bool = False  # at most the oracle's plus the number of nodes


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    title: str
    users: int
    parallel: int | None  # None: as many as the oracle needs to keep every conversation
    load_delay: float
    second_share: float
    max_loaded: int
    cache_tokens: int | None  # None: the emulator's default (llama-server's 8 GiB)
    placement: tuple[str, str, str]  # the model each node is warmed on
    peers: tuple[str, ...]
    targets: Targets
    # olmd's affinity_entries_per_slot: the conversations a node remembers per slot. One
    # where the slots alone count; more where llama-server's host-RAM cache keeps others.
    entries_per_slot: int = 1


_PINNED = Targets(1 / 3, 1.25, 1.5, cold_loads=True)

PRESETS = {
    p.name: p
    for p in (
        Preset(
            "spread", "more slots than users need (24 users, 2 s loads)", 24, None, 2.0, 0.25,
            1, None, (A, A, B), ("nginx", "weighted", "adaptive", "oracle"),
            Targets(1 / 3, 1.25, cold_loads=True),
        ),
        Preset(
            "one-model", "one model, 4 slots, 3 s loads, 12 users", 12, 4, 3.0, 0.0, 1, None,
            (A, A, A), ("nginx", "adaptive", "oracle"), _PINNED,
        ),
        Preset(
            "contention", "two models competing for one resident slot per node, 4 slots, "
            "3 s loads, 12 users (1 in 4 on the second)", 12, 4, 3.0, 0.25, 1, None,
            (A, A, B), ("nginx", "adaptive", "oracle"), _PINNED,
        ),
        Preset(
            "ollama-defaults", "Ollama's defaults: 1 slot, 3 resident models, no host-RAM "
            "prompt cache, 12 users", 12, 1, 3.0, 0.25, 3, 0, (A, A, B),
            ("nginx", "adaptive", "oracle"), Targets(0.6),
        ),
        Preset(
            "ollama-defaults-cache", "Ollama's defaults with llama-server's host-RAM prompt "
            "cache (8 GiB)", 12, 1, 3.0, 0.25, 3, None, (A, A, B),
            ("nginx", "adaptive", "oracle"), Targets(0.4), entries_per_slot=16,
        ),
    )
}  # fmt: skip
