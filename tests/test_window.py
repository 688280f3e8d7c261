"""Tests for daemon.window: every instant is passed in, so the clock is fake by design."""

from __future__ import annotations

import re
from datetime import UTC, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from daemon.window import AllowedWindow

TAIPEI_OFFSET = timezone(timedelta(hours=8))
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
EXPECTED = "expected HH:MM-HH:MM <zone>, e.g. '02:00-06:00 UTC+8'"


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


# -- parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "offset", "canonical"),
    [
        ("02:00-06:00 UTC", timedelta(0), "02:00-06:00 UTC"),
        ("02:00-06:00 UTC+8", timedelta(hours=8), "02:00-06:00 UTC+8"),
        ("02:00-06:00 UTC+08:00", timedelta(hours=8), "02:00-06:00 UTC+8"),
        ("02:00-06:00 UTC-03:30", timedelta(hours=-3, minutes=-30), "02:00-06:00 UTC-03:30"),
        ("02:00-06:00 UTC-3", timedelta(hours=-3), "02:00-06:00 UTC-3"),
        ("02:00-06:00 UTC+0", timedelta(0), "02:00-06:00 UTC"),
        ("02:00-06:00 utc+05:45", timedelta(hours=5, minutes=45), "02:00-06:00 UTC+05:45"),
        ("  2:00 - 6:00   UTC + 8  ", timedelta(hours=8), "02:00-06:00 UTC+8"),
        ("\t02:00-\t06:00\tUTC+8\n", timedelta(hours=8), "02:00-06:00 UTC+8"),
    ],
)
def test_parse_fixed_offsets(text: str, offset: timedelta, canonical: str) -> None:
    window = AllowedWindow.parse(text)
    assert window.tz.utcoffset(None) == offset
    assert str(window) == canonical
    assert window.text == text
    assert AllowedWindow.parse(str(window)) == window


@pytest.mark.parametrize("name", ["Asia/Taipei", "Europe/Berlin", "America/New_York", "Etc/UTC"])
def test_parse_iana_names(name: str) -> None:
    window = AllowedWindow.parse(f"02:00-06:00 {name}")
    assert window.tz == ZoneInfo(name)
    assert str(window) == f"02:00-06:00 {name}"


def test_equality_ignores_original_text() -> None:
    a = AllowedWindow.parse("02:00-06:00 UTC+8")
    b = AllowedWindow.parse(" 2:00 - 6:00 UTC+08:00 ")
    assert a == b
    assert a.text != b.text
    assert hash(a) == hash(b)


def test_constructed_window_gets_canonical_text() -> None:
    window = AllowedWindow(start=time(22), end=time(4), tz=TAIPEI_OFFSET)
    assert window.text == "22:00-04:00 UTC+8"
    assert window.crosses_midnight


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("25:00-06:00 UTC+8", f"hour 25 is out of range; {EXPECTED}"),
        ("02:00-24:00 UTC+8", f"hour 24 is out of range; {EXPECTED}"),
        ("02:60-06:00 UTC+8", f"minute 60 is out of range; {EXPECTED}"),
        ("", f"no window given; {EXPECTED}"),
        ("   ", f"no window given; {EXPECTED}"),
        ("02:00-06:00", f"time zone missing after '02:00-06:00'; {EXPECTED}"),
        ("02:00 UTC+8", f"'02:00 UTC+8' is not a time range; {EXPECTED}"),
        ("2am-6am UTC", f"start time '2am' is not HH:MM; {EXPECTED}"),
        ("02:00-6 UTC", f"end time '6' is not HH:MM; {EXPECTED}"),
        ("02:00-06:00UTC", f"end time '06:00UTC' is not HH:MM; {EXPECTED}"),
        ("02:00-06:00-UTC", "expected a space before the time zone in '02:00-06:00-UTC'"),
        ("03:00-03:00 UTC", "start and end are both 03:00, so the window is empty"),
        ("02:00-06:00 Mars/Olympus", "unknown time zone 'Mars/Olympus'; expected UTC, UTC+8"),
        ("02:00-06:00 Europe", "unknown time zone 'Europe'"),
        ("02:00-06:00 /etc/passwd", "unknown time zone '/etc/passwd'"),
        ("02:00-06:00 ../../etc/passwd", "unknown time zone '../../etc/passwd'"),
        ("02:00-06:00 zone.tab", "unknown time zone 'zone.tab'"),
        ("02:00-06:00 Asia/Taipei now", "unknown time zone 'Asia/Taipei now'"),
        ("02:00-06:00 UTC+15", "UTC offset 'UTC+15' is out of range (UTC-12:00 to UTC+14:00)"),
        ("02:00-06:00 UTC-13", "UTC offset 'UTC-13' is out of range"),
        ("02:00-06:00 UTC+8:5", "malformed UTC offset 'UTC+8:5'; expected UTC, UTC+8"),
        ("02:00-06:00 UTC8", "malformed UTC offset 'UTC8'"),
        ("02:00-06:00 UTC+05:75", "offset minutes 75 are out of range in 'UTC+05:75'"),
    ],
)
def test_parse_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        AllowedWindow.parse(text)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ValueError, match="both 02:00"):
        AllowedWindow(start=time(2), end=time(2), tz=UTC)
    with pytest.raises(ValueError, match="without tzinfo"):
        AllowedWindow(start=time(2, tzinfo=UTC), end=time(6), tz=UTC)


