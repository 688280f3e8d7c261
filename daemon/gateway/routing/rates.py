"""What routing learns per node and model from answers: load time, prompt rate, service time.

Fed from each answer's final chunk (Ollama's ``load_duration``, ``prompt_eval_count``,
``prompt_eval_duration``, ``eval_count``, ``eval_duration``) and olmd's own clock (how
long the request held its slot). Each figure is an exponentially weighted mean, so a node
that slows down is seen within a few requests. A node or model not measured yet borrows
the fleet's mean for the model, else the settings' default.

Two samples are taken only when they mean what they seem to: a load time only from a
request that olmd expected to load the model (a warm answer's ``load_duration`` is
milliseconds of bookkeeping), and a prompt rate only from a request with nothing expected
in the node's cache (Ollama versions differ on whether ``prompt_eval_count`` counts cached
tokens; with nothing cached the two readings agree).
"""

from __future__ import annotations

from dataclasses import dataclass

ALPHA = 0.3  # weight of the newest sample
MIN_PROMPT_TOKENS = 16  # fewer says more about overheads than about the rate
FIGURES = ("load_seconds", "seconds_per_prompt_token", "seconds_per_token", "service_seconds")


@dataclass(slots=True)
class Mean:
    value: float = 0.0
    samples: int = 0

    def add(self, x: float) -> None:
        self.value = x if not self.samples else self.value + ALPHA * (x - self.value)
        self.samples += 1


@dataclass(slots=True)
class Learned:
    load_seconds: Mean
    seconds_per_prompt_token: Mean
    seconds_per_token: Mean  # generation
    service_seconds: Mean

    @classmethod
    def empty(cls) -> Learned:
        return cls(Mean(), Mean(), Mean(), Mean())


@dataclass(frozen=True, slots=True)
class Sample:
    """One finished request: what the final chunk said (nanoseconds) and olmd's clock."""

    load_ns: int = 0
    prompt_count: int = 0
    prompt_ns: int = 0
    eval_count: int = 0
    eval_ns: int = 0
    held_seconds: float = 0.0  # from dispatch to the last byte
    total_ns: int = 0  # the answer's total_duration: the node's time on it


@dataclass(frozen=True, slots=True)
class Defaults:
    load_seconds: float
    seconds_per_prompt_token: float
    service_seconds: float


class Rates:
    def __init__(self, defaults: Defaults) -> None:
        self.defaults = defaults
        self._table: dict[tuple[str, str], Learned] = {}
        self._by_model: dict[str, dict[str, Learned]] = {}
        self._fleet: dict[tuple[str, str], float] = {}  # (model, figure) → fleet mean
        self._stale: set[str] = set()  # models whose fleet means need computing again

    def learn(
        self, node: str, model: str, sample: Sample, *, expected_cold: bool, cached: int
    ) -> None:
        entry = self._table.get((node, model))
        if entry is None:
            entry = self._table[(node, model)] = Learned.empty()
            self._by_model.setdefault(model, {})[node] = entry
        if expected_cold and sample.load_ns > 0:
            entry.load_seconds.add(sample.load_ns / 1e9)
        if not cached and sample.prompt_count >= MIN_PROMPT_TOKENS and sample.prompt_ns > 0:
            entry.seconds_per_prompt_token.add(sample.prompt_ns / 1e9 / sample.prompt_count)
        if sample.eval_count > 0 and sample.eval_ns > 0:
            entry.seconds_per_token.add(sample.eval_ns / 1e9 / sample.eval_count)
        if sample.held_seconds > 0:
            entry.service_seconds.add(sample.held_seconds)
        self._stale.add(model)

    def forget(self, node: str) -> None:
        for key in [k for k in self._table if k[0] == node]:
            del self._table[key]
            del self._by_model[key[1]][node]
            self._stale.add(key[1])

    def _refresh(self, model: str) -> None:
        # The fleet's means per model, computed again (O(nodes)) at the first lookup after
        # a change: learning costs O(1) per request, a lookup O(1) per candidate.
        self._stale.discard(model)
        entries = self._by_model.get(model, {}).values()
        for figure in FIGURES:
            values = [m.value for e in entries if (m := getattr(e, figure)).samples]
            if values:
                self._fleet[(model, figure)] = sum(values) / len(values)
            else:
                self._fleet.pop((model, figure), None)

    def _figure(self, node: str, model: str, field: str, default: float) -> float:
        if model in self._stale:
            self._refresh(model)
        entry = self._table.get((node, model))
        if entry is not None:
            mean: Mean = getattr(entry, field)
            if mean.samples:
                return mean.value
        return self._fleet.get((model, field), default)

    def load_seconds(self, node: str, model: str) -> float:
        return self._figure(node, model, "load_seconds", self.defaults.load_seconds)

    def seconds_per_prompt_token(self, node: str, model: str) -> float:
        return self._figure(
            node, model, "seconds_per_prompt_token", self.defaults.seconds_per_prompt_token
        )

    def service_seconds(self, node: str, model: str) -> float:
        return self._figure(node, model, "service_seconds", self.defaults.service_seconds)

    def describe(self, node: str) -> dict[str, dict[str, float | int | None]]:
        """What was learned about ``node``, per model, for ``/admin/nodes``."""
        out: dict[str, dict[str, float | int | None]] = {}
        for (name, model), e in sorted(self._table.items()):
            if name != node:
                continue
            out[model] = {
                "load_seconds": _shown(e.load_seconds, 3),
                "prompt_tokens_per_second": _rate(e.seconds_per_prompt_token),
                "tokens_per_second": _rate(e.seconds_per_token),
                "service_seconds": _shown(e.service_seconds, 3),
                "samples": e.service_seconds.samples,
            }
        return out


def _shown(mean: Mean, digits: int) -> float | None:
    return round(mean.value, digits) if mean.samples else None


def _rate(mean: Mean) -> float | None:
    return round(1 / mean.value, 1) if mean.samples and mean.value > 0 else None
