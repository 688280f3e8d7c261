"""An Ollama server stand-in (``olmd emulate``): Ollama's endpoints and wire formats.

Tests, the benchmark and the demo run it; users point their clients at it. Its behaviour
(tokens, delays, concurrency, faults) is an :class:`EmulatorConfig`, adjustable while it
runs through ``/_emulator/config``; ``/_emulator/stats`` tells what it saw.

Python API::

    async with Emulator(EmulatorConfig(models=["llama3.1:8b"])) as emu:
        ...  # emu.url, emu.state.config, emu.state.stats; stop() / start() keep the port

``create_app(config)`` gives the bare application, its state at ``app[STATE_KEY]``. Run
it with ``handler_cancellation=True`` (as :class:`Emulator` does) to see a departed
client at once; without, the emulator notices at its next write or within 50 ms of a wait.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, get_args

from aiohttp import web
from pydantic import ValidationError

from daemon import emulator_formats as fmt
from daemon.emulator_formats import EmulatorConfig, FaultKind, Job, JobKind, Reject, Stats

__all__ = [
    "STATE_KEY",
    "Emulator",
    "EmulatorConfig",
    "EmulatorState",
    "Stats",
    "add_arguments",
    "create_app",
    "run_from_args",
]

_POLL = 0.05  # how often a waiting handler checks that its client is still there
_PULL_TICK = 0.06  # Ollama reports pull progress every 60 ms
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Emit = Callable[[dict[str, Any], bool], Awaitable[None]]


class _ClientGone(Exception):
    """The client closed its connection while the emulator was waiting."""


class _Aborted(Exception):
    """An injected fault ended the answer; ``response`` is what aiohttp should finish."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("fault injected")
        self.response = response


def _gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _hold(
    request: web.BaseRequest, seconds: float | None, until: asyncio.Future[None] | None = None
) -> None:
    """Wait ``seconds`` (None: for ever) or until ``until`` is done; _ClientGone if the
    client leaves first. Only called for non-zero delays, so it costs the hot path nothing."""
    loop = asyncio.get_running_loop()
    deadline = None if seconds is None else loop.time() + seconds
    while until is None or not until.done():
        step = _POLL if deadline is None else min(_POLL, deadline - loop.time())
        if step <= 0:
            return
        if until is None:
            await asyncio.sleep(step)
        else:
            await asyncio.wait((until,), timeout=step)
        if _gone(request):
            raise _ClientGone


