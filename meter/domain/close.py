"""Closing a month: when it closes, its final state, and corrections after it.

A month M closes at ``grace`` after its end (default: the 3rd day of the next
month, 00:00 UTC — the vendor's automatic submission day).  At close the
tenant-month's ledger is snapshotted as its *final* state.  The ledger keeps
joining late events; a **correction** is the difference between a workload's
state now and in the final snapshot.  Corrections are keyed per workload, so
publishing them again (after a replay or restart) changes nothing: the
latest correction per key is the truth, and final + corrections is exactly
what the raw events say.

Month arithmetic is total over the months a ledger can hold (0001-01 to
9999-12, see :func:`meter.domain.month.utc_month`).  The last one, 9999-12, is
**never due**: its end, 10000-01-01, is past what a ``datetime`` can hold, so
:func:`closes_at` returns :data:`NEVER` for it (and for any month whose close
would fall past 9999-12-31), :func:`is_closed` is always false and
:func:`months_to_close` never lists it.  Its events are rated and reported
like any other month's; it just never gets a final record.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from meter.domain.ledger import TenantMonth
from meter.domain.ratecard import Rate, rental_machine

DEFAULT_GRACE = timedelta(days=2)

#: ``(workload_type, workload_id) -> Rate`` of a tenant-month at close.
Snapshot = Mapping[tuple[str, str], Rate]


#: When a month that is never due closes: the last moment a ``datetime`` holds.
NEVER: Final = datetime.max.replace(tzinfo=UTC)


def month_end(month: str) -> datetime | None:
    """00:00 UTC of the first day after ``month`` (``YYYY-MM``); ``None`` for 9999-12."""
    year, _, mm = month.partition("-")
    y, m = int(year), int(mm)
    if m == 12:
        if y >= 9999:
            return None
        y, m = y + 1, 1
    else:
        m += 1
    return datetime(y, m, 1, tzinfo=UTC)


def closes_at(month: str, grace: timedelta = DEFAULT_GRACE) -> datetime:
    """When ``month`` closes: ``grace`` after its end, or :data:`NEVER` for 9999-12
    (and for a month whose end plus ``grace`` is past 9999-12-31)."""
    end = month_end(month)
    if end is None:
        return NEVER
    try:
        return end + grace
    except OverflowError:
        return NEVER if grace > timedelta(0) else datetime.min.replace(tzinfo=UTC)


def is_closed(month: str, now: datetime, grace: timedelta = DEFAULT_GRACE) -> bool:
    """True once ``month`` is due; never for a month that closes :data:`NEVER`."""
    at = closes_at(month, grace)
    return at is not NEVER and now >= at


def months_to_close(
    months: set[str], closed: set[str], now: datetime, grace: timedelta = DEFAULT_GRACE
) -> list[str]:
    """Months with state that are due and not closed yet, oldest first."""
    return sorted(m for m in months - closed if is_closed(m, now, grace))


@dataclass(frozen=True, slots=True)
class Correction:
    tenant_id: str
    month: str
    workload_type: str
    workload_id: str
    #: 1 when the workload is new since the close, else 0.
    workloads_added: int
    points_added: int
    ratecard: str
    #: +1 when the workload is now charged as rental and was not, -1 the other way.
    rental_added: int = 0

    @property
    def key(self) -> str:
        return f"{self.tenant_id}/{self.month}/{self.workload_type}/{self.workload_id}"


def corrections(tm: TenantMonth, final: Snapshot) -> Iterator[Correction]:
    """Every workload whose state differs from the final snapshot."""
    for wtype, wid, rate in tm.entries():
        yield from correction_for(tm.tenant_id, tm.month, wtype, wid, rate, final.get((wtype, wid)))


def correction_for(
    tenant_id: str, month: str, wtype: str, wid: str, rate: Rate, before: Rate | None
) -> Iterator[Correction]:
    """The correction for one workload now at ``rate`` and ``before`` at close."""
    rental = rental_machine(rate)
    if before is None:
        yield Correction(tenant_id, month, wtype, wid, 1, rate[0], rate[1], rental)
    elif rate != before:
        yield Correction(
            tenant_id, month, wtype, wid, 0, rate[0] - before[0], rate[1],
            rental - rental_machine(before),
        )  # fmt: skip


def snapshot_totals(final: Snapshot) -> dict[str, list[int]]:
    """``workload_type -> [workloads, points]`` of a final snapshot."""
    totals: dict[str, list[int]] = {}
    for (wtype, _), rate in final.items():
        t = totals.setdefault(wtype, [0, 0, 0])
        t[0] += 1
        t[1] += rate[0]
        t[2] += rental_machine(rate)
    return totals
