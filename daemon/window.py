"""The allowed download window, e.g. ``"02:00-06:00 UTC+8"``.

Pure: no clock and no I/O. Every question takes the instant it is about, as an aware
datetime, so callers (and tests) supply the clock.

Semantics
---------
* A window is a daily wall-clock interval in its zone: start inclusive, end exclusive.
* A window whose end is earlier than its start (``22:00-04:00``) crosses midnight and
  belongs to the day it starts: the instance opening on 9 March closes on 10 March.
* Instants returned by the methods are aware and in UTC, so comparing or subtracting them
  is exact across DST changes. (Python compares two datetimes that share a ``ZoneInfo``
  by wall clock, which is off by the DST shift; UTC avoids that trap.) Show them to people
  with ``.astimezone(window.tz)``.

DST (IANA zones only; fixed offsets have none)
----------------------------------------------
Start and end are wall-clock times in the zone, resolved exactly as ``zoneinfo`` resolves
a datetime built with ``fold=0``:

* On the spring-forward day a time inside the gap (02:30 in Europe/Berlin, which jumps
  from 02:00 to 03:00) takes the offset in force *before* the change, so it lands as far
  after the gap as it was into it: 02:30 means 03:30 CEST. A window lying wholly inside
  the gap on that day, or one whose start is pushed past its end (``02:30-03:00``),
  does not occur that day; ``next_open`` skips it.
* On the fall-back day an ambiguous time (02:30 happens twice in Berlin) means its first
  occurrence.

So ``01:00-05:00 Europe/Berlin`` lasts 3 real hours on the spring day and 5 in the autumn.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

if TYPE_CHECKING:
    from pydantic import GetCoreSchemaHandler
    from pydantic_core import CoreSchema

__all__ = ["AllowedWindow"]

_EXPECTED = "expected HH:MM-HH:MM <zone>, e.g. '02:00-06:00 UTC+8'"
_ZONE_FORMS = "UTC, UTC+8, UTC+08:00, UTC-03:30 or an IANA name such as 'Asia/Taipei'"

# The time range first, then the zone after whitespace. Times may not contain '-', so the
# '-' inside a zone such as 'UTC-3' is never mistaken for the range separator.
_RANGE_RE = re.compile(r"(?P<start>[^\s-]+)\s*-\s*(?P<end>[^\s-]+)(?P<rest>.*)", re.DOTALL)
_TIME_RE = re.compile(r"(?P<hour>\d{1,2}):(?P<minute>\d{2})")
_UTC_RE = re.compile(
    r"UTC(?:(?P<sign>[+-])(?P<hours>\d{1,2})(?::?(?P<minutes>\d{2}))?)?", re.IGNORECASE
)
# Real-world offsets run from UTC-12:00 to UTC+14:00; anything else is a typo.
_MIN_OFFSET = timedelta(hours=-12)
_MAX_OFFSET = timedelta(hours=14)


def _parse_time(text: str, which: str) -> time:
    match = _TIME_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"{which} time {text!r} is not HH:MM; {_EXPECTED}")
    hour, minute = int(match["hour"]), int(match["minute"])
    if hour > 23:
        raise ValueError(f"hour {hour} is out of range; {_EXPECTED}")
    if minute > 59:
        raise ValueError(f"minute {minute} is out of range; {_EXPECTED}")
    return time(hour, minute)


def _parse_zone(text: str) -> tzinfo:
    compact = re.sub(r"\s+", "", text)
    if compact[:3].upper() == "UTC":
        match = _UTC_RE.fullmatch(compact)
        if match is None:
            raise ValueError(f"malformed UTC offset {text!r}; expected {_ZONE_FORMS}")
        if match["sign"] is None:
            return UTC
        hours, minutes = int(match["hours"]), int(match["minutes"] or 0)
        if minutes > 59:
            raise ValueError(f"offset minutes {minutes} are out of range in {text!r}; {_EXPECTED}")
        offset = timedelta(hours=hours, minutes=minutes)
        if match["sign"] == "-":
            offset = -offset
        if not _MIN_OFFSET <= offset <= _MAX_OFFSET:
            raise ValueError(
                f"UTC offset {text!r} is out of range (UTC-12:00 to UTC+14:00); {_EXPECTED}"
            )
        return UTC if not offset else timezone(offset)
    try:
        return ZoneInfo(text)
    # ZoneInfoNotFoundError for unknown keys; ValueError for keys that are not relative
    # paths or files that are not TZif; OSError for things like directories on some systems.
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {text!r}; expected {_ZONE_FORMS}") from None


def _zone_name(tz: tzinfo) -> str:
    if isinstance(tz, ZoneInfo):
        return tz.key
    offset = tz.utcoffset(None)
    if offset is None:
        raise ValueError(f"time zone {tz!r} has no fixed UTC offset")
    if not offset:
        return "UTC"
    sign = "-" if offset < timedelta(0) else "+"
    minutes = abs(offset) // timedelta(minutes=1)
    hours, minutes = divmod(minutes, 60)
    return f"UTC{sign}{hours}" if not minutes else f"UTC{sign}{hours:02d}:{minutes:02d}"


def _require_aware(at: datetime) -> None:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"naive datetime {at.isoformat()}; pass an aware datetime")


@dataclass(frozen=True)
class AllowedWindow:
    """A daily download window: ``start`` inclusive to ``end`` exclusive, in ``tz``.

    Build it with :meth:`parse`. ``text`` keeps the string it was parsed from (for error
    messages that quote the user's settings); ``str(window)`` is the canonical form.
    Equality ignores ``text``.
    """

    start: time
    end: time
    tz: tzinfo
    text: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("window start and end are wall-clock times; pass them without tzinfo")
        if self.start == self.end:
            raise ValueError(
                f"window start and end are both {self.start:%H:%M}, so it is empty; {_EXPECTED}"
            )
        _zone_name(self.tz)  # refuse a tzinfo we could not print back
        if not self.text:
            object.__setattr__(self, "text", str(self))

    @classmethod
    def parse(cls, text: str) -> AllowedWindow:
        """Parse ``HH:MM-HH:MM <zone>``; raise ``ValueError`` saying what is wrong.

        Zones: ``UTC``, ``UTC+8``, ``UTC+08:00``, ``UTC-03:30``, ``UTC-3`` or an IANA
        name (``Asia/Taipei``). Whitespace around the parts is tolerated.
        """
        stripped = text.strip()
        if not stripped:
            raise ValueError(f"no window given; {_EXPECTED}")
        match = _RANGE_RE.fullmatch(stripped)
        if match is None:
            raise ValueError(f"{stripped!r} is not a time range; {_EXPECTED}")
        start = _parse_time(match["start"], "start")
        end = _parse_time(match["end"], "end")
        rest = match["rest"]
        if not rest.strip():
            raise ValueError(f"time zone missing after {stripped!r}; {_EXPECTED}")
        if not rest[0].isspace():
            raise ValueError(f"expected a space before the time zone in {stripped!r}; {_EXPECTED}")
        if start == end:
            raise ValueError(
                f"start and end are both {start:%H:%M}, so the window is empty; {_EXPECTED}"
            )
        return cls(start=start, end=end, tz=_parse_zone(rest.strip()), text=text)

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M} {self.zone}"

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[Any], handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        """Let pydantic models hold a window: parsed from its text, dumped as ``str()``.

        Without this pydantic would treat the class as a dataclass and fail on ``tz``.
        """
        # Imported here so this module stays importable (and pure) without pydantic.
        from pydantic_core import core_schema

        def coerce(value: object) -> AllowedWindow:
            if isinstance(value, cls):
                return value
            if isinstance(value, str):
                return cls.parse(value)
            raise ValueError(f"a window is text, got {type(value).__name__}; {_EXPECTED}")

        return core_schema.json_or_python_schema(
            # The JSON branch also gives the JSON schema: a string.
            json_schema=core_schema.chain_schema(
                [core_schema.str_schema(), core_schema.no_info_plain_validator_function(coerce)]
            ),
            python_schema=core_schema.no_info_plain_validator_function(coerce),
            serialization=core_schema.plain_serializer_function_ser_schema(str),
        )

    @property
    def zone(self) -> str:
        """The canonical zone name: ``UTC``, ``UTC+8``, ``UTC-03:30`` or the IANA key."""
        return _zone_name(self.tz)

    @property
    def crosses_midnight(self) -> bool:
        """True when the window ends on the day after it starts."""
        return self.end < self.start

    def contains_time(self, t: time) -> bool:
        """Whether the wall-clock time ``t`` (in the window's zone) falls inside.

        For checking a cron time against the window; DST does not enter into it.
        """
        if t.tzinfo is not None:
            raise ValueError("contains_time takes a wall-clock time without tzinfo")
        if self.crosses_midnight:
            return t >= self.start or t < self.end
        return self.start <= t < self.end

    def contains(self, at: datetime) -> bool:
        """Whether the instant ``at`` is inside a window (start inclusive, end exclusive)."""
        return self._containing(at) is not None

    def opening_for(self, at: datetime) -> datetime | None:
        """When the window instance containing ``at`` opened (UTC); None outside.

        Stable for the whole instance, so it identifies "tonight's window".
        """
        found = self._containing(at)
        return None if found is None else found[0]

    def current_close(self, at: datetime) -> datetime | None:
        """When the window instance containing ``at`` closes (UTC); None outside."""
        found = self._containing(at)
        return None if found is None else found[1]

    def next_open(self, at: datetime) -> datetime:
        """The first opening strictly after ``at`` (UTC).

        Inside a window this is the next instance's opening, not the current one's.
        """
        _require_aware(at)
        instant = at.astimezone(UTC)
        first_day = instant.astimezone(self.tz).date() - timedelta(days=1)
        # Eight days is ample: at most one day a year can lose its instance to DST.
        for opens, _closes in self._instances(first_day, days=8):
            if opens > instant:
                return opens
        raise AssertionError("unreachable: a window opens at least once in any week")

    # -- helpers ---------------------------------------------------------------

    def _instance(self, day: date) -> tuple[datetime, datetime]:
        close_day = day + timedelta(days=1) if self.crosses_midnight else day
        opens = datetime.combine(day, self.start, tzinfo=self.tz).astimezone(UTC)
        closes = datetime.combine(close_day, self.end, tzinfo=self.tz).astimezone(UTC)
        return opens, closes

    def _instances(self, first_day: date, days: int) -> Iterator[tuple[datetime, datetime]]:
        """Non-empty instances starting on ``first_day`` and the following days, in order."""
        for offset in range(days):
            opens, closes = self._instance(first_day + timedelta(days=offset))
            if opens < closes:  # empty when DST swallows it (see module docstring)
                yield opens, closes

    def _containing(self, at: datetime) -> tuple[datetime, datetime] | None:
        _require_aware(at)
        instant = at.astimezone(UTC)
        # An instance that contains `at` opened on the local day of `at` or the day
        # before; one extra day each side absorbs DST shifts.
        first_day = instant.astimezone(self.tz).date() - timedelta(days=2)
        for opens, closes in self._instances(first_day, days=4):
            if opens <= instant < closes:
                return opens, closes
        return None