# -- same-day windows ----------------------------------------------------------------------


def test_inside_and_outside_with_offset_zone() -> None:
    window = AllowedWindow.parse("02:00-06:00 UTC+8")  # 18:00-22:00 UTC the previous day
    assert window.contains(utc(2024, 3, 9, 19, 0))
    assert not window.contains(utc(2024, 3, 9, 12, 0))
    assert not window.contains(utc(2024, 3, 9, 23, 0))
    # The same instant expressed in another zone gives the same answer.
    assert window.contains(datetime(2024, 3, 10, 3, 0, tzinfo=TAIPEI_OFFSET))
    assert window.contains(datetime(2024, 3, 9, 20, 0, tzinfo=BERLIN))


def test_boundaries_start_inclusive_end_exclusive() -> None:
    window = AllowedWindow.parse("02:00-06:00 UTC")
    tick = timedelta(microseconds=1)
    assert not window.contains(utc(2024, 5, 1, 2) - tick)
    assert window.contains(utc(2024, 5, 1, 2))
    assert window.contains(utc(2024, 5, 1, 6) - tick)
    assert not window.contains(utc(2024, 5, 1, 6))


def test_answers_inside_a_window() -> None:
    window = AllowedWindow.parse("02:00-06:00 UTC+8")
    at = utc(2024, 3, 9, 19, 30)
    assert window.opening_for(at) == utc(2024, 3, 9, 18)
    assert window.current_close(at) == utc(2024, 3, 9, 22)
    assert window.next_open(at) == utc(2024, 3, 10, 18)


def test_answers_outside_a_window() -> None:
    window = AllowedWindow.parse("02:00-06:00 UTC+8")
    before = utc(2024, 3, 9, 10)
    after = utc(2024, 3, 9, 22)  # exactly at the close: outside
    for at in (before, after):
        assert window.opening_for(at) is None
        assert window.current_close(at) is None
    assert window.next_open(before) == utc(2024, 3, 9, 18)
    assert window.next_open(after) == utc(2024, 3, 10, 18)


def test_next_open_at_the_opening_instant_is_the_next_day() -> None:
    window = AllowedWindow.parse("02:00-06:00 UTC")
    assert window.next_open(utc(2024, 5, 1, 2)) == utc(2024, 5, 2, 2)
    assert window.next_open(utc(2024, 5, 1, 2) - timedelta(microseconds=1)) == utc(2024, 5, 1, 2)


def test_returned_instants_are_utc() -> None:
    window = AllowedWindow.parse("02:00-06:00 Asia/Taipei")
    at = datetime(2024, 3, 10, 3, tzinfo=ZoneInfo("Asia/Taipei"))
    for value in (window.opening_for(at), window.current_close(at), window.next_open(at)):
        assert value is not None
        assert value.tzinfo is UTC
    assert window.opening_for(at) == utc(2024, 3, 9, 18)


def test_negative_offset_window() -> None:
    window = AllowedWindow.parse("01:00-02:00 UTC-03:30")  # 04:30-05:30 UTC
    assert window.contains(utc(2024, 1, 1, 4, 30))
    assert not window.contains(utc(2024, 1, 1, 5, 30))
    assert window.current_close(utc(2024, 1, 1, 5)) == utc(2024, 1, 1, 5, 30)


def test_naive_datetimes_are_refused() -> None:
    window = AllowedWindow.parse("02:00-06:00 UTC")
    naive = datetime(2024, 1, 1, 3)
    for method in (window.contains, window.opening_for, window.current_close, window.next_open):
        with pytest.raises(ValueError, match="naive datetime"):
            method(naive)


