"""Ollama's performance model, without the waiting: resident models, their slots, KV caches.

:class:`SlotTable` answers one question, synchronously: may this request run now? A
request for a resident model gets a :class:`Lease` (with ``num_parallel`` > 0, on a free
slot chosen as llama-server chooses, its state swapped with the host-RAM prompt cache
when that pays: see ``daemon.emulator.hostcache``); for an absent model a :class:`Load`
(its caller does the cold load, after the least recently used idle model was evicted if
``max_loaded`` was reached, then calls :meth:`SlotTable.loaded`); otherwise a
:class:`Wait` saying why. Embedding models get one slot whatever ``num_parallel`` says,
as Ollama loads them. A finished request sets the model's expiry to now + keep_alive;
an expired idle model is unloaded at the next look, and its caches with it. Queueing,
sleeping and counting are ``daemon.emulator.state``'s. Pure: no I/O; the wall clock
(nanoseconds) is injected.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Literal

from daemon.emulator.hostcache import HostCache, choose_slot
from daemon.emulator.tokens import common_prefix

WaitReason = Literal["loading", "room", "slot"]
DEFAULT_CONTEXT = 4096  # a runner's num_ctx when the request names none


@dataclasses.dataclass(eq=False, slots=True)
class Slot:
    """One of a model's parallel sequences; ``tokens`` is what its KV cache holds."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    busy: bool = False
    used: int = 0  # the table's tick at its last use: lower is less recently used


@dataclasses.dataclass(eq=False, slots=True)
class Resident:
    """A model in memory. ``slots`` is empty when ``num_parallel`` is 0 (no slot limit);
    ``cache`` is its host-RAM prompt cache (None: off)."""

    name: str
    slots: list[Slot]
    cache: HostCache | None = None
    running: int = 0  # requests using it now, generation and embedding
    expires_ns: int = 0  # ns since the epoch; only counts once nothing runs
    used: int = 0
    context: int = DEFAULT_CONTEXT  # num_ctx its runner was loaded with (/api/ps)


@dataclasses.dataclass(eq=False, frozen=True, slots=True)
class Lease:
    """A request's hold on a resident model (and on one of its slots, if it has one)."""

    model: Resident
    slot: Slot | None
    cached: int  # prompt tokens found in the slot's cache (after a restore)
    evaluated: int  # prompt tokens left to evaluate, at least 1 (0 without a prompt)
    saved: int = 0  # tokens of the slot's old state copied to the host cache
    restored: int = 0  # tokens of a saved state copied back into the slot

    @property
    def generating(self) -> bool:
        """Taken with a prompt: a generation, not an embedding or a bare load."""
        return self.evaluated > 0


@dataclasses.dataclass(frozen=True, slots=True)
class Load:
    """Go ahead and load ``name``; ``evicted`` names the models unloaded to make room."""

    name: str
    evicted: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Wait:
    """Not now: the model is ``loading``, there is no ``room`` to load it, or no free ``slot``."""

    reason: WaitReason


