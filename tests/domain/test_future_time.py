"""Events dated in the future: held out of both views as ``future_time``.

The rule (README, "Time rules"): an event is future-dated when its time is after the end of
the UTC hour of its Kafka record's timestamp (``meter rate``: its clock) plus the clock-skew
tolerance.  It depends on nothing but the event's time and that timestamp, so any order and
any replay decide the same way.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from meter.domain import Event, Rater, future_time, load_ratecards, parse
from meter.domain.month import hour_stamp, stamp_text, utc_hour, utc_month
from tests.domain.events import line

CARDS = load_ratecards()
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

instants = st.datetimes(  # hypothesis takes naive bounds and makes aware instants
    min_value=datetime(2001, 1, 1),  # noqa: DTZ001
    max_value=datetime(2099, 12, 31),  # noqa: DTZ001
    timezones=st.just(UTC),
)
offsets = st.integers(-(23 * 60 + 59), 23 * 60 + 59)
skews = st.sampled_from([0, 1, 2, 24, 48])  # hours


def rfc3339(t: datetime, offset_minutes: int, fraction: bool) -> str:
    """``t`` written in the zone ``offset_minutes`` east of UTC."""
    local = t.astimezone(timezone(timedelta(minutes=offset_minutes)))
    text = local.strftime("%Y-%m-%dT%H:%M:%S") + (f".{local.microsecond:06d}" if fraction else "")
    if offset_minutes == 0 and fraction:
        return text + "Z"
    sign = "+" if offset_minutes >= 0 else "-"
    h, m = divmod(abs(offset_minutes), 60)
    return f"{text}{sign}{h:02d}:{m:02d}"


def ms(t: datetime) -> int:
    return (t - EPOCH) // timedelta(milliseconds=1)


def expected_future(event_time: datetime, record: datetime, skew_hours: int) -> bool:
    """By datetime arithmetic: after the end of the hour of record + skew."""
    limit = record + timedelta(hours=skew_hours)
    end = limit.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    return event_time.replace(microsecond=0) >= end


def event_at(time: str, n: int = 0, workload: str = "vm-1") -> bytes:
    return line(workload=workload, time=time, id=f"e-{n}")


@settings(max_examples=500, deadline=None)
@given(instants, offsets, st.booleans(), instants, skews)
def test_future_time_is_the_end_of_the_records_hour_plus_the_skew(
    when: datetime, offset: int, fraction: bool, record: datetime, skew: int
) -> None:
    time = rfc3339(when, offset, fraction)
    event = parse(event_at(time))
    assert isinstance(event, Event), event
    limit = hour_stamp(ms(record) + skew * 3_600_000)
    got = future_time(event, limit)
    assert (got is not None) == expected_future(when, record, skew), (time, record, skew)
    if got is not None:
        assert got.code == "future_time"
        assert stamp_text(limit) in got.reason


@settings(max_examples=300, deadline=None)
@given(instants, offsets)
def test_the_utc_hour_of_any_zone(when: datetime, offset: int) -> None:
    time = rfc3339(when, offset, False)
    _, date = utc_month(time)
    u = when.astimezone(UTC)
    want = u.year * 1_000_000 + u.month * 10_000 + u.day * 100 + u.hour
    assert utc_hour(time, date) == want
    assert utc_hour(time, date) == want  # again, from the cache
    # Another second of the same hour, and the first and last minute of it, in that zone.
    for minute in (0, 59):
        other = u.replace(minute=minute, second=7).astimezone(when.tzinfo)
        again = rfc3339(other, offset, False)
        assert utc_hour(again, utc_month(again)[1]) == want, (time, again)


def test_hour_stamps_of_record_timestamps() -> None:
    assert hour_stamp(0) == 1970_01_01_00
    assert hour_stamp(ms(datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC))) == 2026_11_30_23
    assert hour_stamp(ms(datetime(2026, 12, 1, tzinfo=UTC))) == 2026_12_01_00
    assert hour_stamp(ms(datetime(2028, 2, 29, 5, tzinfo=UTC))) == 2028_02_29_05
    assert hour_stamp(-(10**16)) == 1_01_01_00  # clamped to 0001-01-01T00
    assert hour_stamp(10**18) == 9999_12_31_23
    assert stamp_text(2026_11_30_23) == "2026-11-30T23:59:59Z"


def test_a_restore_point_from_2099_is_a_broken_clock() -> None:
    now = datetime(2026, 11, 20, 12, tzinfo=UTC)
    rater = Rater(CARDS, not_after=hour_stamp(ms(now) + 3_600_000))
    got = rater.feed(event_at("2099-01-01T00:00:00Z"))
    assert not isinstance(got, Event)
    assert got.code == "future_time"
    assert got.reason.startswith("time: '2099-01-01T00:00:00Z' is after 2026-11-20T13:59:59Z")
    # Up to the end of the hour of now + 1 h: kept; a second later: held out.
    assert isinstance(rater.feed(event_at("2026-11-20T13:59:59Z", 1)), Event)
    assert not isinstance(rater.feed(event_at("2026-11-20T14:00:00Z", 2, "vm-2")), Event)
    assert isinstance(rater.feed(event_at("2026-11-20T15:59:59+02:00", 3, "vm-3")), Event)
    assert (rater.tally.counted, rater.tally.rejected) == (2, 2)
    assert [u.month for u in rater.ledger.usage()] == ["2026-11"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(instants, offsets), min_size=1, max_size=30),
    instants,
    skews,
    st.integers(0, 2**32),
)
def test_any_order_and_any_replay_hold_out_the_same_events(
    times: list[tuple[datetime, int]], now: datetime, skew: int, seed: int
) -> None:
    """The rejected events and the totals are those of the events before the limit,
    whatever the order, however often each arrives, one line at a time or in blocks."""
    raws = [event_at(rfc3339(t, off, False), n, f"vm-{n % 7}") for n, (t, off) in enumerate(times)]
    limit = hour_stamp(ms(now) + skew * 3_600_000)
    kept = [r for r, (t, _) in zip(raws, times, strict=True) if not expected_future(t, now, skew)]
    reference = Rater(CARDS)
    for raw in kept:
        reference.feed(raw)
    rnd = random.Random(seed)
    replayed = raws + [rnd.choice(raws) for _ in range(len(raws))]
    rnd.shuffle(replayed)
    one = Rater(CARDS, not_after=limit)
    for raw in replayed:
        one.feed(raw)
    block = Rater(CARDS, not_after=limit)
    rejected, _ = block.feed_block(b"\n".join(replayed) + b"\n")
    assert one.ledger.usage() == block.ledger.usage() == reference.ledger.usage()
    assert one.tally == block.tally
    ahead = sum(1 for raw in replayed if raw not in kept)
    assert one.tally.rejected == ahead
    assert sorted(n for n, _ in rejected) == [
        n for n, raw in enumerate(replayed, 1) if raw not in kept
    ]
    assert {r.code for _, r in rejected} <= {"future_time"}
