"""The tenants benchmark's workload and its client: people chatting, then a batch flood.

Two tenants share the fleet. The interactive one is a few people, each holding multi-turn
conversations (a short system prompt shared by the chat app, short questions, every
streamed reply appended to the history, a fixed think time between turns, a new
conversation after a fixed number of turns). The batch one is a pool of workers, each
sending summary requests of a long document (~2,000 tokens, different every time) back
to back, non-streaming, as a corpus job does. The people chat alone first; then the
workers start, and the people keep chatting under the flood. The same seed gives every
peer the same texts. Bounds: a timeout per request, a count per loop, and a deadline for
the whole load.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp
from fleet_load import HEADERS, Turn, chat, words

# Loop bounds beyond the deadline: a peer that fails fast cannot spin.
MAX_REQUESTS_PER_WORKER = 2000
ERROR_PAUSE = 0.5  # seconds a batch worker waits after a failed request


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What both tenants do; the same for every peer of a run."""

    model: str
    people: int
    turns: int  # per conversation; then the person starts a new one
    think: float  # seconds between two turns of a person
    system_tokens: int  # the chat app's system prompt, the same for everyone
    message_tokens: int  # each question
    workers: int
    batch_tokens: int  # each document, within +-10%
    alone: float  # seconds of chat before the flood
    flood: float  # seconds of chat under the flood: the peer's deadline for new turns
    warm_up: float  # first seconds of the flood left out of the batch throughput
    seed: int

    def __post_init__(self) -> None:
        if not 1 <= self.people <= 64 or not 1 <= self.workers <= 256:
            raise ValueError("people must be within 1..64 and workers within 1..256")
        if not 1 <= self.turns <= 50 or not 0 <= self.think <= 60:
            raise ValueError("turns must be within 1..50 and think within 0..60 s")
        if not 0 < self.alone <= 300 or not 0 < self.flood <= 600:
            raise ValueError("alone must be within 0..300 s and flood within 0..600 s")
        if not 0 <= self.warm_up < self.flood:
            raise ValueError("warm_up must be shorter than the flood")

    @property
    def max_turns(self) -> int:
        """A person's turns can't outnumber this, whatever the peer answers."""
        return int((self.alone + self.flood) / max(self.think, 0.05)) + 1

    def system(self) -> str:
        rng = random.Random(f"{self.seed}:system")
        return "You are the help desk of a small company. " + words(rng, self.system_tokens)

    def questions(self, person: int, conversation: int) -> list[str]:
        rng = random.Random(f"{self.seed}:chat:{person}:{conversation}")
        return [words(rng, self.message_tokens) + "?" for _ in range(self.turns)]

    def document(self, worker: int, index: int) -> str:
        rng = random.Random(f"{self.seed}:batch:{worker}:{index}")
        tokens = round(self.batch_tokens * rng.uniform(0.9, 1.1))
        return "Summarise this document in three sentences.\n\n" + words(rng, tokens)


@dataclass
class BatchRequest:
    """One batch request as the client saw it."""

    worker: int
    index: int
    sent_s: float  # seconds after the load began
    done_s: float
    ok: bool
    node: str | None = None  # X-Olmd-Node, or nginx's upstream address
    prompt_chars: int = 0
    error: str | None = None


@dataclass
class Load:
    """What one peer's load produced."""

    chats: list[Turn] = field(default_factory=list)  # user = person, turn = its number
    batch: list[BatchRequest] = field(default_factory=list)
    cut: int = 0  # chat turns still running when the hard deadline came


async def summarise(
    session: aiohttp.ClientSession, url: str, model: str, document: str
) -> tuple[bool, str | None, str | None]:
    """One non-streaming /api/generate: (ok, node, error)."""
    body = json.dumps({"model": model, "prompt": document, "stream": False})
    try:
        async with session.post(url + "/api/generate", data=body, headers=HEADERS) as answer:
            node = answer.headers.get("X-Olmd-Node") or answer.headers.get("X-Upstream-Addr")
            raw = await answer.read()
            if answer.status != 200:
                return False, node, f"HTTP {answer.status}: {raw[:120].decode(errors='replace')}"
            if not json.loads(raw).get("done"):
                return False, node, "answer without done"
            return True, node, None
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return False, None, f"{type(exc).__name__}: {exc}"[:160]


def _session(limit: int, timeout: float, headers: Mapping[str, str]) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=5),
        headers=headers,
    )


async def run_load(
    w: Workload,
    url: str,
    *,
    chat_headers: Mapping[str, str],
    batch_headers: Mapping[str, str],
    request_timeout: float,
) -> Load:
    """The people alone for ``w.alone`` s, then with the workers for ``w.flood`` s.

    People send no turn after ``alone + flood``; the turns they are in then finish under
    the flood (bounded by ``request_timeout``), then the workers are cancelled. A failed
    chat turn keeps its conversation going with whatever reply arrived.
    """
    load = Load()
    loop = asyncio.get_running_loop()
    begin = loop.time()
    end = w.alone + w.flood
    system = w.system()
    in_turn = [False] * w.people

    def now() -> float:
        return loop.time() - begin

    async def person(session: aiohttp.ClientSession, p: int) -> None:
        await asyncio.sleep(p * w.think / w.people)  # people don't start in the same instant
        sent = 0
        for conversation in range(w.max_turns):
            history = [{"role": "system", "content": system}]
            for i, question in enumerate(w.questions(p, conversation)):
                if now() >= end or sent >= w.max_turns:
                    return
                history.append({"role": "user", "content": question})
                at = now()
                in_turn[p] = True
                turn, reply = await chat(session, url, w.model, history)
                in_turn[p] = False
                turn.user, turn.turn, turn.sent_s = p, i, at
                load.chats.append(turn)
                history.append({"role": "assistant", "content": reply})
                sent += 1
                await asyncio.sleep(w.think)

    async def worker(session: aiohttp.ClientSession, k: int) -> None:
        for index in range(MAX_REQUESTS_PER_WORKER):
            document = w.document(k, index)
            at = now()
            ok, node, error = await summarise(session, url, w.model, document)
            done = BatchRequest(k, index, at, now(), ok, node, len(document), error)
            load.batch.append(done)
            if not ok:
                await asyncio.sleep(ERROR_PAUSE)

    chat_session = _session(2 * w.people, request_timeout, chat_headers)
    batch_session = _session(2 * w.workers, request_timeout, batch_headers)
    async with chat_session, batch_session:
        people = [asyncio.ensure_future(person(chat_session, p)) for p in range(w.people)]
        workers: list[asyncio.Future[None]] = []
        try:
            await asyncio.sleep(w.alone)
            workers = [asyncio.ensure_future(worker(batch_session, k)) for k in range(w.workers)]
            async with asyncio.timeout(w.flood + request_timeout + 2):
                await asyncio.gather(*people)
        except TimeoutError:
            load.cut = sum(in_turn)  # turns the hard deadline cut off
        finally:
            for task in people + workers:
                task.cancel()
            await asyncio.gather(*people, *workers, return_exceptions=True)
    return load