class SlotTable:
    """Resident models, models being loaded and every slot's cache."""

    def __init__(
        self,
        *,
        num_parallel: int = 0,
        max_loaded: int = 0,
        cache_tokens: int = 0,
        single: Callable[[str], bool] = lambda name: False,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.num_parallel = num_parallel
        self.max_loaded = max_loaded
        self.cache_tokens = cache_tokens
        self._single = single  # models loaded with one slot (Ollama's embedding models)
        self._clock = clock
        self._models: dict[str, Resident] = {}
        self._loading: set[str] = set()
        self._tick = 0

    def configure(self, *, num_parallel: int, max_loaded: int, cache_tokens: int = 0) -> None:
        """New limits. Resident models get or lose free slots now, busy ones when released;
        a lower ``max_loaded`` evicts only as models are loaded; host caches are resized
        now (0 drops them)."""
        self.max_loaded = max_loaded
        self.cache_tokens = cache_tokens
        changed, self.num_parallel = num_parallel != self.num_parallel, num_parallel
        for model in self._models.values():
            model.cache = self._resize(model.cache)
            if not changed:
                continue
            want = self.parallel(model.name)
            busy = [s for s in model.slots if s.busy]
            free = sorted((s for s in model.slots if not s.busy), key=lambda s: -s.used)
            keep = busy + free[: max(want - len(busy), 0)] if want else []
            model.slots = keep + [Slot() for _ in range(want - len(keep))]

    def parallel(self, name: str) -> int:
        """Slots ``name`` gets when loaded: ``num_parallel``, but one for embedding models."""
        return min(self.num_parallel, 1) if self._single(name) else self.num_parallel

    def _resize(self, cache: HostCache | None) -> HostCache | None:
        if not self.cache_tokens or not self.num_parallel:
            return None
        if cache is None:
            return HostCache(self.cache_tokens)
        cache.limit = self.cache_tokens
        cache.trim()
        return cache

    # ------------------------------------------------------------ looking

    def expire(self) -> list[str]:
        """Unload the idle models whose keep-alive has run out; their names."""
        now = self._clock()
        gone = [m.name for m in self._models.values() if not m.running and m.expires_ns <= now]
        for name in gone:
            del self._models[name]
        return gone

    def expiries(self) -> dict[str, int]:
        """name → expiry (ns since the epoch) of every resident model, after expiring."""
        self.expire()
        return {name: model.expires_ns for name, model in self._models.items()}

    def resident(self, name: str) -> Resident | None:
        self.expire()
        return self._models.get(name)

    def is_loading(self, name: str) -> bool:
        return name in self._loading

    # ------------------------------------------------------------ taking and giving back

    def take(
        self, name: str, prompt: Sequence[int] | None, context: int = DEFAULT_CONTEXT
    ) -> Lease | Load | Wait:
        """Try to start a request for ``name``; ``prompt`` None asks for no slot (a bare
        load), an empty prompt for a slot with nothing to cache (an embedding).

        The slot is llama-server's choice (:func:`~daemon.emulator.hostcache.choose_slot`);
        when its state is swapped with the host cache, the lease says how many tokens
        were saved and restored. The prefix the slot then shares with the prompt is
        cached, and at least one prompt token is evaluated."""
        self.expire()
        model = self._models.get(name)
        if model is not None and model.context != context:
            # Another num_ctx: Ollama reloads the runner once the requests on it are done.
            if model.running:
                return Wait("room")
            del self._models[name]
            model = None
        if model is not None:
            return self._lease(model, prompt) or Wait("slot")
        if name in self._loading:
            return Wait("loading")
        evicted: list[str] = []
        while self.max_loaded and len(self._models) + len(self._loading) >= self.max_loaded:
            idle = [m for m in self._models.values() if not m.running]
            if not idle:
                return Wait("room")
            victim = min(idle, key=lambda m: m.used)
            del self._models[victim.name]
            evicted.append(victim.name)
        self._loading.add(name)
        return Load(name, tuple(evicted))

    def loaded(
        self,
        name: str,
        prompt: Sequence[int] | None,
        keep_alive_ns: int = 0,
        context: int = DEFAULT_CONTEXT,
    ) -> Lease:
        """The load a :class:`Load` began is done; its request takes the first lease. The
        expiry shown until a request finishes is now + ``keep_alive_ns``, as Ollama's."""
        self._loading.discard(name)
        slots = [Slot() for _ in range(self.parallel(name))]
        model = Resident(
            name,
            slots,
            self._resize(None),
            expires_ns=self._clock() + keep_alive_ns,
            context=context,
        )
        self._models[name] = model
        lease = self._lease(model, prompt)
        if lease is None:  # unreachable: a fresh model has every slot free
            raise RuntimeError(f"no free slot on freshly loaded {name}")
        return lease

    def abort_load(self, name: str) -> None:
        """The loading request left before the load finished: the next one may load."""
        self._loading.discard(name)

    def finish(
        self, lease: Lease, holds: Sequence[int] | None = None, keep_alive_ns: int | None = None
    ) -> None:
        """The request is over: its slot now holds ``holds`` (None: what it held before)
        and the model expires at now + ``keep_alive_ns`` (None: when it would have)."""
        model = lease.model
        model.running -= 1
        model.used = self._next()
        if keep_alive_ns is not None:
            model.expires_ns = self._clock() + keep_alive_ns
        slot = lease.slot
        if slot is not None:
            if holds is not None:
                slot.tokens = list(holds)
            slot.busy, slot.used = False, model.used
            if len(model.slots) > self.parallel(model.name) and slot in model.slots:
                model.slots.remove(slot)  # num_parallel was lowered while it ran

    def unload(self, name: str) -> bool:
        """Drop ``name`` and its caches now; running requests finish on the old copy."""
        return self._models.pop(name, None) is not None

    def clear(self) -> None:
        self._models.clear()
        self._loading.clear()

    def _lease(self, model: Resident, prompt: Sequence[int] | None) -> Lease | None:
        slot, cached, saved, restored = None, 0, 0, 0
        if prompt is not None and model.slots:
            free = [s for s in model.slots if not s.busy]
            if not free:
                return None
            slot, swap = choose_slot(free, prompt)
            if swap and model.cache is not None:
                saved, restored = model.cache.swap(slot, prompt)
            # at least one token is evaluated, even when the whole prompt is cached
            cached = min(common_prefix(slot.tokens, prompt), max(len(prompt) - 1, 0))
            slot.busy = True
        model.running += 1
        model.used = self._next()
        if slot is not None:
            slot.used = model.used
        evaluated = max(1, len(prompt) - cached) if prompt else 0
        return Lease(model, slot, cached, evaluated, saved, restored)

    def _next(self) -> int:
        self._tick += 1
        return self._tick
