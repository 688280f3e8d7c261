"""Fixtures the sync tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from structlog.testing import capture_logs

from daemon.emulator.server import Emulator, EmulatorConfig
from tests.sync.support import SMALL_PULL


@pytest.fixture
def captured_logs() -> Iterator[None]:
    """Log events go to a list, not to a stream an earlier test's CLI run configured
    (and pytest has since closed)."""
    with capture_logs():
        yield


@pytest.fixture
async def nodes() -> AsyncIterator[tuple[Emulator, Emulator]]:
    """Node a holds llama3.1:8b; node b holds llama3.1:8b and qwen3:8b."""
    a = Emulator(EmulatorConfig(name="a", models=["llama3.1:8b"], **SMALL_PULL))
    b = Emulator(EmulatorConfig(name="b", models=["llama3.1:8b", "qwen3:8b"], **SMALL_PULL))
    async with a, b:
        yield a, b