# -- crossing midnight -------------------------------------------------------------------


def test_crossing_midnight_belongs_to_the_start_day() -> None:
    window = AllowedWindow.parse("22:00-04:00 UTC")
    evening = utc(2024, 3, 9, 23)
    small_hours = utc(2024, 3, 10, 3)
    assert window.contains(evening)
    assert window.contains(small_hours)
    # Both sides of midnight are the same instance, opened on the 9th.
    assert window.opening_for(evening) == window.opening_for(small_hours) == utc(2024, 3, 9, 22)
    assert window.current_close(evening) == window.current_close(small_hours) == utc(2024, 3, 10, 4)
    assert window.next_open(small_hours) == utc(2024, 3, 10, 22)


def test_crossing_midnight_boundaries_and_gap() -> None:
    window = AllowedWindow.parse("22:00-04:00 UTC")
    assert window.contains(utc(2024, 3, 10, 0))
    assert not window.contains(utc(2024, 3, 10, 4))
    assert not window.contains(utc(2024, 3, 10, 12))
    assert window.next_open(utc(2024, 3, 10, 4)) == utc(2024, 3, 10, 22)
    assert window.contains(utc(2024, 3, 10, 22))


def test_crossing_midnight_in_an_offset_zone() -> None:
    window = AllowedWindow.parse("23:00-01:00 UTC+8")  # 15:00-17:00 UTC
    local_before = datetime(2024, 3, 9, 23, 30, tzinfo=TAIPEI_OFFSET)
    local_after = datetime(2024, 3, 10, 0, 30, tzinfo=TAIPEI_OFFSET)
    assert window.opening_for(local_before) == window.opening_for(local_after)
    assert window.opening_for(local_after) == utc(2024, 3, 9, 15)


# -- contains_time (cron checks) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "t", "inside"),
    [
        ("02:00-06:00 UTC+8", time(3), True),
        ("02:00-06:00 UTC+8", time(2), True),
        ("02:00-06:00 UTC+8", time(6), False),
        ("02:00-06:00 UTC+8", time(1, 59), False),
        ("22:00-04:00 UTC", time(23), True),
        ("22:00-04:00 UTC", time(0), True),
        ("22:00-04:00 UTC", time(3, 59), True),
        ("22:00-04:00 UTC", time(4), False),
        ("22:00-04:00 UTC", time(12), False),
    ],
)
def test_contains_time(text: str, t: time, inside: bool) -> None:
    assert AllowedWindow.parse(text).contains_time(t) is inside


def test_contains_time_refuses_aware_times() -> None:
    with pytest.raises(ValueError, match="without tzinfo"):
        AllowedWindow.parse("02:00-06:00 UTC").contains_time(time(3, tzinfo=UTC))


# -- DST ---------------------------------------------------------------------------------
# Europe/Berlin 2024: 31 March 02:00 CET -> 03:00 CEST (01:00 UTC);
#                     27 October 03:00 CEST -> 02:00 CET (01:00 UTC).


def test_berlin_window_is_shorter_in_spring_and_longer_in_autumn() -> None:
    window = AllowedWindow.parse("01:00-05:00 Europe/Berlin")
    spring = utc(2024, 3, 31, 0, 30)
    assert window.opening_for(spring) == utc(2024, 3, 31, 0)  # 01:00 CET
    assert window.current_close(spring) == utc(2024, 3, 31, 3)  # 05:00 CEST
    autumn = utc(2024, 10, 27, 0)
    assert window.opening_for(autumn) == utc(2024, 10, 26, 23)  # 01:00 CEST
    assert window.current_close(autumn) == utc(2024, 10, 27, 4)  # 05:00 CET
    # Winter and summer days either side keep their usual offsets.
    assert window.opening_for(utc(2024, 3, 30, 1)) == utc(2024, 3, 30, 0)
    assert window.opening_for(utc(2024, 4, 1, 1)) == utc(2024, 3, 31, 23)


