"""The generation routes: ``/api/generate``, ``/api/chat`` and their OpenAI forms.

A request passes the concurrency gate, takes the model (and, with ``num_parallel`` > 0,
a slot; see ``daemon.emulator.slots``), waits while its slot's state is swapped with the
host-RAM prompt cache (at ``restore_rate``; in neither load nor prompt time, as in
llama-server), evaluates the prompt tokens its slot did not cache at ``prompt_rate``,
then streams its tokens ``token_delay`` apart. ``prompt_eval_count`` counts the whole
prompt or only the evaluated tokens (``prompt_count``); ``prompt_eval_duration`` is the
evaluation's. The slot is given back, caching prompt + reply, before the final chunk
leaves, so a client that sends its next turn as soon as it has read the answer finds the
slot free and warm.
"""

from __future__ import annotations

import json
import time

from aiohttp import web

from daemon.emulator import bodies, dialects
from daemon.emulator import formats as fmt
from daemon.emulator import tokens as tok
from daemon.emulator.formats import Job, JobKind, Reject
from daemon.emulator.responses import Sink, json_response, read_body, single
from daemon.emulator.state import STATE_KEY, EmulatorState, hold


async def _generation(request: web.Request, kind: JobKind) -> web.StreamResponse:
    return await _answer(request, dialects.parse(kind, await read_body(request)))


async def _answer(request: web.Request, job: Job) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    name = state.find(job.model)
    if name is None:
        raise Reject(404, f"model '{job.model}' not found")
    if bodies.is_embedding(name):
        raise Reject(400, f'"{job.model}" does not support {job.verb}')
    if job.load_only:
        return await _load_only(request, state, job, name)
    return await _run(request, state, job, name)


async def _run(
    request: web.Request, state: EmulatorState, job: Job, name: str
) -> web.StreamResponse:
    # Like Ollama, load_duration runs from the request's start until its model is in
    # memory, so it includes the concurrency gate's queue, but not a wait for a busy slot.
    start = time.perf_counter_ns()
    await state.admit(request)
    try:
        gated = time.perf_counter_ns()
        lease, load_ns = await state.acquire(request, name, job.tokens, job.keep_alive, job.context)
        cfg = state.config
        holds = job.tokens[: lease.cached]  # what the slot keeps if the request stops early
        try:
            if transfer := state.transfer_seconds(lease):
                await hold(request, transfer)
            loaded = first = time.perf_counter_ns()
            # without a slot model, counted as before (and nothing is cached)
            evaluated = fmt.prompt_tokens(job.prompt) if lease.slot is None else lease.evaluated
            whole = cfg.prompt_count == "whole" and lease.slot is not None
            prompt_count = lease.cached + evaluated if whole else evaluated
            state.stats.prompt_tokens_evaluated += evaluated
            state.stats.prompt_tokens_cached += lease.cached
            # The modelled evaluation time is what the answer reports, so that timings
            # read from answers do not depend on how busy the emulator's host is.
            prompt_s = evaluated / cfg.prompt_rate if cfg.prompt_rate else 0.0
            if prompt_s:
                await hold(request, prompt_s)
            holds = job.tokens
            count = cfg.tokens if job.limit is None or job.limit < 0 else min(cfg.tokens, job.limit)
            tokens = fmt.answer(job.prompt, count)
            sink = None
            if job.stream:
                kind = "text/event-stream" if job.openai else "application/x-ndjson"
                sink = Sink(request, kind, error=fmt.ERR_RUNNER_GONE, openai=job.openai)
            for i, token in enumerate(tokens):
                if i and cfg.token_delay:
                    await hold(request, cfg.token_delay)
                elif not i:
                    first = time.perf_counter_ns()
                if sink is not None:
                    await sink.send(dialects.chunk(job, token))
            end = time.perf_counter_ns()
            text = "".join(tokens)
            holds = job.tokens + tok.reply(text)
        finally:
            state.finish(lease, holds, job.keep_alive)
        reason = "length" if count < cfg.tokens else "stop"
        stats = fmt.metrics(
            total=end - start,
            load=max(1, gated - start + load_ns),
            prompt_count=prompt_count,
            prompt_ns=round(prompt_s * 1e9) or max(1, first - loaded),
            eval_count=count,
            eval_ns=max(1, end - first) if count else 0,
        )
        if sink is None:
            answer = dialects.final(job, text, reason, stats)
            return await single(request, answer, openai=job.openai)
        await sink.send(dialects.closing(job, reason, stats, text), last=True)
        state.stats.completed += 1
        return sink.response
    finally:
        state.release()


async def _load_only(
    request: web.Request, state: EmulatorState, job: Job, name: str
) -> web.StreamResponse:
    if job.keep_alive == 0:
        state.unload(name)
        return json_response(fmt.load_reply(job, "unload"))
    await state.admit(request)
    try:
        lease, _ = await state.acquire(request, name, None, job.keep_alive, job.context)
        state.finish(lease, None, job.keep_alive)
    finally:
        state.release()
    return json_response(fmt.load_reply(job, "load"))


async def generate(request: web.Request) -> web.StreamResponse:
    return await _generation(request, "generate")


async def chat(request: web.Request) -> web.StreamResponse:
    return await _generation(request, "chat")


async def v1_chat(request: web.Request) -> web.StreamResponse:
    return await _generation(request, "v1chat")


async def v1_completions(request: web.Request) -> web.StreamResponse:
    return await _generation(request, "v1completion")


async def messages(request: web.Request) -> web.StreamResponse:
    return await _generation(request, "messages")


async def responses(request: web.Request) -> web.StreamResponse:
    return await _generation(request, "responses")


async def transcriptions(request: web.Request) -> web.StreamResponse:
    job = await dialects.parse_transcription(request)
    answer = await _answer(request, job)
    if job.extra.get("text") and isinstance(answer, web.Response) and answer.status == 200:
        # response_format=text: the transcript alone, as text/plain
        text = json.loads(answer.body if isinstance(answer.body, bytes) else b"{}")["text"]
        return web.Response(text=text, content_type="text/plain", charset=None)
    return answer