class EmulatorState:
    """The live node: config, models on disk and in memory, pull progress, request gate."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.stopping = False  # set by Emulator.stop: requests it cuts are not cancellations
        self._started = time.time_ns()
        self.modified: dict[str, int] = {}  # name → ns since the epoch
        self.loaded: dict[str, int] = {}  # name → expiry, ns since the epoch
        self.pull_progress: dict[str, int] = {}  # bytes already downloaded, kept for resume
        self._loading: dict[str, asyncio.Future[None]] = {}
        self._waiters: deque[asyncio.Future[None]] = deque()

    def update(self, patch: dict[str, Any]) -> None:
        """Apply a partial config; on ValidationError the old config stays."""
        self.config = EmulatorConfig.model_validate({**self.config.model_dump(), **patch})
        self._wake()

    def find(self, name: str) -> str | None:
        wanted = fmt.normalize(name).lower()
        return next((m for m in self.config.models if m.lower() == wanted), None)

    def digest(self, name: str) -> str:
        return self.config.digests.get(name.lower()) or fmt.default_digest(name)

    def modified_ns(self, name: str) -> int:
        return self.modified.get(name, self._started)

    def by_age(self) -> list[tuple[str, int]]:
        """(name, modified) newest first, the order of Ollama's lists."""
        entries = [(m, self.modified_ns(m)) for m in self.config.models]
        return sorted(entries, key=lambda e: e[1], reverse=True)

    def add_model(self, name: str) -> None:
        if self.find(name) is None:
            self.config = self.config.model_copy(update={"models": [*self.config.models, name]})
        self.modified[name] = time.time_ns()

    def remove_model(self, name: str) -> None:
        models = [m for m in self.config.models if m != name]
        self.config = self.config.model_copy(update={"models": models})
        self.loaded.pop(name, None)
        self.modified.pop(name, None)

    def take_fault(self, route: str) -> tuple[str, int]:
        """(kind, fault_after) for a request to ``route``, counted against fault_count."""
        cfg = self.config
        if cfg.fault == "none" or route not in cfg.fault_routes:
            return ("none", 0)
        if cfg.fault_count:
            left = cfg.fault_count - 1
            update = {"fault_count": left, "fault": cfg.fault if left else "none"}
            self.config = cfg.model_copy(update=update)
        self.stats.faults += 1
        return (cfg.fault, cfg.fault_after)

    def is_loaded(self, name: str) -> bool:
        expiry = self.loaded.get(name)
        if expiry is not None and expiry < time.time_ns():
            del self.loaded[name]
            return False
        return expiry is not None

    async def ensure_loaded(self, request: web.Request, name: str, keep_alive: float) -> None:
        """Load ``name`` if needed; concurrent requests share one cold load."""
        while not self.is_loaded(name):  # loops again only if the loading request left
            pending = self._loading.get(name)
            if pending is not None:
                await _hold(request, None, pending)
                continue
            pending = asyncio.get_running_loop().create_future()
            self._loading[name] = pending
            try:
                if self.config.load_delay:
                    await _hold(request, self.config.load_delay)
                self.loaded[name] = time.time_ns() + int(keep_alive * 1e9)
            finally:
                del self._loading[name]
                pending.set_result(None)
        self.loaded[name] = time.time_ns() + int(keep_alive * 1e9)

    async def admit(self, request: web.Request) -> None:
        """Pass the concurrency gate, queueing if allowed, else Reject with Ollama's 503."""
        cfg, stats = self.config, self.stats
        if not cfg.concurrency or (stats.in_flight < cfg.concurrency and not self._waiters):
            self._enter()
            return
        if len(self._waiters) >= cfg.queue:
            stats.rejected += 1
            raise Reject(503, fmt.ERR_MAX_QUEUE)
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        stats.queued += 1
        try:
            await _hold(request, None, turn)
        except BaseException:
            if turn.done():  # the slot was handed over just as this request left
                self.release()
            else:
                self._waiters.remove(turn)
            raise
        finally:
            stats.queued -= 1

    def release(self) -> None:
        self.stats.in_flight -= 1
        self._wake()

    def _enter(self) -> None:
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)

    def _wake(self) -> None:
        limit = self.config.concurrency
        while self._waiters and (not limit or self.stats.in_flight < limit):
            self._enter()
            self._waiters.popleft().set_result(None)


STATE_KEY = web.AppKey("olmd_emulator_state", EmulatorState)
_FAULT = web.RequestKey("olmd_emulator_fault", tuple)


# ---------------------------------------------------------------- responses


def _json(body: Any, status: int = 200, *, openai: bool = False) -> web.Response:
    # Gin's c.JSON adds a charset; Ollama's /v1 middleware sets plain application/json.
    charset = None if openai else "utf-8"
    return web.Response(
        body=fmt.dumps(body), status=status, content_type="application/json", charset=charset
    )


def _error(status: int, message: str, *, openai: bool) -> web.Response:
    body = fmt.openai_error(status, message) if openai else {"error": message}
    return _json(body, status, openai=openai)


def _abort(request: web.BaseRequest) -> None:
    if request.transport is not None:
        request.transport.abort()


class _Sink:
    """A streamed answer. Headers leave with the first chunk, as from Go's writer, so a
    failure before it (queue full, client gone during the cold load) still sets the status."""

    __slots__ = ("_after", "_error", "_fault", "_openai", "_request", "_sent", "response")

    def __init__(self, request: web.Request, content_type: str, *, error: str, openai: bool):
        kind, self._after = request.get(_FAULT, ("none", 0))
        self._fault = kind if kind in ("cut", "error_line") else None
        self._request = request
        self._error = error
        self._openai = openai
        self._sent = -1  # not prepared yet
        self.response = web.StreamResponse()
        self.response.content_type = content_type

    async def send(self, data: bytes, *, last: bool = False) -> None:
        if self._sent < 0:
            await self.response.prepare(self._request)
            self._sent = 0
        # A fault set past the end fires before the last chunk: never a clean ending.
        if self._fault is not None and (self._sent >= self._after or last):
            if self._fault == "cut":
                _abort(self._request)
            elif self._openai:
                await self.response.write(fmt.sse(fmt.openai_error(500, self._error)))
            else:
                await self.response.write(fmt.ndjson({"error": self._error}))
            raise _Aborted(self.response)
        await self.response.write(data)
        self._sent += 1


