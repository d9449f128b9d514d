from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from meter.domain import Ledger
from meter.domain.close import (
    NEVER,
    closes_at,
    corrections,
    is_closed,
    month_end,
    months_to_close,
    snapshot_totals,
)

R5 = (5, "vcsp-2026", "subscription")
R0 = (0, "vcsp-2026", "rental")


def test_close_moment_is_the_third_of_the_next_month_by_default() -> None:
    assert month_end("2026-12") == datetime(2027, 1, 1, tzinfo=UTC)
    assert closes_at("2026-10") == datetime(2026, 11, 3, tzinfo=UTC)
    assert closes_at("2026-10", timedelta(hours=6)) == datetime(2026, 11, 1, 6, tzinfo=UTC)
    assert not is_closed("2026-10", datetime(2026, 11, 2, 23, 59, 59, tzinfo=UTC))
    assert is_closed("2026-10", datetime(2026, 11, 3, tzinfo=UTC))


def test_months_to_close_are_due_and_not_closed_oldest_first() -> None:
    now = datetime(2026, 11, 27, tzinfo=UTC)
    months = {"2026-08", "2026-09", "2026-10", "2026-11"}
    assert months_to_close(months, {"2026-09"}, now) == ["2026-08", "2026-10"]


def test_corrections_are_the_difference_from_the_final_snapshot() -> None:
    ledger = Ledger()
    ledger.add("acme", "2026-10", "vm", "a", R0)
    ledger.add("acme", "2026-10", "vm", "b", R5)
    tm = ledger.tenant_month("acme", "2026-10")
    assert tm is not None
    final = tm.snapshot()
    assert list(corrections(tm, final)) == []
    assert snapshot_totals(final) == {"vm": [2, 5, 1]}
    ledger.add("acme", "2026-10", "vm", "a", R5)  # upgraded late
    ledger.add("acme", "2026-10", "vm", "c", R0)  # new late
    ledger.add("acme", "2026-10", "vm", "b", R0)  # lower: changes nothing
    got = {(c.workload_id, c.workloads_added, c.points_added, c.rental_added)
           for c in corrections(tm, final)}  # fmt: skip
    assert got == {("a", 0, 5, -1), ("c", 1, 0, 1)}
    # final + corrections == what the ledger says now
    wl = sum(n for n, _, _ in snapshot_totals(final).values())
    pts = sum(p for _, p, _ in snapshot_totals(final).values())
    wl += sum(c.workloads_added for c in corrections(tm, final))
    pts += sum(c.points_added for c in corrections(tm, final))
    assert (wl, pts) == (tm.workload_count, tm.points)


def test_9999_12_is_never_due() -> None:
    assert month_end("9999-11") == datetime(9999, 12, 1, tzinfo=UTC)
    assert month_end("9999-12") is None
    assert closes_at("9999-12") is NEVER
    assert closes_at("9999-12", timedelta(0)) is NEVER
    for now in (datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC), NEVER):
        assert not is_closed("9999-12", now)
        assert months_to_close({"9999-11", "9999-12"}, set(), now) == ["9999-11"]


def test_a_close_past_the_calendar_is_never_and_before_it_is_always() -> None:
    assert closes_at("9999-11") == datetime(9999, 12, 3, tzinfo=UTC)
    assert closes_at("9999-11", timedelta(days=40)) is NEVER
    assert closes_at("0001-01", timedelta(days=-40)) == datetime.min.replace(tzinfo=UTC)
    assert closes_at("0001-01") == datetime(1, 2, 3, tzinfo=UTC)
    assert closes_at("0000-12") == datetime(1, 1, 3, tzinfo=UTC)  # a month no card covers
    now = datetime(2026, 11, 27, tzinfo=UTC)
    assert months_to_close({"0001-01", "9999-12", "2026-10"}, set(), now) == [
        "0001-01",
        "2026-10",
    ]


@given(st.integers(1, 9999), st.integers(1, 12), st.integers(-(10**6), 10**6))
def test_month_arithmetic_is_total(year: int, month: int, grace_minutes: int) -> None:
    m = f"{year:04d}-{month:02d}"
    grace = timedelta(minutes=grace_minutes)
    at = closes_at(m, grace)
    end = month_end(m)
    if end is not None:
        assert end.day == 1
        assert at in {NEVER, datetime.min.replace(tzinfo=UTC)} or at == end + grace
    is_closed(m, datetime(2026, 11, 3, tzinfo=UTC), grace)
