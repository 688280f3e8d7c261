"""``olmd demo``: two emulated nodes (weights 2 and 1) and the daemon, in one process.

The nodes behave like small GPU nodes, slowed down so that routing shows: two slots per
model, prompts evaluated at 1 000 tokens a second, 50 tokens a second generated per slot,
a 3-second cold load, two models in memory at most. A conversation's second turn on the
node that holds its cache starts at once; anywhere else it pays the whole prompt again.
"""

from __future__ import annotations

import contextlib

from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.runtime import Runtime
from daemon.service import serve
from daemon.settings import Settings

# The performance model of both nodes (see daemon/emulator/config.py).
PERFORMANCE = {
    "num_parallel": 2,
    "prompt_rate": 1000.0,
    "token_delay": 0.02,
    "tokens": 20,
    "load_delay": 3.0,
    "max_loaded": 2,
}
NODES = (
    ("gpu-a", 2, ["llama3.1:8b", "qwen3-coder:30b", "nomic-embed-text"]),
    ("gpu-b", 1, ["llama3.1:8b", "nomic-embed-text"]),
)


def demo_settings(
    port: int, emulators: list[tuple[str, int, Emulator]], strategy: str = "adaptive"
) -> Settings:
    return Settings(
        server={"host": "127.0.0.1", "port": port},
        routing={
            "strategy": strategy,
            "parallel": PERFORMANCE["num_parallel"],
            "cold_load_seconds": PERFORMANCE["load_delay"],
            "affinity_entries_per_slot": 1,  # an emulated slot keeps one conversation
            "probe_interval": 2.0,
        },
        # The nightly job would write a manifest into the working tree; POST /admin/sync
        # (with OLMD_ADMIN_TOKEN set) still runs one on demand.
        jobs={"ollama_sync": {"enabled": False}},
        services={
            "ollama": {
                "baseline_models": ["llama3.1:8b"],
                "nodes": [
                    {
                        "name": name,
                        "host": "127.0.0.1",
                        "port": emu.port,
                        "weight": weight,
                        "max_loaded_models": PERFORMANCE["max_loaded"],
                    }
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
# Three turns of one conversation with a long first message: where each went, and why.
CONVERSATION = (
    "import json, sys, time, urllib.request as u; url = sys.argv[1] + '/api/chat'; "
    "h = [{'role': 'user', 'content': 'Summarise: ' + 'a long document. ' * 1500}]\n"
    "for turn in (1, 2, 3):\n"
    "    t = time.time(); body = {'model': 'llama3.1:8b', 'messages': h, 'stream': False}\n"
    "    r = u.urlopen(u.Request(url, json.dumps(body).encode())); a = json.load(r)\n"
    "    print('turn', turn, 'node', r.headers['X-Olmd-Node'], 'route', "
    "r.headers['X-Olmd-Route'], '%.1f s' % (time.time() - t), "
    "'prompt', a['prompt_eval_count'], 'tokens, evaluated in %.2f s' "
    "% (a['prompt_eval_duration'] / 1e9))\n"
    "    h += [a['message'], {'role': 'user', 'content': 'and then?'}]"
)
OPENAI_CLIENT = (
    "import openai, sys; c = openai.OpenAI(base_url=sys.argv[1] + '/v1', api_key='demo'); "
    "print(c.chat.completions.create(model='llama3.1:8b', "
    "messages=[{'role': 'user', 'content': 'hi'}]).choices[0].message.content)"
)


def instructions(
    port: int, emulators: list[tuple[str, int, Emulator]], strategy: str = "adaptive"
) -> str:
    url = f"http://127.0.0.1:{port}"
    nodes = "\n".join(
        f"  {name:6} weight {weight}  {emu.url}  models: {', '.join(emu.state.config.models)}"
        for name, weight, emu in emulators
    )
    return f"""
olmd demo is running.

Emulated Ollama nodes:
{nodes}
olmd:  {url}   strategy {strategy}   (health {url}/healthz, readiness {url}/readyz,
       metrics {url}/metrics)

The nodes act like small GPU nodes: {PERFORMANCE["num_parallel"]} slots per model, prompts \
evaluated at {PERFORMANCE["prompt_rate"]:g} tokens/s,
a {PERFORMANCE["load_delay"]:g} s cold load, {PERFORMANCE["max_loaded"]} models in memory \
at most (X-Olmd-Route says why a node was chosen).

Try:
  curl {url}/readyz
  curl -s {url}/metrics | grep olmd_
  curl {emulators[0][2].url}/api/tags
  curl {url}/api/tags
  curl {url}/api/chat -d '{CHAT}'
  curl {url}/v1/chat/completions -d '{CHAT}'
  curl -si {url}/api/generate -d '{GENERATE}' | grep -i x-olmd-

  # a conversation: the follow-ups go where its cache is, and evaluate only the new tokens
  .venv/bin/python -c "{CONVERSATION}" {url}
  # the weights, strictly: restart with `olmd demo --strategy weighted`, then
  for i in $(seq 30); do curl -si {url}/api/generate -d '{GENERATE}' | grep -i x-olmd-node; \
done | sort | uniq -c

  .venv/bin/python -c "{OLLAMA_CLIENT}" {url}
  .venv/bin/python -c "{OPENAI_CLIENT}" {url}

Ctrl-C stops the demo.
"""


async def run(port: int = 11435, strategy: str = "adaptive") -> int:
    async with contextlib.AsyncExitStack() as stack:
        emulators = []
        for name, weight, models in NODES:
            emu = await stack.enter_async_context(
                Emulator(
                    EmulatorConfig(name=name, models=models, **PERFORMANCE),
                    host="127.0.0.1",
                    port=0,
                )
            )
            emulators.append((name, weight, emu))
        settings = demo_settings(port, emulators, strategy)

        def ready(runtime: Runtime, bound: int) -> None:
            print(instructions(bound, emulators, strategy), flush=True)

        return await serve(settings, on_ready=ready)