def test_start_in_spring_gap_moves_forward_like_zoneinfo_fold_0() -> None:
    # 02:30 does not exist on 31 March; with fold=0 zoneinfo reads it at +01:00,
    # which is 01:30 UTC = 03:30 CEST.
    window = AllowedWindow.parse("02:30-04:00 Europe/Berlin")
    assert datetime(2024, 3, 31, 2, 30, tzinfo=BERLIN).astimezone(UTC) == utc(2024, 3, 31, 1, 30)
    assert not window.contains(utc(2024, 3, 31, 1, 15))  # 03:15 CEST
    assert window.contains(utc(2024, 3, 31, 1, 30))  # 03:30 CEST
    assert window.next_open(utc(2024, 3, 30, 12)) == utc(2024, 3, 31, 1, 30)
    assert window.current_close(utc(2024, 3, 31, 1, 30)) == utc(2024, 3, 31, 2)  # 04:00 CEST


def test_window_swallowed_by_spring_gap_is_skipped() -> None:
    # 02:30 resolves to 03:30 CEST, after the 03:00 CEST close: no window that day.
    window = AllowedWindow.parse("02:30-03:00 Europe/Berlin")
    for minute in range(0, 60, 5):
        assert not window.contains(utc(2024, 3, 31, 0, 30) + timedelta(minutes=minute))
    assert window.next_open(utc(2024, 3, 30, 12)) == utc(2024, 4, 1, 0, 30)  # 02:30 CEST
    assert window.opening_for(utc(2024, 3, 30, 1, 45)) == utc(2024, 3, 30, 1, 30)  # day before


def test_ambiguous_autumn_start_is_first_occurrence() -> None:
    window = AllowedWindow.parse("02:30-06:00 Europe/Berlin")
    first = utc(2024, 10, 27, 0, 30)  # 02:30 CEST
    assert window.opening_for(utc(2024, 10, 27, 1, 45)) == first  # 02:45 CET, second pass
    assert not window.contains(first - timedelta(microseconds=1))
    assert window.next_open(utc(2024, 10, 26, 12)) == first


def test_ambiguous_autumn_end_is_first_occurrence() -> None:
    window = AllowedWindow.parse("00:00-02:30 Europe/Berlin")
    assert window.current_close(utc(2024, 10, 27, 0)) == utc(2024, 10, 27, 0, 30)
    assert not window.contains(utc(2024, 10, 27, 0, 45))  # 02:45 CEST
    assert not window.contains(utc(2024, 10, 27, 1, 30))  # 02:30 CET, second pass


def test_local_fold_of_the_caller_is_respected() -> None:
    window = AllowedWindow.parse("02:30-06:00 Europe/Berlin")
    second_pass = datetime(2024, 10, 27, 2, 15, fold=1, tzinfo=BERLIN)  # 01:15 UTC
    first_pass = datetime(2024, 10, 27, 2, 15, fold=0, tzinfo=BERLIN)  # 00:15 UTC
    assert window.contains(second_pass)
    assert not window.contains(first_pass)


def test_new_york_crossing_midnight_over_spring_forward() -> None:
    # 10 March 2024: 02:00 EST -> 03:00 EDT (07:00 UTC).
    window = AllowedWindow.parse("22:00-04:00 America/New_York")
    at = datetime(2024, 3, 10, 1, tzinfo=NEW_YORK)
    opens = window.opening_for(at)
    closes = window.current_close(at)
    assert opens == utc(2024, 3, 10, 3)  # 22:00 EST on the 9th
    assert closes == utc(2024, 3, 10, 8)  # 04:00 EDT on the 10th
    assert closes - opens == timedelta(hours=5)
    assert window.next_open(at) == utc(2024, 3, 11, 2)  # 22:00 EDT on the 10th
    assert window.contains(datetime(2024, 3, 10, 3, 30, tzinfo=NEW_YORK))
    assert not window.contains(datetime(2024, 3, 10, 4, tzinfo=NEW_YORK))


# -- as a pydantic field -----------------------------------------------------------------------


def test_pydantic_field_parses_and_dumps_text() -> None:
    from pydantic import BaseModel, ValidationError

    class Holder(BaseModel):
        window: AllowedWindow

    held = Holder.model_validate({"window": " 2:00 - 6:00 UTC+08:00 "})
    assert held.window == AllowedWindow.parse("02:00-06:00 UTC+8")
    assert held.model_dump() == {"window": "02:00-06:00 UTC+8"}
    assert Holder.model_validate_json(held.model_dump_json()) == held
    assert Holder(window=held.window).window is held.window
    assert Holder.model_json_schema()["properties"]["window"]["type"] == "string"
    with pytest.raises(ValidationError, match="hour 25 is out of range"):
        Holder.model_validate({"window": "25:00-06:00 UTC+8"})
    with pytest.raises(ValidationError, match="a window is text, got int"):
        Holder.model_validate({"window": 5})
