"""The routing benchmark's workload and its client: seeded multi-turn chats, streamed.

Every user holds one conversation: the system prompt its model's users share, a long
first message of its own (a pasted document), then short follow-ups, each after a short
think time. The streamed reply is appended to the history as an assistant message, as
chat front ends do, so a node that served the previous turn has all but the new question
in a slot's cache. The same seed gives every peer the same users, texts and pauses.
Bounds: a timeout per request and a deadline for the whole run.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

CHARS_PER_TOKEN = 4  # the emulator's tokenizer: one token per 4 characters of a message
HEADERS = {"Content-Type": "application/json"}
_SYLLABLES = ("ka", "lo", "mi", "ne", "ra", "tu", "se", "vo", "pi", "da", "ge", "zu", "fo", "ha")


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What the users do; the same for every peer of a run."""

    users: int
    turns: int  # the first message plus turns - 1 follow-ups
    models: tuple[str, str]  # (the model most users talk to, the second one)
    second_share: float  # of the users, on the second model
    system_tokens: int
    first_tokens: int
    followup_tokens: int
    think: tuple[float, float]  # seconds before a follow-up: uniform in [low, high]
    stagger: float  # users start uniformly within this many seconds
    seed: int

    def __post_init__(self) -> None:
        if not 1 <= self.users <= 256 or not 1 <= self.turns <= 50:
            raise ValueError("users must be within 1..256 and turns within 1..50")
        if not 0 <= self.second_share <= 1 or not 0 <= self.think[0] <= self.think[1] <= 60:
            raise ValueError("second_share must be within 0..1, think within 0..60 s")


@dataclass(frozen=True)
class User:
    index: int
    model: str
    start: float  # seconds after the run begins
    system: str
    messages: tuple[str, ...]  # one per turn: the document first, then the follow-ups
    pauses: tuple[float, ...]  # think time before each follow-up


@dataclass
class Turn:
    """One request as the client saw it."""

    user: int
    turn: int
    model: str
    sent_s: float  # seconds after the run began
    ttft_ms: float | None  # to the first NDJSON line with content
    total_ms: float
    ok: bool
    node: str | None = None  # who answered: X-Olmd-Node, nginx's upstream, or the oracle's
    route: str | None = None  # X-Olmd-Route
    prompt_chars: int = 0
    error: str | None = None


def words(rng: random.Random, tokens: int) -> str:
    """About ``tokens`` tokens of made-up words."""
    out: list[str] = []
    size, limit = 0, tokens * CHARS_PER_TOKEN
    while size < limit:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


def build_users(w: Workload) -> list[User]:
    """The users, in a fixed order; every 1/second_share-th one is on the second model."""
    rng = random.Random(w.seed)
    systems = {
        m: f"You are a careful assistant for {m}. " + words(rng, w.system_tokens) for m in w.models
    }
    users = []
    for i in range(w.users):
        second = int((i + 1) * w.second_share) > int(i * w.second_share)
        model = w.models[1] if second else w.models[0]
        document = "Please read this document, then answer my questions.\n\n"
        document += words(rng, w.first_tokens)
        follow = [words(rng, w.followup_tokens) + "?" for _ in range(w.turns - 1)]
        pauses = tuple(rng.uniform(*w.think) for _ in follow)
        start = rng.uniform(0, w.stagger)
        users.append(User(i, model, start, systems[model], (document, *follow), pauses))
    return users


def oracle_homes(users: list[User], placement: Sequence[str]) -> dict[int, int]:
    """user → index of a node warmed on its model (``placement``), a model's users
    spread evenly over its nodes: the oracle's pinning."""
    home: dict[int, int] = {}
    seen: dict[str, int] = {}
    for user in users:
        holders = [i for i, m in enumerate(placement) if m == user.model]
        home[user.index] = holders[seen.get(user.model, 0) % len(holders)]
        seen[user.model] = seen.get(user.model, 0) + 1
    return home


async def chat(
    session: aiohttp.ClientSession, url: str, model: str, messages: list[dict[str, str]]
) -> tuple[Turn, str]:
    """One streamed /api/chat; the Turn (user and turn left 0) and the reply's text."""
    body = json.dumps({"model": model, "messages": messages, "stream": True})
    turn = Turn(0, 0, model, 0.0, None, 0.0, False, prompt_chars=len(body))
    parts: list[str] = []
    sent = time.perf_counter()
    try:
        async with session.post(url + "/api/chat", data=body, headers=HEADERS) as answer:
            turn.node = answer.headers.get("X-Olmd-Node") or answer.headers.get("X-Upstream-Addr")
            turn.route = answer.headers.get("X-Olmd-Route")
            if answer.status != 200:
                turn.error = f"HTTP {answer.status}: {(await answer.text())[:120]}"
            else:
                async for line in answer.content:
                    if not line.strip():
                        continue
                    data: dict[str, Any] = json.loads(line)
                    if "error" in data:
                        turn.error = f"stream error: {str(data['error'])[:120]}"
                        break
                    piece = (data.get("message") or {}).get("content") or ""
                    if piece and turn.ttft_ms is None:
                        turn.ttft_ms = (time.perf_counter() - sent) * 1000
                    parts.append(piece)
                    if data.get("done"):
                        turn.ok = True
                        break
                else:
                    turn.error = "stream ended without done"
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        turn.error = f"{type(exc).__name__}: {exc}"[:160]
    turn.total_ms = (time.perf_counter() - sent) * 1000
    return turn, "".join(parts)


async def run_users(
    users: list[User],
    url_for: Callable[[User], str],
    node_for: Callable[[User, str | None], str | None],
    *,
    request_timeout: float,
    deadline: float,
) -> tuple[list[Turn], float, int]:
    """Every user's conversation, concurrently, until done or ``deadline`` seconds.

    Returns the turns, the wall time (first request sent to last answer read) and how
    many turns never ran because the deadline came first. A failed turn keeps the
    conversation going, with whatever reply arrived, so a failing peer still sees the
    whole load.
    """
    turns: list[Turn] = []
    timeout = aiohttp.ClientTimeout(total=request_timeout, sock_connect=5)
    connector = aiohttp.TCPConnector(limit=2 * len(users), force_close=False)
    loop = asyncio.get_running_loop()
    begin = loop.time()
    ends: list[float] = []

    async def converse(session: aiohttp.ClientSession, user: User) -> None:
        await asyncio.sleep(user.start)
        history = [{"role": "system", "content": user.system}]
        url = url_for(user)
        for i, message in enumerate(user.messages):
            if i:
                await asyncio.sleep(user.pauses[i - 1])
            history.append({"role": "user", "content": message})
            sent = loop.time() - begin
            turn, reply = await chat(session, url, user.model, history)
            turn.user, turn.turn, turn.sent_s = user.index, i, sent
            turn.node = node_for(user, turn.node)
            turns.append(turn)
            ends.append(loop.time())
            history.append({"role": "assistant", "content": reply})

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.ensure_future(converse(session, u)) for u in users]
        try:
            async with asyncio.timeout(deadline):
                await asyncio.gather(*tasks)
        except TimeoutError:
            pass  # counted below as turns that never ran
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    first = min((t.sent_s for t in turns), default=0.0)
    wall = (max(ends) - begin - first) if ends else 0.0
    return turns, wall, len(users) * len(users[0].messages) - len(turns) if users else 0
