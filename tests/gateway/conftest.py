"""Fixtures the gateway tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from daemon.emulator.server import Emulator, EmulatorConfig
from tests.gateway.support import MODEL


@pytest.fixture
async def three() -> AsyncIterator[list[tuple[str, int, Emulator]]]:
    """Nodes a, b, c with weights 3, 1, 1; c lacks the model."""
    emulators = [
        Emulator(EmulatorConfig(name="a", models=[MODEL, "nomic-embed-text"])),
        Emulator(EmulatorConfig(name="b", models=[MODEL, "nomic-embed-text"])),
        Emulator(EmulatorConfig(name="c", models=["qwen3-coder:30b"])),
    ]
    for emu in emulators:
        await emu.start()
    yield [("a", 3, emulators[0]), ("b", 1, emulators[1]), ("c", 1, emulators[2])]
    for emu in emulators:
        await emu.stop()
