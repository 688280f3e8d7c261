"""Quick checks of a live API: the healthcheck (is the node up, which models) and the smoke
test (does a prompt come back as an answer, how fast).

Both speak Ollama's HTTP API only, so they work against a node, the emulator, or olmd's
own LLM route, which streams the same NDJSON. Results are plain data; ``daemon.cli.ops``
prints them and turns them into exit codes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import aiohttp

__all__ = [
    "DAEMON_ROUTE",
    "DEFAULT_PROMPT",
    "ModelInfo",
    "NodeHealth",
    "SmokePlan",
    "SmokeResult",
    "check_node",
    "check_nodes",
    "generate",
    "run_smoke",
]

DAEMON_ROUTE = "/api/v1/llm/generate"
NODE_ROUTE = "/api/generate"
DEFAULT_PROMPT = "Reply with one word: ready?"
_ERROR_TEXT_LIMIT = 300


@dataclass(frozen=True)
class ModelInfo:
    name: str
    size: int | None = None
    digest: str | None = None
    modified_at: str | None = None


@dataclass(frozen=True)
class NodeHealth:
    """One node's answer to ``GET /api/version`` and ``GET /api/tags``."""

    name: str
    url: str
    ok: bool
    version: str | None = None
    models: tuple[ModelInfo, ...] = ()
    error: str | None = None
    elapsed_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SmokeResult:
    """One streamed generation. ``ok`` means HTTP 200, no error line, a non-empty answer."""

    target: str
    url: str
    model: str | None
    ok: bool
    answer: str = ""
    error: str | None = None
    version: str | None = None
    ttft_seconds: float | None = None
    tokens: int | None = None
    tokens_per_second: float | None = None
    total_seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _get_json(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> Any:
    async with session.get(url, **kwargs) as response:
        if response.status != 200:
            text = (await response.text(errors="replace"))[:_ERROR_TEXT_LIMIT]
            raise ValueError(f"GET {url} answered HTTP {response.status}: {text.strip()}")
        return await response.json(content_type=None)


def _models(tags: Any) -> tuple[ModelInfo, ...]:
    entries = tags.get("models") if isinstance(tags, dict) else None
    if not isinstance(entries, list):
        raise ValueError("/api/tags answered without a 'models' list")
    out = []
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            size = entry.get("size")
            out.append(
                ModelInfo(
                    name=entry["name"],
                    size=size if isinstance(size, int) else None,
                    digest=entry.get("digest") if isinstance(entry.get("digest"), str) else None,
                    modified_at=entry.get("modified_at")
                    if isinstance(entry.get("modified_at"), str)
                    else None,
                )
            )
    return tuple(sorted(out, key=lambda m: m.name))


async def check_node(
    session: aiohttp.ClientSession,
    name: str,
    url: str,
    *,
    time_limit: float,
    headers: Mapping[str, str] | None = None,
) -> NodeHealth:
    """Version and models of the Ollama API at ``url``; never raises for a dead node."""
    base = url.rstrip("/")
    start = time.perf_counter()
    client_timeout = aiohttp.ClientTimeout(total=time_limit)
    try:
        version = await _get_json(
            session, f"{base}/api/version", timeout=client_timeout, headers=headers
        )
        tags = await _get_json(session, f"{base}/api/tags", timeout=client_timeout, headers=headers)
        models = _models(tags)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return NodeHealth(name, base, ok=False, error=_describe(exc), elapsed_seconds=_since(start))
    found = version.get("version") if isinstance(version, dict) else None
    return NodeHealth(
        name,
        base,
        ok=True,
        version=found if isinstance(found, str) else None,
        models=models,
        elapsed_seconds=_since(start),
    )


async def check_nodes(targets: Sequence[tuple[str, str]], *, time_limit: float) -> list[NodeHealth]:
    """Check every ``(name, url)`` at once; results in the order given."""
    async with aiohttp.ClientSession() as session:
        return list(
            await asyncio.gather(
                *(check_node(session, name, url, time_limit=time_limit) for name, url in targets)
            )
        )


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 6)


async def generate(
    session: aiohttp.ClientSession,
    url: str,
    *,
    target: str,
    route: str,
    model: str,
    prompt: str,
    time_limit: float,
    connect_timeout: float,
    headers: Mapping[str, str] | None = None,
) -> SmokeResult:
    """Stream one ``/api/generate``-style answer and time it.

    Time to first token runs from sending the request to the first chunk with text.
    Tokens per second come from the final chunk's ``eval_count``/``eval_duration`` (the
    node's own figure) when present, else from the chunks counted between first and last.
    """
    base = url.rstrip("/")
    endpoint = f"{base}{route}"
    body = {"model": model, "prompt": prompt, "stream": True}
    client_timeout = aiohttp.ClientTimeout(total=time_limit, sock_connect=connect_timeout)
    start = time.perf_counter()
    first: float | None = None
    last = start
    pieces: list[str] = []
    final: dict[str, Any] = {}

    def result(ok: bool, error: str | None = None) -> SmokeResult:
        return _smoke_result(target, base, model, ok, error, pieces, final, start, first, last)

    try:
        async with session.post(
            endpoint, json=body, timeout=client_timeout, headers=headers
        ) as response:
            if response.status != 200:
                text = (await response.text(errors="replace"))[:_ERROR_TEXT_LIMIT].strip()
                return result(False, f"POST {route} answered HTTP {response.status}: {text}")
            async for raw in response.content:
                if not raw.strip():
                    continue
                chunk = json.loads(raw)
                if not isinstance(chunk, dict):
                    return result(False, "the stream carried a line that is not a JSON object")
                if "error" in chunk:
                    return result(False, f"error in the stream: {chunk['error']}")
                piece = chunk.get("response")
                if isinstance(piece, str) and piece:
                    last = time.perf_counter()
                    if first is None:
                        first = last
                    pieces.append(piece)
                if chunk.get("done"):
                    final = chunk
                    break
    except (aiohttp.ClientError, TimeoutError) as exc:
        return result(False, _describe(exc))
    except ValueError:
        return result(False, "the stream carried a line that is not JSON")
    if not final:
        return result(False, "the stream ended without a final chunk (done: true)")
    if not "".join(pieces).strip():
        return result(False, "the answer is empty")
    return result(True)


