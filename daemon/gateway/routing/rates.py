"""What routing learns per node and model from answers: load time, prompt rate, service time.

Fed from each answer's final chunk (Ollama's ``load_duration``, ``prompt_eval_count``,
``prompt_eval_duration``, ``eval_count``, ``eval_duration``) and olmd's own clock (how
long the request held its slot). Each figure is an exponentially weighted mean, so a node
that slows down is seen within a few requests. A node or model not measured yet borrows
the fleet's mean for the model, else the settings' default.

Two samples are taken only when they mean what they seem to: a load time only from a
request that olmd expected to load the model (a warm answer's ``load_duration`` is
milliseconds of bookkeeping), and a prompt rate only from tokens known to be evaluated.
``prompt_eval_duration`` covers only the tokens the node evaluated, but
``prompt_eval_count`` counts the whole prompt, cached tokens included, on Ollama since
0.30 (llama-server's ``cache_n + prompt_n``), and only the evaluated ones before.
Subtracting olmd's estimate of what was cached from every count would be wrong both ways:
twice subtracted on an older node, and on a current one off by what olmd cannot see (the
reply the node cached with the conversation, what its host-RAM cache restored). So:

- which reading a node uses is learned from requests that olmd expects mostly cached,
  where the two readings differ at least twofold (votes, against the node's ratio of
  counted tokens to olmd's estimates, taken from uncached prompts);
- on a node found counting only evaluated tokens, every count is the evaluated part;
- on a node counting the whole prompt (or not known yet), a prompt is learned from only
  if olmd has not seen its conversation before: a later turn may be cached there without
  olmd knowing (its host cache restores conversations olmd's prefix index forgot). Its
  evaluated part is the count times the share olmd expects uncached (all of it, when
  nothing is: then both readings agree). As a cache hit olmd did not expect can only make
  a sample look faster, a sample under half the learned figure is set aside, unless
  several come in a row (the node did get faster).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

ALPHA = 0.3  # weight of the newest sample
MIN_PROMPT_TOKENS = 16  # fewer says more about overheads than about the rate
READING_VOTES = 2  # net votes that settle how a node counts prompt_eval_count
MAX_VOTES = 8  # so that a node whose Ollama is upgraded is read again soon
TOO_FAST = 0.5  # a prompt-rate sample under this share of the mean may hide cached tokens
FAST_IN_A_ROW = 3  # ... unless this many come in a row
MAX_CONVERSATIONS = 4096  # conversation starts remembered, to tell first turns from later ones
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
    tokens_ratio: Mean  # prompt_eval_count over olmd's estimate, of uncached prompts
    reading: int = 0  # votes: > 0 counts the whole prompt, < 0 only the evaluated tokens
    fast: int = 0  # prompt-rate samples in a row set aside as too fast

    @classmethod
    def empty(cls) -> Learned:
        return cls(Mean(), Mean(), Mean(), Mean(), Mean())

    @property
    def counts_evaluated(self) -> bool:
        """Whether the node's prompt_eval_count is known to count only evaluated tokens."""
        return self.reading <= -READING_VOTES

    @property
    def prompt_count(self) -> str | None:
        """What the node's prompt_eval_count counts: "whole", "evaluated", or not known."""
        if self.counts_evaluated:
            return "evaluated"
        return "whole" if self.reading >= READING_VOTES else None


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
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()  # (model, start)

    def learn(
        self,
        node: str,
        model: str,
        sample: Sample,
        *,
        expected_cold: bool,
        cached: int,
        prompt_tokens: int = 0,
        conversation: int | None = None,
    ) -> None:
        """One finished request. ``cached`` and ``prompt_tokens`` are olmd's estimates of
        the prompt tokens the node had cached and of the whole prompt (0: not known);
        ``conversation`` is the hash of the prompt's conversation start (None: unknown)."""
        entry = self._table.get((node, model))
        if entry is None:
            entry = self._table[(node, model)] = Learned.empty()
            self._by_model.setdefault(model, {})[node] = entry
        if expected_cold and sample.load_ns > 0:
            entry.load_seconds.add(sample.load_ns / 1e9)
        first = self._first_turn(model, conversation)
        if sample.prompt_count > 0 and sample.prompt_ns > 0:
            _learn_prompt(entry, sample, cached, prompt_tokens, first)
        if sample.eval_count > 0 and sample.eval_ns > 0:
            entry.seconds_per_token.add(sample.eval_ns / 1e9 / sample.eval_count)
        if sample.held_seconds > 0:
            entry.service_seconds.add(sample.held_seconds)
        self._stale.add(model)

    def _first_turn(self, model: str, conversation: int | None) -> bool:
        """Whether no prompt of this conversation was seen before (unknown: as today)."""
        if conversation is None:
            return True
        key = (model, conversation)
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        if len(self._seen) > MAX_CONVERSATIONS:
            self._seen.popitem(last=False)
        return True

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

    def describe(self, node: str) -> dict[str, dict[str, float | int | str | None]]:
        """What was learned about ``node``, per model, for ``/admin/nodes``."""
        out: dict[str, dict[str, float | int | str | None]] = {}
        for (name, model), e in sorted(self._table.items()):
            if name != node:
                continue
            out[model] = {
                "load_seconds": _shown(e.load_seconds, 3),
                "prompt_tokens_per_second": _rate(e.seconds_per_prompt_token),
                "tokens_per_second": _rate(e.seconds_per_token),
                "service_seconds": _shown(e.service_seconds, 3),
                "samples": e.service_seconds.samples,
                "prompt_count": e.prompt_count,
            }
        return out


def _learn_prompt(entry: Learned, sample: Sample, cached: int, total: int, first: bool) -> None:
    count = sample.prompt_count
    if not cached and total >= MIN_PROMPT_TOKENS:
        entry.tokens_ratio.add(count / total)
    if cached:
        _vote(entry, count, cached, total)
    if entry.counts_evaluated:
        evaluated = float(count)
    elif not first:
        return  # may be cached on the node, olmd not knowing, and counted whole
    elif not cached:
        evaluated = float(count)
    elif total > cached:
        evaluated = count * (total - cached) / total  # a shared prefix, not a reply
    else:
        return
    if evaluated < MIN_PROMPT_TOKENS:
        return
    seconds = sample.prompt_ns / 1e9 / evaluated
    mean = entry.seconds_per_prompt_token
    guarded = not entry.counts_evaluated and mean.samples >= FAST_IN_A_ROW
    if guarded and seconds < TOO_FAST * mean.value:
        entry.fast += 1
        if entry.fast < FAST_IN_A_ROW:
            return  # probably a cache hit olmd did not expect, counted whole
    entry.fast = 0
    mean.add(seconds)


def _vote(entry: Learned, count: int, cached: int, total: int) -> None:
    """Whether ``count`` reads as the whole prompt or as its uncached part, when olmd
    expects at least half of it cached (closer readings are not told apart)."""
    if total <= 0 or 2 * min(cached, total) < total:
        return
    ratio = entry.tokens_ratio.value if entry.tokens_ratio.samples else 1.0
    whole, evaluated = ratio * total, ratio * max(total - cached, 1)
    vote = 1 if count * count > whole * evaluated else -1  # the nearer, on a log scale
    entry.reading = max(-MAX_VOTES, min(MAX_VOTES, entry.reading + vote))


def _shown(mean: Mean, digits: int) -> float | None:
    return round(mean.value, digits) if mean.samples else None


def _rate(mean: Mean) -> float | None:
    return round(1 / mean.value, 1) if mean.samples and mean.value > 0 else None
