"""RFC 3339 timestamps to UTC calendar months, without datetime on the hot path."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Final

# Only ASCII digits: Python's \d would also match other scripts' digits.
_RFC3339: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.[0-9]+)?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)

_MONTH_ARG: Final = re.compile(r"([0-9]{4})-([0-9]{2})")
_DAYS: Final = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def days_in_month(year: int, month: int) -> int:
    if month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0):
        return 29
    return _DAYS[month - 1]


class TimeError(ValueError):
    """The timestamp is not an RFC 3339 date-time with a zone."""


def utc_date(value: str) -> tuple[int, int, int]:
    """Return the UTC calendar date ``(year, month, day)`` of an RFC 3339 time.

    Raises :class:`TimeError` with a reason a person can act on.
    """
    m = _RFC3339.fullmatch(value)
    if m is None:
        raise TimeError(
            "not an RFC 3339 date-time with seconds and a zone "
            "(expected e.g. 2026-11-03T10:00:00Z or 2026-11-03T10:00:00+02:00)"
        )
    year, month, day = int(m[1]), int(m[2]), int(m[3])
    hour, minute, second = int(m[4]), int(m[5]), int(m[6])
    if year == 0:
        raise TimeError("year 0000 is out of range")
    if not 1 <= month <= 12:
        raise TimeError(f"month {m[2]} is out of range")
    dim = days_in_month(year, month)
    if not 1 <= day <= dim:
        raise TimeError(f"day {m[3]} is out of range for {m[1]}-{m[2]}")
    if hour > 23 or minute > 59 or second > 60:  # 60: a leap second, as RFC 3339 allows
        raise TimeError("time of day is out of range")
    if m[7] is not None:
        return year, month, day
    off_h, off_m = int(m[9]), int(m[10])
    if off_h > 23 or off_m > 59:
        raise TimeError("zone offset is out of range")
    offset = off_h * 60 + off_m
    local = hour * 60 + minute
    utc = local - offset if m[8] == "+" else local + offset
    if utc < 0:
        day -= 1
        if day == 0:
            month -= 1
            if month == 0:
                year -= 1  # year 0 in UTC: valid RFC 3339; see utc_month
                month = 12
            day = days_in_month(year, month)
    elif utc >= 1440:
        day += 1
        if day > dim:
            day = 1
            month += 1
            if month == 13:
                year += 1  # year 10000 in UTC: valid RFC 3339; see utc_month
                month = 1
    return year, month, day


def utc_hour(value: str, date: int) -> int:
    """``YYYYMMDDHH``: the UTC hour of a valid RFC 3339 time whose UTC date is ``date``
    (``YYYYMMDD``, as :func:`utc_month` gives it).

    Cached on :func:`utc_month`'s key (date, hour, zone and, for a zone with minutes, the
    side of the minute where the UTC hour changes), which decides the UTC hour too."""
    tail = _TAILS.get(value[13:])
    if tail is not None:
        hit = _HOURS.get(value[:13] + tail)
        if hit is not None:
            return hit
    if value[-1] in "Zz":
        hour = date * 100 + int(value[11:13])
    else:
        local = int(value[11:13]) * 60 + int(value[14:16])
        offset = int(value[-5:-3]) * 60 + int(value[-2:])
        minutes = local - offset if value[-6] == "+" else local + offset
        hour = date * 100 + (minutes % 1440) // 60
    if tail is not None:
        if len(_HOURS) >= _CACHE_MAX:
            _HOURS.clear()
        _HOURS[value[:13] + tail] = hour
    return hour


_HOURS: dict[str, int] = {}


_STAMPS: dict[int, int] = {}
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def hour_stamp(ms: int) -> int:
    """``YYYYMMDDHH``: the UTC hour of a POSIX time in milliseconds (a Kafka record's
    timestamp); cached per hour.  Beyond the years 0001..9999 it is clamped to their ends."""
    hour = ms // 3_600_000
    stamp = _STAMPS.get(hour)
    if stamp is None:
        try:
            t = _EPOCH + timedelta(hours=hour)
            stamp = t.year * 1_000_000 + t.month * 10_000 + t.day * 100 + t.hour
        except OverflowError:
            stamp = 9999_12_31_23 if hour > 0 else 1_01_01_00  # 9999-12-31T23, 0001-01-01T00
        if len(_STAMPS) >= 10_000:
            _STAMPS.clear()
        _STAMPS[hour] = stamp
    return stamp


def stamp_text(stamp: int) -> str:
    """``YYYY-MM-DDTHH:59:59Z``: the last second of the UTC hour ``stamp`` (``YYYYMMDDHH``)."""
    s = f"{stamp:010d}"
    return f"{s[:4]}-{s[4:6]}-{s[6:8]}T{s[8:10]}:59:59Z"


def parse_month(value: str) -> str:
    """``value`` if it is a month ``YYYY-MM`` (01..12, year 0001..9999); else ValueError
    naming the value and the expected form."""
    m = _MONTH_ARG.fullmatch(value)
    if m is None or int(m[1]) < 1 or not 1 <= int(m[2]) <= 12:
        raise ValueError(
            f"invalid month {value!r:.60}: expected YYYY-MM "
            "(month 01..12, year 0001..9999), e.g. 2026-11"
        )
    return value


def month_key(year: int, month: int) -> str:
    """``YYYY-MM``."""
    return f"{year:04d}-{month:02d}"


def recent(year: int, month: int, count: int) -> set[str]:
    """The month ``year-month`` and the ``count - 1`` before it (none before 0001-01): the
    months /metrics shows."""
    out = set()
    for _ in range(count):
        if year < 1:
            break
        out.add(month_key(year, month))
        year, month = (year - 1, 12) if month == 1 else (year, month - 1)
    return out


_CACHE: dict[str, tuple[str, int]] = {}
#: ":mm:ss[.fraction]zone" already validated -> the zone part of the cache key.
_TAILS: dict[str, str] = {}
_CACHE_MAX: Final = 200_000
_BAD: Final = (
    "not an RFC 3339 date-time with seconds and a zone "
    "(expected e.g. 2026-11-03T10:00:00Z or 2026-11-03T10:00:00+02:00)"
)
# One match validates the shape and the minute/second ranges and captures the
# cache key's parts: date and hour, minutes, zone.
_FAST: Final = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}):([0-5][0-9]):(?:[0-5][0-9]|60)(?:\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def utc_month(value: str) -> tuple[str, int]:
    """``(YYYY-MM, YYYYMMDD)`` of the UTC date of an RFC 3339 time.

    RFC 3339 allows local times in years 0001 to 9999; with a zone offset, the
    first and last hours of that range fall in UTC year 0 or 10000.  Such an
    instant keeps its true month (``0000-12`` or ``10000-01``) but its date is
    ``0``: before every rate card, so it is rejected as ``no_ratecard`` and no
    month outside 0001-01 to 9999-12 ever reaches a ledger.

    The hot path.  The result depends only on the date, the hour and the zone
    (and, for a zone with minutes, on which side of the one minute boundary in
    that hour where the UTC date changes), so it is cached on those.  The date,
    hour and zone are validated once, when their key is first seen.
    """
    tail = _TAILS.get(value[13:])
    if tail is not None:
        hit = _CACHE.get(value[:13] + tail)
        if hit is not None:
            return hit
    m = _FAST.fullmatch(value)
    if m is None:
        if _RFC3339.fullmatch(value) is None:
            raise TimeError(_BAD)
        raise TimeError("time of day is out of range")
    hour, minutes, zone = m.group(1, 2, 3)
    if len(zone) == 1:
        key = hour
    elif zone[4] == "0" and zone[5] == "0":
        key = hour + zone
    else:
        # "+hh:mm": UTC midnight is local hh:mm; "-hh:mm": local (23-hh):(60-mm).
        threshold = zone[4:] if zone[0] == "+" else f"{60 - int(zone[4:]):02d}"
        key = hour + zone + ("1" if minutes >= threshold else "0")
    hit = _CACHE.get(key)
    if hit is None:
        y, mo, d = utc_date(value)
        hit = (month_key(y, mo), y * 10000 + mo * 100 + d if 1 <= y <= 9999 else 0)
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[key] = hit
    if len(_TAILS) >= _CACHE_MAX:
        _TAILS.clear()
    # The part after the hour (":mm:ss[.f]zone") was just validated: remember which
    # key suffix it gives, so the next time with the same tail needs no regex.
    _TAILS[value[13:]] = key[13:]
    return hit