def _smoke_result(
    target: str,
    url: str,
    model: str,
    ok: bool,
    error: str | None,
    pieces: list[str],
    final: dict[str, Any],
    start: float,
    first: float | None,
    last: float,
) -> SmokeResult:
    eval_count = final.get("eval_count")
    eval_ns = final.get("eval_duration")
    tokens: int | None = eval_count if isinstance(eval_count, int) else (len(pieces) or None)
    rate: float | None = None
    if isinstance(eval_count, int) and isinstance(eval_ns, int) and eval_ns > 0:
        rate = eval_count / (eval_ns / 1e9)
    elif first is not None and len(pieces) > 1 and last > first:
        rate = (len(pieces) - 1) / (last - first)
    return SmokeResult(
        target=target,
        url=url,
        model=model,
        ok=ok,
        answer="".join(pieces).strip()[:_ERROR_TEXT_LIMIT],
        error=error,
        ttft_seconds=None if first is None else round(first - start, 6),
        tokens=tokens,
        tokens_per_second=None if rate is None else round(rate, 2),
        total_seconds=_since(start),
        details={k: final[k] for k in ("done_reason", "prompt_eval_count") if k in final},
    )


@dataclass(frozen=True)
class SmokePlan:
    """What ``olmd smoke`` checks: the daemon's LLM route, a node directly, or both."""

    daemon_url: str | None
    node_url: str | None
    prompt: str
    model: str | None
    preferred_models: tuple[str, ...]
    api_key: str | None
    route: str = DAEMON_ROUTE
    time_limit: float = 120.0
    connect_timeout: float = 10.0


async def run_smoke(plan: SmokePlan) -> list[SmokeResult]:
    """Run the plan's checks one after the other, so one does not skew the other's timing."""
    results = []
    async with aiohttp.ClientSession() as session:
        if plan.daemon_url is not None:
            results.append(await _smoke_daemon(session, plan, plan.daemon_url))
        if plan.node_url is not None:
            results.append(await _smoke_node(session, plan, plan.node_url))
    return results


async def _smoke_daemon(session: aiohttp.ClientSession, plan: SmokePlan, url: str) -> SmokeResult:
    headers = {"Authorization": f"Bearer {plan.api_key}"} if plan.api_key else None
    model = plan.model or next(iter(plan.preferred_models), None)
    if model is None:
        names = await _tags(session, url, time_limit=plan.connect_timeout, headers=headers)
        model = names[0] if names else None
    if model is None:
        return SmokeResult(
            "daemon",
            url,
            None,
            ok=False,
            error="no model to ask: pass --model or list "
            "services.ollama.baseline_models in the settings",
        )
    return await generate(
        session,
        url,
        target="daemon",
        route=plan.route,
        model=model,
        prompt=plan.prompt,
        time_limit=plan.time_limit,
        connect_timeout=plan.connect_timeout,
        headers=headers,
    )


async def _smoke_node(session: aiohttp.ClientSession, plan: SmokePlan, url: str) -> SmokeResult:
    health = await check_node(session, "node", url, time_limit=plan.connect_timeout)
    if not health.ok:
        return SmokeResult("node", health.url, plan.model, ok=False, error=health.error)
    present = [m.name for m in health.models]
    # The node's own list decides: a configured model it lacks is the sync's business.
    model = plan.model or next((m for m in plan.preferred_models if m in present), None)
    model = model or next(iter(present), None)
    if model is None:
        return SmokeResult(
            "node", health.url, None, ok=False, version=health.version,
            error="the node lists no models: pull one (olmd sync) or pass --model",
        )  # fmt: skip
    result = await generate(
        session,
        url,
        target="node",
        route=NODE_ROUTE,
        model=model,
        prompt=plan.prompt,
        time_limit=plan.time_limit,
        connect_timeout=plan.connect_timeout,
    )
    return replace(result, version=health.version)


async def _tags(
    session: aiohttp.ClientSession,
    url: str,
    *,
    time_limit: float,
    headers: Mapping[str, str] | None,
) -> list[str]:
    try:
        tags = await _get_json(
            session,
            f"{url.rstrip('/')}/api/tags",
            timeout=aiohttp.ClientTimeout(total=time_limit),
            headers=headers,
        )
        return [m.name for m in _models(tags)]
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return []
