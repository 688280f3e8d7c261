"""OpenAI's Responses API as Ollama answers it (``POST /v1/responses``): the request read
as a chat, the answer as a response object or as the Responses stream's named events.

Read from ollama's ``middleware/openai.go`` (ResponsesMiddleware) and
``openai/responses.go``: ``instructions`` become the system message, ``input`` a string or
a list of messages, ``max_output_tokens`` the limit; not streamed unless ``stream`` is
true. The stream is ``response.created``, ``response.in_progress``, the message item and
its text part opened, ``response.output_text.delta`` per token, the text, part and item
closed, and ``response.completed`` with the usage; every event numbered. Event bodies
are Go maps, so their keys come sorted; the whole answer is a Go struct, in field order.
Pure.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from typing import Any

from daemon.emulator import formats as fmt
from daemon.emulator.formats import Job, Reject


def _content(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else ()
    return "".join(
        p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)
    )


def parse(body: dict[str, Any]) -> Job:
    chat: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        chat.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        if items:
            chat.append({"role": "user", "content": items})
    elif isinstance(items, list):
        for item in items:
            if not isinstance(item, dict):
                raise Reject(400, "input must be a string or array")
            if item.get("type") == "function_call_output":
                chat.append({"role": "tool", "content": str(item.get("output", ""))})
            elif "role" in item:
                chat.append({"role": item["role"], "content": _content(item.get("content"))})
    elif items is not None:
        raise Reject(400, "input must be a string or array")
    limit = body.get("max_output_tokens")
    options = {"num_predict": limit} if isinstance(limit, int) else {}
    stream = body.get("stream") is True
    job = fmt.parse_job(
        "chat", {"model": body.get("model"), "messages": chat, "stream": stream, "options": options}
    )
    number = random.randrange(999_999)
    echo = {
        "instructions": instructions if isinstance(instructions, str) and instructions else None,
        "max_output_tokens": limit if isinstance(limit, int) else None,
        "temperature": _number(body.get("temperature")),
        "top_p": _number(body.get("top_p")),
        "truncation": body.get("truncation") or "disabled",
        "background": body.get("background") is True,
        "item": f"msg_{number}",
    }
    return dataclasses.replace(
        job, kind="responses", rid=f"resp_{number}", created=int(time.time()), extra=echo
    )


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 1.0


def _usage(stats: dict[str, int]) -> dict[str, Any]:
    prompt, completion = stats.get("prompt_eval_count", 0), stats.get("eval_count", 0)
    return {
        "input_tokens": prompt,
        "output_tokens": completion,
        "total_tokens": prompt + completion,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _item(job: Job, text: str, status: str) -> dict[str, Any]:
    content = [_part(text)] if status == "completed" else []
    item = {"id": job.extra["item"], "type": "message", "status": status, "role": "assistant"}
    return item | {"content": content}


def _response(
    job: Job, status: str, output: list[Any], usage: dict[str, Any] | None
) -> dict[str, Any]:
    """The response object in its Go field order, with what the request asked echoed."""
    echo = job.extra
    return {
        "id": job.rid,
        "object": "response",
        "created_at": job.created,
        "completed_at": int(time.time()) if status == "completed" else None,
        "status": status,
        "incomplete_details": None,
        "model": job.model,
        "previous_response_id": None,
        "instructions": echo["instructions"],
        "output": output,
        "error": None,
        "tools": [],
        "tool_choice": "auto",
        "truncation": echo["truncation"],
        "parallel_tool_calls": True,
        "text": {"format": {"type": "text"}},
        "top_p": echo["top_p"],
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "top_logprobs": 0,
        "temperature": echo["temperature"],
        "reasoning": None,
        "usage": usage,
        "max_output_tokens": echo["max_output_tokens"],
        "max_tool_calls": None,
        "store": False,
        "background": echo["background"],
        "service_tier": "default",
        "metadata": {},
        "safety_identifier": None,
        "prompt_cache_key": None,
    }


def _event(job: Job, kind: str, data: dict[str, Any]) -> bytes:
    data = data | {"type": kind, "sequence_number": job.events}
    job.events += 1
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    return b"event: " + kind.encode() + b"\ndata: " + body.encode() + b"\n\n"


def _opening(job: Job) -> bytes:
    created = _response(job, "in_progress", [], None)
    return _event(job, "response.created", {"response": created}) + _event(
        job, "response.in_progress", {"response": created}
    )


def chunk(job: Job, token: str) -> bytes:
    """One token as ``response.output_text.delta``; the first opens the response, the
    message item and its text part."""
    out = b""
    where = {"item_id": job.extra["item"], "output_index": 0}
    if job.events == 0:
        out = _opening(job)
        out += _event(
            job,
            "response.output_item.added",
            {"output_index": 0, "item": _item(job, "", "in_progress")},
        )
        out += _event(
            job, "response.content_part.added", where | {"content_index": 0, "part": _part("")}
        )
        job.extra["started"] = True
    delta = where | {"content_index": 0, "delta": token, "logprobs": []}
    return out + _event(job, "response.output_text.delta", delta)


def closing(job: Job, stats: dict[str, int], reply: str) -> bytes:
    """The events that end a stream: the text, part and item done, then the response."""
    out = b"" if job.events else _opening(job)
    output: list[Any] = []
    if job.extra.get("started"):
        where = {"item_id": job.extra["item"], "output_index": 0, "content_index": 0}
        out += _event(job, "response.output_text.done", where | {"text": reply, "logprobs": []})
        out += _event(job, "response.content_part.done", where | {"part": _part(reply)})
        item = _item(job, reply, "completed")
        out += _event(job, "response.output_item.done", {"output_index": 0, "item": item})
        output.append(item)
    done = _response(job, "completed", output, _usage(stats))
    return out + _event(job, "response.completed", {"response": done})


def final(job: Job, text: str, stats: dict[str, int]) -> dict[str, Any]:
    """The whole response, as ``ToResponse`` builds it."""
    return _response(job, "completed", [_item(job, text, "completed")], _usage(stats))
