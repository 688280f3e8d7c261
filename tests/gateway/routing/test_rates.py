"""What routing learns from final chunks: only samples that mean what they seem to.

The prompt rate is learned right from nodes that count the whole prompt in
``prompt_eval_count`` (llama-server) and from nodes that count only evaluated tokens (older
Ollama): with final chunks as each writes them, and with a real emulator in each mode
behind the router.
"""

from __future__ import annotations

import aiohttp
import pytest

from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.gateway.fleet import Fleet
from daemon.gateway.routing.prompts import read_prompt
from daemon.gateway.routing.rates import Defaults, Mean, Rates, Sample
from daemon.gateway.routing.router import Router
from daemon.ports import RouteRequest
from daemon.settings import NodeSettings, RoutingSettings

M = "llama3.1:8b"
DEFAULTS = Defaults(load_seconds=10.0, seconds_per_prompt_token=0.001, service_seconds=5.0)


def test_unmeasured_figures_are_the_defaults() -> None:
    rates = Rates(DEFAULTS)
    assert rates.load_seconds("a", M) == 10.0
    assert rates.seconds_per_prompt_token("a", M) == 0.001
    assert rates.service_seconds("a", M) == 5.0


def test_a_load_time_is_learned_only_from_an_expected_cold_load() -> None:
    rates = Rates(DEFAULTS)
    rates.learn("a", M, Sample(load_ns=3_000_000), expected_cold=False, cached=0)
    assert rates.load_seconds("a", M) == 10.0
    rates.learn("a", M, Sample(load_ns=2_000_000_000), expected_cold=True, cached=0)
    assert rates.load_seconds("a", M) == 2.0


def test_a_prompt_rate_is_learned_only_with_nothing_cached() -> None:
    rates = Rates(DEFAULTS)
    hit = Sample(prompt_count=4000, prompt_ns=10_000_000)  # cached tokens counted or not
    rates.learn("a", M, hit, expected_cold=False, cached=3900)
    assert rates.seconds_per_prompt_token("a", M) == 0.001
    rates.learn(
        "a", M, Sample(prompt_count=1000, prompt_ns=500_000_000), expected_cold=False, cached=0
    )
    assert rates.seconds_per_prompt_token("a", M) == pytest.approx(0.0005)
    rates.learn("a", M, Sample(prompt_count=3, prompt_ns=9_000_000_000), expected_cold=False,
                cached=0)  # fmt: skip
    assert rates.seconds_per_prompt_token("a", M) == pytest.approx(0.0005)  # too few tokens


def test_means_follow_a_node_that_slows_down() -> None:
    rates = Rates(DEFAULTS)
    for _ in range(10):
        rates.learn("a", M, Sample(held_seconds=1.0), expected_cold=False, cached=0)
    for _ in range(8):
        rates.learn("a", M, Sample(held_seconds=3.0), expected_cold=False, cached=0)
    assert 2.8 < rates.service_seconds("a", M) < 3.0


def test_an_unmeasured_node_borrows_the_fleets_mean_for_the_model() -> None:
    rates = Rates(DEFAULTS)
    rates.learn("a", M, Sample(held_seconds=2.0), expected_cold=False, cached=0)
    rates.learn("b", M, Sample(held_seconds=4.0), expected_cold=False, cached=0)
    assert rates.service_seconds("c", M) == 3.0
    assert rates.service_seconds("c", "other:latest") == 5.0
    rates.forget("b")
    assert rates.service_seconds("c", M) == 2.0


def test_describe_shows_rates_per_second() -> None:
    rates = Rates(DEFAULTS)
    sample = Sample(
        load_ns=1_500_000_000, prompt_count=200, prompt_ns=100_000_000, eval_count=50,
        eval_ns=1_000_000_000, held_seconds=2.5,
    )  # fmt: skip
    rates.learn("a", M, sample, expected_cold=True, cached=0)
    assert rates.describe("a") == {
        M: {
            "load_seconds": 1.5,
            "prompt_tokens_per_second": 2000.0,
            "tokens_per_second": 50.0,
            "service_seconds": 2.5,
            "samples": 1,
            "prompt_count": None,  # no cached request yet to tell
        }
    }


def chunk(count: int, evaluated: int, *, whole: bool, rate: float = 1000.0) -> Sample:
    """A final chunk as a node of each reading writes it: the duration is the evaluated part's."""
    return Sample(prompt_count=count if whole else evaluated, prompt_ns=int(evaluated / rate * 1e9))


@pytest.mark.parametrize("whole", [True, False])
def test_the_reading_is_learned_from_mostly_cached_requests(whole: bool) -> None:
    rates = Rates(DEFAULTS)
    for i in range(3):  # olmd expects 900 of 1000 tokens cached, the node agrees
        sample = chunk(1000, 100, whole=whole, rate=500)
        rates.learn("a", M, sample, expected_cold=False, cached=900, prompt_tokens=1000,
                    conversation=i)  # fmt: skip
    assert rates.describe("a")[M]["prompt_count"] == ("whole" if whole else "evaluated")
    # the evaluated part: the count itself, or (first turns) its share olmd expects uncached
    assert rates.seconds_per_prompt_token("a", M) == pytest.approx(0.002)
    # a later turn of a conversation: learned from only where the count is the evaluated part
    sample = chunk(1000, 100, whole=whole, rate=250)
    rates.learn("a", M, sample, expected_cold=False, cached=900, prompt_tokens=1000,
                conversation=0)  # fmt: skip
    assert rates.seconds_per_prompt_token("a", M) == pytest.approx(0.002 if whole else 0.0026)


