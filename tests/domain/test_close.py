from __future__ import annotations

from datetime import UTC, datetime, timedelta

from meter.domain import Ledger
from meter.domain.close import (
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
    final = dict(tm.workloads)
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
