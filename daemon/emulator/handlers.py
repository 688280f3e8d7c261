"""The emulator's request handlers, one per Ollama, OpenAI or ``/_emulator`` route.

Embeddings, the model list and details, delete, pull with its resumable progress, and the
control endpoints that read and change the config and the stats; generation (generate,
chat and their OpenAI forms) is ``daemon.emulator.generation``'s. :func:`add_routes` puts
them all on an application.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from daemon.emulator import bodies, generation
from daemon.emulator import formats as fmt
from daemon.emulator.config import describe, normalize, valid_name
from daemon.emulator.formats import Reject
from daemon.emulator.registry_pull import RegistryPullError, pull_from_registry, registry_base
from daemon.emulator.responses import (
    Handler,
    Sink,
    error_response,
    json_response,
    read_body,
    single,
)
from daemon.emulator.state import STATE_KEY, EmulatorState, hold

_PULL_TICK = 0.06  # Ollama reports pull progress every 60 ms
Emit = Callable[[dict[str, Any], bool], Awaitable[None]]


# ---------------------------------------------------------------- embeddings


async def _vectors(
    request: web.Request, model: str, texts: list[str]
) -> tuple[list[list[float]], dict[str, int]]:
    """Vectors and metrics for ``texts``, through the gate and the cold load."""
    state = request.app[STATE_KEY]
    name = state.find(model)
    if name is None:
        raise Reject(404, f'model "{model}" not found, try pulling it first')
    start = time.perf_counter_ns()
    await state.admit(request)
    try:
        # A slot (an embedding model has one), with nothing to cache in it.
        lease, _ = await state.acquire(request, name, [], fmt.KEEP_ALIVE_DEFAULT)
        try:
            loaded = time.perf_counter_ns()
            vectors = [fmt.embedding(text, state.config.embedding_dim) for text in texts]
        finally:
            state.finish(lease, None, fmt.KEEP_ALIVE_DEFAULT)
    finally:
        state.release()
    count = sum(fmt.prompt_tokens(text) for text in texts)
    end = time.perf_counter_ns()
    metrics = fmt.metrics(
        total=end - start, load=loaded - start, prompt_count=count, prompt_ns=0, eval_count=0,
        eval_ns=0,
    )  # fmt: skip
    return vectors, metrics


async def _embed(request: web.Request) -> web.StreamResponse:
    body = await read_body(request)
    model = fmt.model_of(body)
    vectors, metrics = await _vectors(
        request, model, fmt.embed_input(body.get("input"), openai=False)
    )
    return await single(request, {"model": model, "embeddings": vectors} | metrics, openai=False)


async def _embeddings(request: web.Request) -> web.StreamResponse:
    body = await read_body(request)
    prompt = body.get("prompt")
    texts = [prompt] if isinstance(prompt, str) and prompt else []
    vectors, _ = await _vectors(request, fmt.model_of(body), texts)
    return await single(request, {"embedding": vectors[0] if vectors else []}, openai=False)


async def _v1_embeddings(request: web.Request) -> web.StreamResponse:
    body = await read_body(request)
    encoding = body.get("encoding_format") or "float"
    if not isinstance(encoding, str) or encoding.lower() not in ("float", "base64"):
        message = f"Invalid value for 'encoding_format' = {encoding}. "
        raise Reject(400, message + "Supported values: ['float', 'base64'].")
    texts = fmt.embed_input(body.get("input"), openai=True)
    model = fmt.model_of(body)
    vectors, metrics = await _vectors(request, model, texts)
    count = metrics.get("prompt_eval_count", 0)
    return await single(
        request, bodies.embedding_list(model, vectors, count, encoding), openai=True
    )


# ---------------------------------------------------------------- models


async def _root(request: web.Request) -> web.StreamResponse:
    return web.Response(text="Ollama is running")


async def _version(request: web.Request) -> web.StreamResponse:
    return json_response({"version": request.app[STATE_KEY].config.version})


async def _tags(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    return json_response(
        {"models": [bodies.tags_entry(m, state.digest(m), t) for m, t in state.by_age()]}
    )


async def _ps(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    loaded = state.loaded
    live = sorted((m for m in loaded if state.find(m)), key=lambda m: loaded[m], reverse=True)
    entries = [bodies.ps_entry(m, state.digest(m), loaded[m], state.context_of(m)) for m in live]
    return json_response({"models": entries})


async def _show(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    model = fmt.model_of(await read_body(request))
    name = state.find(model)
    if name is None:
        raise Reject(404, f"model '{model}' not found")
    dim = state.config.embedding_dim
    return json_response(bodies.show_body(name, state.digest(name), state.modified_ns(name), dim))


async def _delete(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    body = await read_body(request)
    model = body.get("model") or body.get("name") or ""
    if not isinstance(model, str) or not valid_name(model):
        raise Reject(400, f"name {json.dumps(model)} is invalid")
    name = state.find(model)
    if name is None:
        raise Reject(404, f"model '{model}' not found")
    state.remove_model(name)
    return web.Response()


async def _v1_models(request: web.Request) -> web.StreamResponse:
    return json_response(bodies.model_list(request.app[STATE_KEY].by_age()), openai=True)


async def _v1_model(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    model = request.match_info["model"]
    name = state.find(model)
    if name is None:
        raise Reject(404, f"model '{model}' not found")
    return json_response(bodies.model_object(model, state.modified_ns(name)), openai=True)


# ---------------------------------------------------------------- pull


async def _pull_model(
    request: web.Request, state: EmulatorState, name: str, emit: Emit, insecure: bool = False
) -> bool:
    """Ollama's pull conversation, True if it succeeded. Progress outlives a disconnect,
    so the next pull of the model resumes where this one stopped."""
    cfg = state.config
    await emit({"status": "pulling manifest"}, False)
    source = registry_base(name, insecure, cfg.registry)
    if source is not None:
        return await _pull_registry(state, name, source, emit)
    if any(u.lower() == name.lower() for u in cfg.unavailable):
        await emit({"error": fmt.ERR_PULL_MANIFEST}, True)
        return False
    present = state.find(name) is not None and name not in state.pull_progress
    done = cfg.pull_size if present else state.pull_progress.get(name, 0)
    loop = asyncio.get_running_loop()
    offset = 0
    for layer, size in bodies.pull_layers(name, state.digest(name), cfg.pull_size):
        have = min(max(done - offset, 0), size)
        await emit(bodies.progress(layer, size, have), False)
        tick = loop.time()
        while have < size:  # bounded: every pass adds at least one byte
            step, speed = size - have, state.config.pull_speed
            if speed:
                await hold(request, _PULL_TICK)
                now = loop.time()
                step, tick = max(1, int((now - tick) * speed)), now
            have = min(size, have + step)
            state.pull_progress[name] = offset + have
            await emit(bodies.progress(layer, size, have), False)
        offset += size
    await emit({"status": "verifying sha256 digest"}, False)
    await emit({"status": "writing manifest"}, False)
    state.add_model(name)
    state.pull_progress.pop(name, None)
    await emit({"status": "success"}, True)
    return True


async def _pull_registry(
    state: EmulatorState, name: str, source: tuple[str, str], emit: Emit
) -> bool:
    try:
        raw, _ = await pull_from_registry(*source, state.blobs, emit)
    except RegistryPullError as exc:
        await emit({"error": str(exc)}, True)
        return False
    await emit({"status": "verifying sha256 digest"}, False)
    await emit({"status": "writing manifest"}, False)
    state.add_model(name)
    state.manifests[state.find(name) or name] = raw
    await emit({"status": "success"}, True)
    return True


async def _copy(request: web.Request) -> web.StreamResponse:
    """``POST /api/copy {"source", "destination"}``: the same manifest under a new name."""
    state = request.app[STATE_KEY]
    body = await read_body(request)
    source, destination = body.get("source"), body.get("destination")
    if not isinstance(destination, str) or not valid_name(destination.strip()):
        raise Reject(400, f"invalid destination name {json.dumps(destination)}")
    found = state.find(source) if isinstance(source, str) else None
    if found is None:
        raise Reject(404, f"model '{source}' not found")
    target = normalize(destination)
    raw = state.manifests.get(found)
    digest = state.digest(found)
    state.add_model(target)
    target = state.find(target) or target
    if raw is not None:
        state.manifests[target] = raw
    else:
        state.update({"digests": {**state.config.digests, target: digest}})
    return web.Response()


async def _pull(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    body = await read_body(request)
    raw = body.get("model") or body.get("name") or ""
    if not isinstance(raw, str) or not valid_name(raw.strip()):
        raise Reject(400, fmt.ERR_INVALID_NAME)
    name = state.find(raw) or normalize(raw)
    insecure = body.get("insecure") is True
    stats = state.stats
    stats.pulls_in_flight += 1
    stats.max_pulls_in_flight = max(stats.max_pulls_in_flight, stats.pulls_in_flight)
    try:
        if body.get("stream") is not False:
            sink = Sink(request, "application/x-ndjson", error=fmt.ERR_PULL_EOF, openai=False)

            async def send(line: dict[str, Any], last: bool) -> None:
                await sink.send(fmt.ndjson(line), last=last)

            if await _pull_model(request, state, name, send, insecure):
                stats.completed += 1
            return sink.response
        latest: dict[str, Any] = {}

        async def keep(line: dict[str, Any], last: bool) -> None:
            latest.clear()
            latest.update(line)

        await _pull_model(request, state, name, keep, insecure)
        if "error" in latest:  # Ollama's waitForStream answers 500 to an error
            return error_response(500, latest["error"], openai=False)
        return await single(request, latest, openai=False, error=fmt.ERR_PULL_EOF)
    finally:
        stats.pulls_in_flight -= 1


# ---------------------------------------------------------------- control


async def _get_config(request: web.Request) -> web.StreamResponse:
    return json_response(request.app[STATE_KEY].config.model_dump(mode="json"))


async def _post_config(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    try:
        patch = json.loads(await request.read() or b"{}")
        if not isinstance(patch, dict):
            raise ValueError("expected a JSON object")
        state.update(patch)
    except ValidationError as exc:  # before ValueError: it is one
        return error_response(400, describe(exc), openai=False)
    except ValueError as exc:
        return error_response(400, f"invalid request body: {exc}", openai=False)
    return json_response(state.config.model_dump(mode="json"))


async def _get_stats(request: web.Request) -> web.StreamResponse:
    return json_response(request.app[STATE_KEY].stats.snapshot())


async def _reset(request: web.Request) -> web.StreamResponse:
    stats = request.app[STATE_KEY].stats
    stats.reset()
    return json_response(stats.snapshot())


# ---------------------------------------------------------------- routes


def add_routes(app: web.Application) -> None:
    """Every route the emulator answers."""
    gets: dict[str, Handler] = {
        "/": _root,
        "/api/version": _version,
        "/api/tags": _tags,
        "/api/ps": _ps,
        "/v1/models": _v1_models,
        "/v1/models/{model:.+}": _v1_model,
        "/_emulator/config": _get_config,
        "/_emulator/stats": _get_stats,
    }
    posts: dict[str, Handler] = {
        "/api/generate": generation.generate,
        "/api/chat": generation.chat,
        "/api/embed": _embed,
        "/api/embeddings": _embeddings,
        "/api/pull": _pull,
        "/api/copy": _copy,
        "/api/show": _show,
        "/v1/chat/completions": generation.v1_chat,
        "/v1/completions": generation.v1_completions,
        "/v1/embeddings": _v1_embeddings,
        "/v1/messages": generation.messages,
        "/v1/responses": generation.responses,
        "/v1/audio/transcriptions": generation.transcriptions,
        "/_emulator/config": _post_config,
        "/_emulator/reset": _reset,
    }
    for path, handler in gets.items():
        app.router.add_get(path, handler)  # HEAD too, as Ollama answers it
    for path, handler in posts.items():
        app.router.add_post(path, handler)
    app.router.add_delete("/api/delete", _delete)