def test_a_whole_count_learns_from_new_conversations_and_sets_fast_samples_aside() -> None:
    rates = Rates(Defaults(10.0, 0.5, 5.0))

    def learn(sample: Sample, cached: int, total: int, conversation: int) -> float:
        rates.learn("a", M, sample, expected_cold=False, cached=cached, prompt_tokens=total,
                    conversation=conversation)  # fmt: skip
        return rates.seconds_per_prompt_token("a", M)

    for i in range(3):  # new conversations, nothing cached
        assert learn(chunk(400, 400, whole=True), 0, 400, i) == pytest.approx(0.001)
    # a shared system prompt of 100 tokens cached: the rest is learned from, in proportion
    assert learn(chunk(400, 300, whole=True), 100, 400, 3) == pytest.approx(0.001)
    # a later turn is not learned from, whatever olmd expects cached
    assert learn(chunk(800, 790, whole=True, rate=500), 0, 800, 3) == pytest.approx(0.001)
    # a new conversation that the node held anyway (olmd's index forgot): set aside ...
    assert learn(chunk(400, 20, whole=True), 0, 400, 4) == pytest.approx(0.001)
    assert learn(chunk(400, 20, whole=True), 0, 400, 5) == pytest.approx(0.001)
    # ... unless it goes on: the node did get faster
    assert learn(chunk(400, 20, whole=True), 0, 400, 6) < 0.001


async def test_learned_prompt_rate_matches_the_emulator_in_both_readings() -> None:
    """Real answers of an emulator with llama-server's slot choice and host cache, in each
    reading, fed to the router's learning: three conversations on one slot, then six, more
    than olmd's prefix index holds, so later turns come back from the host cache
    unannounced (a whole count then looks far too fast)."""
    rate = 20_000.0
    for mode in ("whole", "evaluated"):
        config = EmulatorConfig(models=[M], num_parallel=1, prompt_rate=rate, tokens=8,
                                prompt_count=mode)  # fmt: skip
        async with Emulator(config) as emu, aiohttp.ClientSession() as http:
            router, naive = await _conversations(emu, http)
        learned = router.rates.describe("a")[M]
        assert learned["prompt_count"] == mode  # the reading, told from the answers
        # within 10% of the emulator's rate; a learner taking every uncached count
        # as evaluated would not be, on the node counting whole prompts
        assert router.rates.seconds_per_prompt_token("a", M) == pytest.approx(1 / rate, rel=0.1)
        if mode == "whole":
            assert naive.value < 0.5 / rate
        stats = emu.state.stats  # later turns did come back from the host cache
        assert stats.cache_restored > 0 and stats.prompt_tokens_cached > 1000


async def _conversations(emu: Emulator, http: aiohttp.ClientSession) -> tuple[Router, Mean]:
    settings = RoutingSettings(strategy="adaptive")
    fleet = Fleet([NodeSettings(name="a", host="127.0.0.1", port=emu.port, parallel=1)], settings)
    node = fleet.get("a")
    assert node is not None
    fleet.probe_ok(node, 0.0, version="0.33.0", tags=[{"name": M}], ps=[{"name": M}])
    router = Router(fleet, settings, lambda: 0.0)
    naive = Mean()
    histories = [
        [{"role": "user", "content": f"Conversation {i}. " + "Some pasted text. " * 60}]
        for i in range(9)
    ]
    # Three conversations the prefix index keeps track of, then six, more than it holds.
    for group in (histories[:3], histories[3:]):
        for turn in range(3):
            for history in group:
                await _turn(emu, http, router, naive, history, turn)
    return router, naive


async def _turn(
    emu: Emulator,
    http: aiohttp.ClientSession,
    router: Router,
    naive: Mean,
    history: list[dict[str, str]],
    turn: int,
) -> None:
    body = {"model": M, "messages": history, "stream": False}
    prompt = read_prompt("/api/chat", body, M)
    route = await router.acquire(RouteRequest(M, prompt.total_tokens, prompt.conversation), prompt)
    async with http.post(emu.url + "/api/chat", json=body) as resp:
        final = await resp.json()
    sample = Sample(
        prompt_count=final["prompt_eval_count"], prompt_ns=final["prompt_eval_duration"],
        eval_count=final["eval_count"], eval_ns=final["eval_duration"],
    )  # fmt: skip
    if not route.cached_tokens and sample.prompt_count >= 16:  # the former rule
        naive.add(sample.prompt_ns / 1e9 / sample.prompt_count)
    router.complete(route, sample)
    router.release(route)
    history += [final["message"], {"role": "user", "content": f"Then what about part {turn}? " * 8}]
