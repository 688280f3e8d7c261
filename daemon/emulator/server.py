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

This module holds the application, the server and ``olmd emulate``; the rest lives in
``config`` (EmulatorConfig, Stats), ``state`` (the live node and its gates), ``slots``
(models in memory, slots and their KV caches), ``hostcache`` (llama-server's slot choice
and host-RAM prompt cache), ``tokens`` (the tokenizer), ``responses``
(answers, faults, the middleware), ``generation`` and ``handlers`` (the routes),
``formats`` (requests and generated answers) and ``bodies`` (bodies that describe models).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import get_args

from aiohttp import web
from pydantic import ValidationError

from daemon.emulator.config import EmulatorConfig, FaultKind, PromptCount, Stats, describe
from daemon.emulator.handlers import add_routes
from daemon.emulator.responses import middleware
from daemon.emulator.state import STATE_KEY, EmulatorState

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


# ---------------------------------------------------------------- application


def create_app(config: EmulatorConfig | None = None) -> web.Application:
    """The emulator as an aiohttp application; its live state is ``app[STATE_KEY]``."""
    return _build_app(EmulatorState(config or EmulatorConfig()))


def _build_app(state: EmulatorState) -> web.Application:
    app = web.Application(middlewares=[middleware])
    app[STATE_KEY] = state
    add_routes(app)
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
        self.state.models.clear()

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
    ("--num-parallel", "num_parallel", int, "slots per loaded model, 0 = no slot model"),
    (
        "--prompt-rate",
        "prompt_rate",
        float,
        "prompt tokens a slot evaluates per second, 0 = instant",
    ),
    ("--max-loaded", "max_loaded", int, "models in memory at once, 0 = unlimited"),
    ("--registry", "registry", str, "where pulls of names without a host go (http://h:p)"),
    (
        "--cache-tokens",
        "cache_tokens",
        int,
        "host-RAM prompt cache per loaded model in tokens (llama-server's --cache-ram), 0 = off",
    ),
    (
        "--restore-rate",
        "restore_rate",
        float,
        "tokens per second copied to or from the host cache, 0 = ten times --prompt-rate",
    ),
    ("--pull-size", "pull_size", int, "bytes one pull transfers"),
    ("--pull-speed", "pull_speed", float, "pull bytes per second, 0 = unlimited"),
    ("--concurrency", "concurrency", int, "requests generating at once, 0 = unlimited"),
    (
        "--queue",
        "queue",
        int,
        "requests that may wait for a model to load, or beyond --concurrency, before a 503",
    ),
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
    add(
        "--prompt-count",
        choices=get_args(PromptCount),
        default="whole",
        help="what prompt_eval_count counts: the whole prompt (llama-server) or only the "
        "evaluated tokens (older Ollama) (default: %(default)s)",
    )
    for flag, key, kind, text in _FLAGS:
        default = EmulatorConfig.model_fields[key].default
        add(flag, type=kind, default=default, help=f"{text} (default: %(default)s)")


def run_from_args(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; 0 on a clean stop, 2 on a bad flag value."""
    values = {key: getattr(args, flag[2:].replace("-", "_")) for flag, key, _, _ in _FLAGS}
    values.update(fault=args.fault, unavailable=args.unavailable, prompt_count=args.prompt_count)
    if args.models is not None:
        values["models"] = args.models
    try:
        config = EmulatorConfig.model_validate(values)
    except ValidationError as exc:
        print(f"olmd emulate: {describe(exc)}", file=sys.stderr)
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
