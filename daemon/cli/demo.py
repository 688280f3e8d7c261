"""``olmd demo``: two emulated nodes (weights 2 and 1) and the daemon, in one process."""

from __future__ import annotations

import contextlib

from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.runtime import Runtime
from daemon.service import serve
from daemon.settings import Settings

NODES = (
    ("gpu-a", 2, ["llama3.1:8b", "qwen3-coder:30b", "nomic-embed-text"]),
    ("gpu-b", 1, ["llama3.1:8b", "nomic-embed-text"]),
)


def demo_settings(port: int, emulators: list[tuple[str, int, Emulator]]) -> Settings:
    return Settings(
        server={"host": "127.0.0.1", "port": port},
        # The nightly job would write a manifest into the working tree; POST /admin/sync
        # (with OLMD_ADMIN_TOKEN set) still runs one on demand.
        jobs={"ollama_sync": {"enabled": False}},
        services={
            "ollama": {
                "baseline_models": ["llama3.1:8b"],
                "nodes": [
                    {"name": name, "host": "127.0.0.1", "port": emu.port, "weight": weight}
                    for name, weight, emu in emulators
                ],
            }
        },
    )


CHAT = '{"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]}'
GENERATE = '{"model": "llama3.1:8b", "prompt": "hi", "stream": false}'
OLLAMA_CLIENT = (
    "import ollama, sys; c = ollama.Client(host=sys.argv[1]); "
    "print(c.chat(model='llama3.1:8b', messages=[{'role': 'user', 'content': 'hi'}]))"
)
OPENAI_CLIENT = (
    "import openai, sys; c = openai.OpenAI(base_url=sys.argv[1] + '/v1', api_key='demo'); "
    "print(c.chat.completions.create(model='llama3.1:8b', "
    "messages=[{'role': 'user', 'content': 'hi'}]).choices[0].message.content)"
)


def instructions(port: int, emulators: list[tuple[str, int, Emulator]]) -> str:
    url = f"http://127.0.0.1:{port}"
    nodes = "\n".join(
        f"  {name:6} weight {weight}  {emu.url}  models: {', '.join(emu.state.config.models)}"
        for name, weight, emu in emulators
    )
    return f"""
olmd demo is running.

Emulated Ollama nodes:
{nodes}
olmd:  {url}   (health {url}/healthz, readiness {url}/readyz, metrics {url}/metrics)

Try:
  curl {url}/readyz
  curl -s {url}/metrics | grep olmd_
  curl {emulators[0][2].url}/api/tags
  curl {url}/api/tags
  curl {url}/api/chat -d '{CHAT}'
  curl {url}/v1/chat/completions -d '{CHAT}'
  curl -si {url}/api/generate -d '{GENERATE}' | grep -i x-olmd-node

  .venv/bin/python -c "{OLLAMA_CLIENT}" {url}
  .venv/bin/python -c "{OPENAI_CLIENT}" {url}

Ctrl-C stops the demo.
"""


async def run(port: int = 11435) -> int:
    async with contextlib.AsyncExitStack() as stack:
        emulators = []
        for name, weight, models in NODES:
            emu = await stack.enter_async_context(
                Emulator(EmulatorConfig(name=name, models=models), host="127.0.0.1", port=0)
            )
            emulators.append((name, weight, emu))
        settings = demo_settings(port, emulators)

        def ready(runtime: Runtime, bound: int) -> None:
            print(instructions(bound, emulators), flush=True)

        return await serve(settings, on_ready=ready)
