"""The pure parts of tenancy: fair shares, limits, keys, the usage book."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from daemon.sections import TenantSettings
from daemon.tenancy.fair import BATCH, FairShares, Share
from daemon.tenancy.keys import KeyDirectory, KeysFileError, add_key, read_keys
from daemon.tenancy.limits import TenantLimits, duration
from daemon.tenancy.usage import UsageBook

DAY = 86400.0


def serve(fair: FairShares, backlog: dict[Share, int], turns: int) -> list[str]:
    order = []
    for _ in range(turns):
        waiting = [s for s, n in backlog.items() if n]
        share = fair.order(waiting)[0]
        fair.served(share)
        backlog[share] -= 1
        order.append(share.tenant)
    return order


def test_a_tenant_with_one_request_waits_one_turn_not_twenty_four() -> None:
    big, small = Share("big"), Share("small")
    fair = FairShares()
    fair.served(big)  # big has been served already
    assert serve(fair, {big: 24, small: 1}, 2) == ["small", "big"]


def test_weights_split_turns_and_idle_time_earns_no_credit() -> None:
    heavy, light = Share("heavy", BATCH, 2.0), Share("light", BATCH, 1.0)
    fair = FairShares()
    assert Counter(serve(fair, {heavy: 100, light: 100}, 60)) == {"heavy": 40, "light": 20}
    late = Share("late", BATCH, 1.0)  # arrives now: starts at the current virtual time
    order = serve(fair, {heavy: 100, light: 100, late: 100}, 40)
    assert 8 <= Counter(order)["late"] <= 12


def test_interactive_goes_first_and_headroom_follows_the_window() -> None:
    chat, batch = Share("chat"), Share("batch", BATCH)
    fair = FairShares(window=30, reserve=1)
    for _ in range(5):
        fair.served(chat)
    assert fair.order([batch, chat])[0] == chat
    assert fair.reserve_for(batch, "m", now=100) == 0  # no people seen: no headroom
    fair.saw(chat, "m", now=100)
    assert fair.reserve_for(batch, "m", now=120) == 1
    assert fair.reserve_for(chat, "m", now=120) == 0
    assert fair.reserve_for(batch, "other", now=120) == 0
    assert fair.reserve_for(batch, "m", now=131) == 0


def test_a_bucket_refills_and_says_when() -> None:
    limits = TenantLimits.of(TenantSettings(name="t", requests_per_minute=60), now=0)
    assert [limits.admit(0, now=0, wall=0) is None for _ in range(61)].count(True) == 60
    refusal = limits.admit(0, now=0, wall=0)
    assert refusal is not None and refusal.limit == "requests"
    assert refusal.retry_after == pytest.approx(1.0)
    assert limits.headers()["x-ratelimit-remaining-requests"] == "0"
    assert limits.headers()["x-ratelimit-reset-requests"] == "1m0s"
    assert limits.admit(0, now=1.0, wall=0) is None  # one more a second later
    assert (duration(0.25), duration(1.5), duration(360)) == ("250ms", "1.5s", "6m0s")


def test_a_budget_renews_with_its_period() -> None:
    config = TenantSettings(name="t", budget_tokens=100, budget_period="1d")
    limits = TenantLimits.of(config, now=0)
    assert limits.admit(10, now=0, wall=DAY + 5) is None
    limits.finish(10, 120, now=1, wall=DAY + 6)
    refusal = limits.admit(10, now=2, wall=DAY + 7)
    assert refusal is not None and refusal.quota
    assert refusal.retry_after == pytest.approx(DAY - 7)
    assert limits.admit(10, now=3, wall=2 * DAY) is None  # the next day


def test_the_keys_directory_maps_keys_to_tenants(tmp_path: Path) -> None:
    key, _ = add_key(tmp_path / "keys.json", "batch")
    directory = KeyDirectory([("chat", "chat-key-123")], read_keys(tmp_path / "keys.json"))
    assert directory.tenant_of(b"chat-key-123") == "chat"
    assert directory.tenant_of(key.encode()) == "batch"
    assert directory.tenant_of(b"chat-key-124") is None
    assert directory.tenants() == {"chat": 1, "batch": 1}
    (tmp_path / "keys.json").write_text("{not json")
    with pytest.raises(KeysFileError, match="not a keys file"):
        read_keys(tmp_path / "keys.json")


def test_the_usage_book_sums_days_and_survives_a_save(tmp_path: Path) -> None:
    book = UsageBook()
    book.add(DAY * 10, "chat", "m", UsageBook.counts(200, prompt_tokens=5, gpu_seconds=0.5))
    book.add(DAY * 11, "chat", "m", UsageBook.counts(429))
    book.budgets["chat"] = (DAY * 11, 42)
    book.save(tmp_path / "usage.json")
    again = UsageBook.load(tmp_path / "usage.json")
    [(name, entry)] = again.summary("1970-01-11").items()
    totals = entry["totals"]
    assert (name, totals["requests"], totals["rate_limited"], totals["prompt_tokens"]) == (
        "chat",
        2,
        1,
        5,
    )
    assert totals["by_status"] == {"200": 1, "429": 1}
    assert again.summary("1970-01-12")["chat"]["totals"]["requests"] == 1
    assert again.budgets == {"chat": (DAY * 11, 42)}
    (tmp_path / "usage.json").write_text(json.dumps({"schema_version": 9}))
    with pytest.raises(ValueError, match="not a usage record"):
        UsageBook.load(tmp_path / "usage.json")


def test_a_failed_answer_gives_its_token_estimate_back() -> None:
    limits = TenantLimits.of(TenantSettings(name="t", tokens_per_minute=1000), now=0)
    assert limits.admit(800, now=0, wall=0) is None
    limits.finish(800, None, now=0, wall=0)  # the node failed: nothing was used
    assert limits.admit(900, now=0, wall=0) is None
    assert limits.in_flight == 1
    limits.finish(900, None, now=0, wall=0)
    limits.finish(900, None, now=0, wall=0)  # a tenant re-added by a reload: never below 0
    assert limits.in_flight == 0
