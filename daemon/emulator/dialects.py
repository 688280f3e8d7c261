"""The generation routes in other APIs' clothes, as Ollama's middleware dresses its chat:
each request read into a :class:`~daemon.emulator.formats.Job`, each answer rendered in
the job's own API. Ollama's and OpenAI's chat and completions are ``formats``';
Anthropic's Messages ``anthropic``'s; the Responses API ``responses_api``'s; an audio
transcription (a multipart form) is read here and answered whole, ``{"text": ...}``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from aiohttp import web

from daemon.emulator import anthropic, responses_api
from daemon.emulator import formats as fmt
from daemon.emulator import tokens as tok
from daemon.emulator.formats import Job, JobKind, Reject

# Ollama's words to the model (openai.FromTranscriptionRequest).
_TRANSCRIBE = (
    "Transcribe the audio exactly as spoken. Output only the spoken words. "
    "Do not answer any question in the audio."
)


def parse(kind: JobKind, body: dict[str, Any]) -> Job:
    if kind == "messages":
        return anthropic.parse(body)
    if kind == "responses":
        return responses_api.parse(body)
    return fmt.parse_job(kind, body)


async def parse_transcription(request: web.Request) -> Job:
    """A ``multipart/form-data`` transcription request, checked as Ollama checks it."""
    try:
        form = await request.post()
    except ValueError as exc:
        raise Reject(400, f"failed to parse multipart form: {exc}") from None
    if not request.content_type.startswith("multipart/"):
        raise Reject(
            400, "failed to parse multipart form: request Content-Type isn't multipart/form-data"
        )
    model = form.get("model")
    if not isinstance(model, str) or not model:
        raise Reject(400, "model is required")
    upload = form.get("file")
    if not isinstance(upload, web.FileField):
        raise Reject(400, "file is required: http: no such file")
    audio = upload.file.read()
    if not audio:
        raise Reject(400, "audio file is empty")
    system = _TRANSCRIBE
    language, prompt = form.get("language"), form.get("prompt")
    if isinstance(language, str) and language:
        system += f" The audio is in {language}."
    if isinstance(prompt, str) and prompt:
        system += f" Context: {prompt}"
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": system},
        {"role": "user", "content": "What exact words are spoken in this audio?"},
    ]
    job = fmt.parse_job("chat", {"model": model, "messages": messages, "stream": False})
    # The audio goes in as an image does: by its digest, so equal clips share a cache.
    messages[1]["images"] = [hashlib.sha256(audio).hexdigest()]
    text_only = form.get("response_format") == "text"
    return dataclasses.replace(
        job, kind="transcription", tokens=tok.chat(messages), extra={"text": text_only}
    )


def chunk(job: Job, token: str) -> bytes:
    if job.kind == "messages":
        return anthropic.chunk(job, token)
    if job.kind == "responses":
        return responses_api.chunk(job, token)
    return fmt.chunk(job, token)


def closing(job: Job, reason: str, stats: dict[str, int], reply: str) -> bytes:
    if job.kind == "messages":
        return anthropic.closing(job, reason, stats)
    if job.kind == "responses":
        return responses_api.closing(job, stats, reply)
    return fmt.closing(job, reason, stats, reply)


def final(job: Job, text: str, reason: str, stats: dict[str, int]) -> dict[str, Any]:
    if job.kind == "messages":
        return anthropic.final(job, text, reason, stats)
    if job.kind == "responses":
        return responses_api.final(job, text, stats)
    if job.kind == "transcription":
        return {"text": text.strip()}
    return fmt.final(job, text, reason, stats)
