"""An Ollama stand-in for tests, the demo and the benchmark: Ollama's HTTP API, no GPU.

``server`` builds and runs it; ``config`` is its tunable behaviour, ``state`` what it holds,
``slots`` and ``tokens`` its performance model (slots, KV caches, residency, tokenizer),
``generation`` and ``handlers`` the routes, ``responses`` streaming and faults, ``bodies``
and ``formats`` the wire shapes. The emulator imports nothing of olmd outside this package
(only the standard library, aiohttp and pydantic), so it behaves as an independent node
would.
"""
