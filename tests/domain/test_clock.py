"""The month-close clock check: no host clock decides a month alone (issue 19, item 3)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from meter.domain.clock import (
    DEFAULT_CLOCK_TOLERANCE,
    broker_offset,
    close_clock,
    peer_offset,
    span,
)
from meter.domain.close import is_closed

T = datetime(2026, 12, 8, 3, 0, tzinfo=UTC)
FIVE_MIN = timedelta(minutes=5)

hosts = st.datetimes(  # hypothesis takes naive bounds and makes aware instants
    min_value=datetime(2000, 1, 1),  # noqa: DTZ001
    max_value=datetime(2100, 1, 1),  # noqa: DTZ001
    timezones=st.just(UTC),
)
offsets = st.lists(
    st.timedeltas(min_value=timedelta(days=-400), max_value=timedelta(days=400)), max_size=6
)
tolerances = st.one_of(
    st.none(), st.timedeltas(min_value=timedelta(0), max_value=timedelta(hours=2))
)
months = st.builds(lambda y, m: f"{y:04d}-{m:02d}", st.integers(2000, 2099), st.integers(1, 12))


def test_a_worker_in_2027_05_does_not_close_2026_12_the_issue() -> None:
    # The worker's clock says 2027-05-10; the broker says 2026-12-08.
    host = datetime(2027, 5, 10, tzinfo=UTC)
    v = close_clock(host, [host - T], DEFAULT_CLOCK_TOLERANCE, "the broker's time")
    assert v.held and v.state == "ahead"
    assert v.skew == host - T
    assert "ahead of the broker's time" in v.reason and "152d" in v.reason


def test_no_reference_holds_and_says_why() -> None:
    v = close_clock(T, [], FIVE_MIN, "the broker yet (no heartbeat acknowledged)")
    assert v.held and v.state == "unknown" and v.skew is None
    assert "no time from the broker yet" in v.reason


def test_behind_closes_late_by_this_hosts_clock() -> None:
    v = close_clock(T, [timedelta(hours=-3)], FIVE_MIN)
    assert v.state == "behind" and v.now == T and v.skew == timedelta(hours=-3)
    assert "behind" in v.reason


def test_within_tolerance_decides_at_the_earliest_clock() -> None:
    v = close_clock(T, [timedelta(seconds=90)], FIVE_MIN)
    assert v.state == "ok" and v.now == T - timedelta(seconds=90)


def test_off_is_this_hosts_clock_alone() -> None:
    v = close_clock(T, [], None)
    assert v.state == "off" and v.now == T


@given(hosts, offsets, tolerances)
def test_held_exactly_when_no_reference_or_a_reference_is_behind_beyond_tolerance(
    host: datetime, offs: list[timedelta], tol: timedelta | None
) -> None:
    v = close_clock(host, offs, tol)
    expected_held = tol is not None and (not offs or max(offs) > tol)
    assert v.held == expected_held


@given(hosts, offsets, tolerances, months)
def test_a_month_closes_only_when_every_clock_says_it_is_due(
    host: datetime, offs: list[timedelta], tol: timedelta | None, month: str
) -> None:
    v = close_clock(host, offs, tol)
    if v.now is None or tol is None:
        return
    # The decision time is the earliest of this host's clock and every reference.
    assert v.now == min([host, *(host - o for o in offs)])
    if is_closed(month, v.now):
        assert is_closed(month, host)
        assert all(is_closed(month, host - o) for o in offs)


@given(hosts, offsets, tolerances)
def test_order_and_duplicates_of_measurements_do_not_matter(
    host: datetime, offs: list[timedelta], tol: timedelta | None
) -> None:
    v = close_clock(host, offs, tol)
    again = close_clock(host, [*reversed(offs), *offs], tol)
    assert (v.now, v.state) == (again.now, again.state)
    assert v.skew is None or again.skew is None or abs(v.skew) == abs(again.skew)


@given(hosts, offsets, st.timedeltas(min_value=timedelta(0), max_value=timedelta(hours=2)))
def test_a_clock_further_ahead_never_turns_a_hold_into_a_close(
    host: datetime, offs: list[timedelta], tol: timedelta
) -> None:
    if close_clock(host, offs, tol).held:
        assert close_clock(host, [o + timedelta(minutes=1) for o in offs], tol).held


def test_measurements() -> None:
    sent, acked = T, T + timedelta(milliseconds=40)
    # The broker stamped the midpoint: no offset.
    assert broker_offset(sent, acked, T + timedelta(milliseconds=20)) == timedelta(0)
    assert broker_offset(sent, acked, T - timedelta(hours=1)) > timedelta(minutes=59)
    assert peer_offset(T, T - timedelta(seconds=2)) == timedelta(seconds=2)


def test_span() -> None:
    assert span(timedelta(days=152, hours=3, minutes=1)) == "152d 3h"
    assert span(timedelta(minutes=4, seconds=10)) == "4m 10s"
    assert span(timedelta(hours=-3)) == "-3h 0m"
    assert span(timedelta(seconds=0.25)) == "0.2s"
