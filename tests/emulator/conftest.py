"""Fixtures of the emulator's tests: a running emulator, the official clients, a session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import ollama
import openai
import pytest

from daemon.emulator.server import Emulator, EmulatorConfig
from tests.emulator.support import MODELS


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    async with Emulator(EmulatorConfig(models=MODELS)) as emulator:
        yield emulator


@pytest.fixture
async def ollama_client(emu: Emulator) -> AsyncIterator[ollama.AsyncClient]:
    async with ollama.AsyncClient(host=emu.url) as client:
        yield client


@pytest.fixture
async def openai_client(emu: Emulator) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=emu.url + "/v1", api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session
