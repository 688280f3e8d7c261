"""What routing learns from final chunks: only samples that mean what they seem to."""

from __future__ import annotations

import pytest

from daemon.gateway.routing.rates import Defaults, Rates, Sample

M = "m:latest"
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
        }
    }