async def _single(
    request: web.Request, body: dict[str, Any], *, openai: bool, error: str = fmt.ERR_RUNNER_GONE
) -> web.StreamResponse:
    """A one-object answer that completes the request; under a fault cut sends half the
    body and error_line Ollama's 500."""
    kind, _ = request.get(_FAULT, ("none", 0))
    if kind == "error_line":
        return _error(500, error, openai=openai)
    response = _json(body, openai=openai)
    if kind == "cut":
        data = fmt.dumps(body)
        partial = web.StreamResponse(headers={"Content-Type": response.headers["Content-Type"]})
        partial.content_length = len(data)
        await partial.prepare(request)
        await partial.write(data[: len(data) // 2])
        _abort(request)
        raise _Aborted(partial)
    request.app[STATE_KEY].stats.completed += 1
    return response


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        raise Reject(400, fmt.ERR_MISSING_BODY)
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise Reject(400, f"invalid request body: {exc}") from None
    if not isinstance(body, dict):
        raise Reject(400, "invalid request body: expected a JSON object")
    return body


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts API requests, applies faults, turns exceptions into Ollama's answers."""
    state = request.app[STATE_KEY]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else ""
    if not route.startswith(("/api/", "/v1/")):
        return await handler(request)
    state.stats.requests[route] = state.stats.requests.get(route, 0) + 1
    openai = route.startswith("/v1/")
    request[_FAULT] = state.take_fault(route)
    fault = request[_FAULT][0]
    try:
        if fault == "http500":
            return _error(500, fmt.ERR_RUNNER_GONE, openai=openai)
        if fault == "http503":
            return _error(503, fmt.ERR_MAX_QUEUE, openai=openai)
        if fault == "refuse":
            _abort(request)
            return web.Response()  # never sent: aiohttp finds the transport closed
        while fault == "stall":  # until the client gives up (_ClientGone)
            await _hold(request, 3600.0)
        return await handler(request)
    except Reject as exc:
        return _error(exc.status, exc.message, openai=openai)
    except _Aborted as exc:
        return exc.response
    except (_ClientGone, ConnectionResetError):
        state.stats.cancelled += 1
        return web.Response()  # never sent, as above
    except asyncio.CancelledError:
        if not state.stopping:
            state.stats.cancelled += 1
        raise


# ---------------------------------------------------------------- generation


async def _generation(request: web.Request, kind: JobKind) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    job = fmt.parse_job(kind, await _body(request))
    name = state.find(job.model)
    if name is None:
        raise Reject(404, f"model '{job.model}' not found")
    if fmt.is_embedding(name):
        raise Reject(400, f'"{job.model}" does not support {job.verb}')
    if job.load_only:
        return await _load_only(request, state, job, name)
    return await _run(request, state, job, name)


async def _run(
    request: web.Request, state: EmulatorState, job: Job, name: str
) -> web.StreamResponse:
    # Like Ollama, load_duration runs from the request's start, so it includes queueing.
    cfg = state.config
    start = time.perf_counter_ns()
    await state.admit(request)
    try:
        await state.ensure_loaded(request, name, job.keep_alive)
        loaded = first = time.perf_counter_ns()
        count = cfg.tokens if job.limit is None or job.limit < 0 else min(cfg.tokens, job.limit)
        tokens = fmt.answer(job.prompt, count)
        sink = None
        if job.stream:
            kind = "text/event-stream" if job.openai else "application/x-ndjson"
            sink = _Sink(request, kind, error=fmt.ERR_RUNNER_GONE, openai=job.openai)
        for i, token in enumerate(tokens):
            if i and cfg.token_delay:
                await _hold(request, cfg.token_delay)
            elif not i:
                first = time.perf_counter_ns()
            if sink is not None:
                await sink.send(fmt.chunk(job, token))
        end = time.perf_counter_ns()
        reason = "length" if count < cfg.tokens else "stop"
        stats = fmt.metrics(
            total=end - start,
            load=loaded - start,
            prompt_count=fmt.prompt_tokens(job.prompt),
            prompt_ns=max(1, first - loaded),
            eval_count=count,
            eval_ns=max(1, end - first) if count else 0,
        )
        if sink is None:
            body = fmt.final(job, "".join(tokens), reason, stats)
            return await _single(request, body, openai=job.openai)
        await sink.send(fmt.closing(job, reason, stats), last=True)
        state.stats.completed += 1
        return sink.response
    finally:
        state.release()


async def _load_only(
    request: web.Request, state: EmulatorState, job: Job, name: str
) -> web.StreamResponse:
    if job.keep_alive == 0:
        state.loaded.pop(name, None)
        return _json(fmt.load_reply(job, "unload"))
    await state.admit(request)
    try:
        await state.ensure_loaded(request, name, job.keep_alive)
    finally:
        state.release()
    return _json(fmt.load_reply(job, "load"))


async def _generate(request: web.Request) -> web.StreamResponse:
    return await _generation(request, "generate")


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _generation(request, "chat")


async def _v1_chat(request: web.Request) -> web.StreamResponse:
    return await _generation(request, "v1chat")


async def _v1_completions(request: web.Request) -> web.StreamResponse:
    return await _generation(request, "v1completion")


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
        await state.ensure_loaded(request, name, fmt.KEEP_ALIVE_DEFAULT)
        loaded = time.perf_counter_ns()
        vectors = [fmt.embedding(text, state.config.embedding_dim) for text in texts]
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
    body = await _body(request)
    model = fmt.model_of(body)
    vectors, metrics = await _vectors(
        request, model, fmt.embed_input(body.get("input"), openai=False)
    )
    return await _single(request, {"model": model, "embeddings": vectors} | metrics, openai=False)


async def _embeddings(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    prompt = body.get("prompt")
    texts = [prompt] if isinstance(prompt, str) and prompt else []
    vectors, _ = await _vectors(request, fmt.model_of(body), texts)
    return await _single(request, {"embedding": vectors[0] if vectors else []}, openai=False)


async def _v1_embeddings(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    encoding = body.get("encoding_format") or "float"
    if not isinstance(encoding, str) or encoding.lower() not in ("float", "base64"):
        message = f"Invalid value for 'encoding_format' = {encoding}. "
        raise Reject(400, message + "Supported values: ['float', 'base64'].")
    texts = fmt.embed_input(body.get("input"), openai=True)
    model = fmt.model_of(body)
    vectors, metrics = await _vectors(request, model, texts)
    count = metrics.get("prompt_eval_count", 0)
    return await _single(request, fmt.embedding_list(model, vectors, count, encoding), openai=True)


# ---------------------------------------------------------------- models


async def _root(request: web.Request) -> web.StreamResponse:
    return web.Response(text="Ollama is running")


async def _version(request: web.Request) -> web.StreamResponse:
    return _json({"version": request.app[STATE_KEY].config.version})


async def _tags(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    return _json({"models": [fmt.tags_entry(m, state.digest(m), t) for m, t in state.by_age()]})


async def _ps(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    live = [m for m in list(state.loaded) if state.is_loaded(m) and state.find(m)]
    live.sort(key=lambda m: state.loaded[m], reverse=True)
    return _json({"models": [fmt.ps_entry(m, state.digest(m), state.loaded[m]) for m in live]})


async def _show(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    model = fmt.model_of(await _body(request))
    name = state.find(model)
    if name is None:
        raise Reject(404, f"model '{model}' not found")
    dim = state.config.embedding_dim
    return _json(fmt.show_body(name, state.digest(name), state.modified_ns(name), dim))


async def _delete(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    body = await _body(request)
    model = body.get("model") or body.get("name") or ""
    if not isinstance(model, str) or not fmt.valid_name(model):
        raise Reject(400, f"name {json.dumps(model)} is invalid")
    name = state.find(model)
    if name is None:
        raise Reject(404, f"model '{model}' not found")
    state.remove_model(name)
    return web.Response()


async def _v1_models(request: web.Request) -> web.StreamResponse:
    return _json(fmt.model_list(request.app[STATE_KEY].by_age()), openai=True)


async def _v1_model(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    model = request.match_info["model"]
    name = state.find(model)
    if name is None:
        raise Reject(404, f"model '{model}' not found")
    return _json(fmt.model_object(model, state.modified_ns(name)), openai=True)


# ---------------------------------------------------------------- pull


async def _pull_model(request: web.Request, state: EmulatorState, name: str, emit: Emit) -> bool:
    """Ollama's pull conversation, True if it succeeded. Progress outlives a disconnect,
    so the next pull of the model resumes where this one stopped."""
    cfg = state.config
    await emit({"status": "pulling manifest"}, False)
    if any(u.lower() == name.lower() for u in cfg.unavailable):
        await emit({"error": fmt.ERR_PULL_MANIFEST}, True)
        return False
    present = state.find(name) is not None and name not in state.pull_progress
    done = cfg.pull_size if present else state.pull_progress.get(name, 0)
    loop = asyncio.get_running_loop()
    offset = 0
    for layer, size in fmt.pull_layers(name, state.digest(name), cfg.pull_size):
        have = min(max(done - offset, 0), size)
        await emit(fmt.progress(layer, size, have), False)
        tick = loop.time()
        while have < size:  # bounded: every pass adds at least one byte
            step, speed = size - have, state.config.pull_speed
            if speed:
                await _hold(request, _PULL_TICK)
                now = loop.time()
                step, tick = max(1, int((now - tick) * speed)), now
            have = min(size, have + step)
            state.pull_progress[name] = offset + have
            await emit(fmt.progress(layer, size, have), False)
        offset += size
    await emit({"status": "verifying sha256 digest"}, False)
    await emit({"status": "writing manifest"}, False)
    state.add_model(name)
    state.pull_progress.pop(name, None)
    await emit({"status": "success"}, True)
    return True


async def _pull(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    body = await _body(request)
    raw = body.get("model") or body.get("name") or ""
    if not isinstance(raw, str) or not fmt.valid_name(raw.strip()):
        raise Reject(400, fmt.ERR_INVALID_NAME)
    name = state.find(raw) or fmt.normalize(raw)
    stats = state.stats
    stats.pulls_in_flight += 1
    stats.max_pulls_in_flight = max(stats.max_pulls_in_flight, stats.pulls_in_flight)
    try:
        if body.get("stream") is not False:
            sink = _Sink(request, "application/x-ndjson", error=fmt.ERR_PULL_EOF, openai=False)

            async def send(line: dict[str, Any], last: bool) -> None:
                await sink.send(fmt.ndjson(line), last=last)

            if await _pull_model(request, state, name, send):
                stats.completed += 1
            return sink.response
        latest: dict[str, Any] = {}

        async def keep(line: dict[str, Any], last: bool) -> None:
            latest.clear()
            latest.update(line)

        await _pull_model(request, state, name, keep)
        if "error" in latest:  # Ollama's waitForStream answers 500 to an error
            return _error(500, latest["error"], openai=False)
        return await _single(request, latest, openai=False, error=fmt.ERR_PULL_EOF)
    finally:
        stats.pulls_in_flight -= 1


# ---------------------------------------------------------------- control


async def _get_config(request: web.Request) -> web.StreamResponse:
    return _json(request.app[STATE_KEY].config.model_dump(mode="json"))


async def _post_config(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    try:
        patch = json.loads(await request.read() or b"{}")
        if not isinstance(patch, dict):
            raise ValueError("expected a JSON object")
        state.update(patch)
    except ValidationError as exc:  # before ValueError: it is one
        return _error(400, fmt.describe(exc), openai=False)
    except ValueError as exc:
        return _error(400, f"invalid request body: {exc}", openai=False)
    return _json(state.config.model_dump(mode="json"))


async def _get_stats(request: web.Request) -> web.StreamResponse:
    return _json(request.app[STATE_KEY].stats.snapshot())


async def _reset(request: web.Request) -> web.StreamResponse:
    stats = request.app[STATE_KEY].stats
    stats.reset()
    return _json(stats.snapshot())


# ---------------------------------------------------------------- application


def create_app(config: EmulatorConfig | None = None) -> web.Application:
    """The emulator as an aiohttp application; its live state is ``app[STATE_KEY]``."""
    return _build_app(EmulatorState(config or EmulatorConfig()))


def _build_app(state: EmulatorState) -> web.Application:
    app = web.Application(middlewares=[_middleware])
    app[STATE_KEY] = state
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
        "/api/generate": _generate,
        "/api/chat": _chat,
        "/api/embed": _embed,
        "/api/embeddings": _embeddings,
        "/api/pull": _pull,
        "/api/show": _show,
        "/v1/chat/completions": _v1_chat,
        "/v1/completions": _v1_completions,
        "/v1/embeddings": _v1_embeddings,
        "/_emulator/config": _post_config,
        "/_emulator/reset": _reset,
    }
    for path, handler in gets.items():
        app.router.add_get(path, handler)  # HEAD too, as Ollama answers it
    for path, handler in posts.items():
        app.router.add_post(path, handler)
    app.router.add_delete("/api/delete", _delete)
    return app


class Emulator:
    """The emulator listening on ``host:port``; port 0 picks a free one, kept on restart.

    ``stop()`` drops every connection at once, like a node dying; ``start()`` brings the
    node back on the same port with its models and pull progress, nothing loaded.
    """

    def __init__(
        self, config: EmulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.state = EmulatorState(config or EmulatorConfig())
        self.host = host
        self._port = port
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the emulator has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        if self._runner is not None:
            return
        self.state.stopping = False
        runner = web.AppRunner(
            _build_app(self.state),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=0.01,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._port = self._port or int(runner.addresses[0][1])
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self.state.stopping = True
        await runner.cleanup()
        self.state.loaded.clear()

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


# ---------------------------------------------------------------- command line

# (flag, EmulatorConfig field, type, help); the defaults are EmulatorConfig's.
_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--name", "name", str, "node label"),
    ("--version-string", "version", str, "what /api/version reports"),
    ("--tokens", "tokens", int, "tokens per answer"),
    ("--token-delay", "token_delay", float, "seconds between tokens"),
    ("--load-delay", "load_delay", float, "seconds a model not in memory takes to load"),
    ("--pull-size", "pull_size", int, "bytes one pull transfers"),
    ("--pull-speed", "pull_speed", float, "pull bytes per second, 0 = unlimited"),
    ("--concurrency", "concurrency", int, "requests generating at once, 0 = unlimited"),
    ("--queue", "queue", int, "requests that may wait beyond --concurrency before a 503"),
    ("--embedding-dim", "embedding_dim", int, "length of embedding vectors"),
    ("--fault-after", "fault_after", int, "chunks sent before a cut or error_line fault"),
    ("--fault-count", "fault_count", int, "requests that get the fault, 0 = every one"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``olmd emulate`` flags."""
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    add("--port", type=int, default=11434, help="port, 0 for a free one (default: %(default)s)")
    add(
        "--models",
        nargs="+",
        metavar="MODEL",
        help="models present at start; no tag means :latest (default: llama3.1:8b)",
    )
    add("--unavailable", nargs="+", default=[], metavar="MODEL", help="names a pull cannot find")
    add(
        "--fault",
        choices=get_args(FaultKind),
        default="none",
        help="inject a failure: refuse (close the connection unanswered), http500, http503, "
        "stall (never answer), cut (drop the connection mid-answer), error_line (an error "
        "inside the stream)",
    )
    for flag, key, kind, text in _FLAGS:
        default = EmulatorConfig.model_fields[key].default
        add(flag, type=kind, default=default, help=f"{text} (default: %(default)s)")


def run_from_args(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; 0 on a clean stop, 2 on a bad flag value."""
    values = {key: getattr(args, flag[2:].replace("-", "_")) for flag, key, _, _ in _FLAGS}
    values.update(fault=args.fault, unavailable=args.unavailable)
    if args.models is not None:
        values["models"] = args.models
    try:
        config = EmulatorConfig.model_validate(values)
    except ValidationError as exc:
        print(f"olmd emulate: {fmt.describe(exc)}", file=sys.stderr)
        return 2
    asyncio.run(_serve(config, args.host, args.port))
    return 0


async def _serve(config: EmulatorConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Emulator(config, host=host, port=port) as emulator:
            print(f"olmd emulator {config.name} listening on {emulator.url}", flush=True)
            await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
