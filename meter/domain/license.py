"""The license view: what the vendor bills the provider, by the vendor's rules.

meter keeps two views of the same events; their names are used everywhere:

- **tenant usage** (calendar month): :class:`~meter.domain.ledger.Ledger`.  A workload
  counts in the UTC calendar month of its sessions.  What a provider charges its own
  tenants; ``meter.usage``, ``meter report``, ``meter rate`` and the dashboards.
- **license usage** (vendor rules): this module.  What the provider submits to the
  vendor and is billed on (``--format vspc-csv``, the month close's license report,
  the license gauges).

The vendor's rules (Veeam Cloud Connect Guide, "Veeam Cloud Connect License" and
"License Usage Reporting"; Veeam Rental Licensing and Usage Reporting Guide; cited
with addresses in the README):

- A *protected workload* has at least one restore point in the past **31 days**.  The
  report for month M is generated at B = 00:00 UTC on the first day of M+1, so
  ``counted(M)`` is every workload with a ``success``/``warning`` session in
  [B - 31 days, B): all of M, and for a month shorter than 31 days the last days of
  the month before (:func:`tail_month`).
- A *new workload* was processed for the first time in the calendar month; it consumes
  no points in that month (it is listed for information) and is an ordinary workload
  from the next month.  ``first(w)`` is the month of w's earliest counted session meter
  knows of; ``new(M)`` are the counted workloads with ``first == M``.
- The **history start** is the month metering began, a declared fact (``--history-start``
  or ``history_start`` in the license file), never a guess from the data: one event
  dated 2001 must not make every workload of the real first month new (and free).  The
  history start has no new workloads (meter cannot know what ran before it, and billing
  them is the safe side); with none declared, **no workload is new**: all are billed.
  Sessions before the history start count in tenant usage, and in the license view only
  where the window puts them (the last days of the month before the start reach into the
  start's window); months before the start have no license report, and such a session
  still makes its workload not new afterwards (it ran before).
- Each workload is charged once, at the highest rate of its sessions in the window
  (each session rated by the card in effect at its time).

It is still a join: ``first`` is a minimum, windows are sets, rates a maximum, and the
history start a constant.  :class:`LicenseLedger` keeps per
tenant-month totals incrementally, so a change costs O(1), not a rescan.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from sys import intern
from typing import Final

from meter.domain.ledger import Cell, Ledger
from meter.domain.month import days_in_month, parse_month
from meter.domain.ratecard import Height, Rate, rental_machine
from meter.errors import ConfigError

#: A workload is protected with a restore point in the past this many days.
WINDOW_DAYS: Final = 31
#: The rules, as every license report states them.
RULES: Final = {
    "view": "license",
    "window_days": WINDOW_DAYS,
    "counted": "success or warning session in [B - 31 days, B), B = 00:00 UTC on the "
    "first day of the next month",
    "new_workloads": "first counted session in the month; free in that month",
    "rental": "backups of rental tenants consume 0 points (rental machines: counted in "
    "rental); replicas always consume",
    "rate": "highest rate of the window's sessions, each by the card in effect then",
}

#: (tenant, month, workload_type, workload_id)
Key = tuple[str, str, str, str]

_TAIL_CACHE: dict[int, str | None] = {}


def next_month(month: str) -> str | None:
    """The month after ``month`` (``YYYY-MM``); ``None`` after 9999-12."""
    y, m = int(month[:4]), int(month[5:7])
    if m == 12:
        return None if y >= 9999 else f"{y + 1:04d}-01"
    return f"{y:04d}-{m + 1:02d}"


def previous_month(month: str) -> str | None:
    """The month before ``month``; ``None`` before 0001-01."""
    y, m = int(month[:4]), int(month[5:7])
    if m == 1:
        return None if y <= 1 else f"{y - 1:04d}-12"
    return f"{y:04d}-{m - 1:02d}"


def window(month: str) -> tuple[date, date | None]:
    """``[start, end)`` of ``month``'s 31-day window, as UTC dates.

    ``end`` is the first day of the next month (``None`` for 9999-12, whose window is
    then its own 31 days: the month has 31)."""
    y, m = int(month[:4]), int(month[5:7])
    nxt = next_month(month)
    if nxt is None:
        return date(y, m, 1), None
    end = date(int(nxt[:4]), int(nxt[5:7]), 1)
    return end - timedelta(days=WINDOW_DAYS), end


def tail_month(day: int) -> str | None:
    """The month whose window reaches back to the UTC date ``day`` (``YYYYMMDD``) in
    the month before it, or ``None``.

    A session on day d of month X also counts in X+1's report when X+1 has fewer than
    31 days and d is among X's last ``31 - days(X+1)`` days: e.g. 29-31 January for
    February (30-31 in a leap year), 31 March for April.  Cheap: days before the 29th
    never are.
    """
    if day % 100 < 29:
        return None
    hit = _TAIL_CACHE.get(day, "")
    if hit != "":
        return hit
    y, m, d = day // 10000, day // 100 % 100, day % 100
    out: str | None = None
    if y >= 1:
        ny, nm = (y + 1, 1) if m == 12 else (y, m + 1)
        if ny <= 9999 and d > days_in_month(y, m) + days_in_month(ny, nm) - WINDOW_DAYS:
            out = f"{ny:04d}-{nm:02d}"
    if len(_TAIL_CACHE) > 100_000:
        _TAIL_CACHE.clear()
    _TAIL_CACHE[day] = out
    return out


@dataclass(frozen=True, slots=True)
class LicenseRow:
    """One tenant's workloads of one type in one month's license report."""

    month: str
    tenant_id: str
    workload_type: str
    #: counted workloads (window), new ones included
    workloads: int
    #: of ``workloads``, new this month: free this month
    new: int
    #: of ``workloads``, rental machines (:func:`~meter.domain.ratecard.rental_machine`)
    rental: int
    #: points of the workloads that are not new: what the vendor bills
    points: int
    #: points the new workloads would have consumed (for information)
    new_points: int

    @property
    def billable(self) -> int:
        return self.workloads - self.new


class LicenseMonth:
    """One tenant's license totals in one month, per workload type.

    ``totals[type] = [workloads, new, rental, points, new_points]``.  ``revision``
    is the sum of the counted workloads' rate heights plus the number that are not
    new: with a fixed history start it strictly grows with every change of what the
    report shows (a workload joins, its rate rises, or it stops being new)."""

    __slots__ = ("month", "revision", "tenant_id", "totals")

    def __init__(self, tenant_id: str, month: str) -> None:
        self.tenant_id = tenant_id
        self.month = month
        self.totals: dict[str, list[int]] = {}
        self.revision = 0

    @property
    def points(self) -> int:
        return sum(t[3] for t in self.totals.values())

    @property
    def new_points(self) -> int:
        return sum(t[4] for t in self.totals.values())

    def rows(self) -> list[LicenseRow]:
        return [
            LicenseRow(self.month, self.tenant_id, wtype, *t)
            for wtype, t in sorted(self.totals.items())
            if t[0] > 0
        ]


#: What one workload contributes to a month's report: its rate and whether it is new.
Contribution = tuple[Rate, bool]


class LicenseLedger:
    """The license view beside a calendar :class:`Ledger`, kept up to date as a join.

    Feed every calendar entry through :meth:`add` (it joins the calendar ledger too)
    and every tail entry (a session in the last days of a month, for the next month's
    window: :func:`tail_month`) through :meth:`add_tail`.

    ``history_start`` is the first month of meter's history (declared, never taken from
    the data): it has no new workloads and no month before it has a report.  ``None``:
    none declared, no workload is new in any month.
    """

    __slots__ = (
        "_start",
        "calendar",
        "first",
        "height",
        "months",
        "moved_first",
        "tails",
    )

    def __init__(
        self,
        calendar: Ledger | None = None,
        history_start: str | None = None,
        height: Height | None = None,
    ) -> None:
        self.calendar = calendar if calendar is not None else Ledger()
        self.height: Height = height if height is not None else self.calendar.height
        self._start = history_start
        #: After :meth:`add`: the workload's first month it moved from, or None.
        self.moved_first: str | None = None
        #: (tenant, report month, type) -> workload -> highest rate of its tail sessions
        self.tails: dict[Cell, dict[str, Rate]] = {}
        #: (tenant, type) -> workload -> month of its earliest counted session
        self.first: dict[tuple[str, str], dict[str, str]] = {}
        #: (tenant, month) -> totals
        self.months: dict[tuple[str, str], LicenseMonth] = {}
        # A calendar given full: its entries oldest month first, so each workload's first
        # month is known before any later month of it is counted.
        by_month: dict[str, list[tuple[str, str, str]]] = {}
        for t, m, w, i, _ in self.calendar.entries():
            by_month.setdefault(m, []).append((t, w, i))
        for m in sorted(by_month):
            for t, w, i in by_month[m]:
                self._joined(t, m, w, i, None, None)

    @property
    def history_start(self) -> str | None:
        """The declared first month of meter's history; ``None``: none declared."""
        return self._start

    # ------------------------------------------------------------------ joins

    def add(self, tenant: str, month: str, wtype: str, wid: str, rate: Rate) -> bool:
        """Join a calendar entry (into the calendar ledger too); True when it changed.

        ``moved_first`` is then the workload's old first month when this entry moved it
        earlier (its report there changed: the workload is no longer new in it), else None.
        """
        cal = self.calendar
        held = cal.cells.get((tenant, month, wtype))
        old = None if held is None else held.get(wid)
        if old is not None and old >= rate:
            return False
        if old is None:
            # One string per workload id, whatever months, windows and maps it is in: the
            # first-month map outlives the months (interned strings die with their last use).
            wid = intern(wid)
        firsts = self.first.get((tenant, wtype))
        first = None if firsts is None else firsts.get(wid)
        start = self._start
        if (first is None or first <= month) and (start is None or month >= start):
            # The common case: the first month does not move, so only this month's
            # report changes, and only by this workload's line.
            self.moved_first = None
            tail = self._tail(tenant, month, wtype, wid) if self.tails else None
            new = start is not None and (first is None or first == month) and month > start
            if old is not None:
                before: Contribution | None = (old if tail is None or old >= tail else tail, new)
            elif tail is not None:
                before = (tail, False)
            else:
                before = None
            if first is None:
                if firsts is None:
                    firsts = self.first[(tenant, wtype)] = {}
                firsts[wid] = month
            cal.add(tenant, month, wtype, wid, rate)
            self._shift(
                tenant, month, wtype, before, (rate if tail is None or rate >= tail else tail, new)
            )
            return True
        # The months whose report this can change: this one, and the one it was new in.
        before = self._contribution(tenant, month, wtype, wid)
        was_first = (
            (first, self._contribution(tenant, first, wtype, wid))
            if first is not None and month < first
            else None
        )
        self.moved_first = first if was_first is not None else None
        cal.add(tenant, month, wtype, wid, rate)
        self._joined(tenant, month, wtype, wid, before, was_first)
        return True

    def _joined(
        self,
        tenant: str,
        month: str,
        wtype: str,
        wid: str,
        before: Contribution | None,
        was_first: tuple[str, Contribution | None] | None,
    ) -> None:
        self._note_first(tenant, wtype, wid, month)
        self._shift(tenant, month, wtype, before, self._contribution(tenant, month, wtype, wid))
        if was_first is not None:
            old_first, old = was_first
            self._shift(
                tenant, old_first, wtype, old, self._contribution(tenant, old_first, wtype, wid)
            )

    def add_tail(self, tenant: str, month: str, wtype: str, wid: str, rate: Rate) -> bool:
        """Join a session from the last days of the month before ``month`` into
        ``month``'s window; True when the tail state changed."""
        held = self.tails.get((tenant, month, wtype))
        old = None if held is None else held.get(wid)
        if old is not None and old >= rate:
            return False
        before = self._contribution(tenant, month, wtype, wid)
        if held is None:
            held = self.tails[(tenant, month, wtype)] = {}
        held[intern(wid)] = rate
        self._shift(tenant, month, wtype, before, self._contribution(tenant, month, wtype, wid))
        return True

    def note_first(self, tenant: str, wtype: str, wid: str, month: str) -> None:
        """Join a workload's first month in (a minimum) without its entries: a month kept
        on disk, not in memory, still decides which later months a workload is new in.
        Load these before the entries of later months."""
        self._note_first(tenant, wtype, wid, month)

    def _note_first(self, tenant: str, wtype: str, wid: str, month: str) -> None:
        firsts = self.first.get((tenant, wtype))
        if firsts is None:
            self.first[(tenant, wtype)] = {intern(wid): month}
            return
        first = firsts.get(wid)
        if first is None:
            firsts[intern(wid)] = month
        elif month < first:
            firsts[wid] = month

    def first_month(self, tenant: str, wtype: str, wid: str) -> str | None:
        """The month of the workload's earliest counted session; ``None``: never counted."""
        firsts = self.first.get((tenant, wtype))
        return None if firsts is None else firsts.get(wid)

    def firsts(self) -> Iterator[tuple[str, str, str, str]]:
        """Every workload's ``(tenant, type, workload, first month)``."""
        for (tenant, wtype), firsts in self.first.items():
            for wid, month in firsts.items():
                yield tenant, wtype, wid, month

    def _tail(self, tenant: str, month: str, wtype: str, wid: str) -> Rate | None:
        held = self.tails.get((tenant, month, wtype))
        return None if held is None else held.get(wid)

    def tail_entries(self, month: str | None = None) -> Iterator[tuple[str, str, str, str, Rate]]:
        """Every tail entry ``(tenant, report month, type, workload, rate)`` (of ``month``)."""
        for (tenant, m, wtype), held in self.tails.items():
            if month is None or m == month:
                for wid, rate in held.items():
                    yield tenant, m, wtype, wid, rate

    def load_state(self, month: str, groups: Iterable[tuple[str, str, Rate, list[str]]]) -> None:
        """Join a month's saved entries in, one (tenant, type, rate) group at a time: the
        same state as :meth:`add` of each (what is not plainly new goes through it), with
        one totals update per group.  Load the first-month rows before."""
        cal = self.calendar
        cells = cal.cells
        height = self.height
        no_ids: dict[str, object] = {}
        start = self._start
        for tenant, wtype, rate, ids in groups:
            if (start is not None and month < start) or len(set(ids)) != len(ids):
                # Before the history start (no report), or a workload twice (never saved so).
                for wid in ids:
                    self.add(tenant, month, wtype, wid, rate)
                continue
            held = cells.get((tenant, month, wtype)) or no_ids
            tails = self.tails.get((tenant, month, wtype)) or no_ids
            first = self.first.get((tenant, wtype))
            if first is None:
                first = self.first[(tenant, wtype)] = {}
            plain: list[str] = []
            other: list[str] = []
            fresh = 0
            for wid in map(intern, ids):
                f = first.get(wid)
                if wid in held or (f is not None and f > month) or wid in tails:
                    other.append(wid)
                    continue
                if f is None:
                    first[wid] = month
                    fresh += 1
                elif f == month:
                    fresh += 1
                plain.append(wid)
            if plain:
                cal.load(tenant, month, wtype, rate, plain)
                n = len(plain)
                new = fresh if start is not None and month > start else 0
                old = n - new
                lm = self.months.get((tenant, month))
                if lm is None:
                    lm = self.months[(tenant, month)] = LicenseMonth(tenant, month)
                t = lm.totals.get(wtype)
                if t is None:
                    t = lm.totals[wtype] = [0, 0, 0, 0, 0]
                t[0] += n
                t[2] += n * rental_machine(rate)
                t[1] += new
                t[4] += rate[0] * new
                t[3] += rate[0] * old
                h = height(rate)
                lm.revision += h * new + (h + 1) * old
            for wid in other:
                self.add(tenant, month, wtype, wid, rate)
        self.moved_first = None

    def drop_month(self, month: str) -> int:
        """Forget ``month``'s calendar entries, tail entries and report totals (pruning a
        closed month from memory); the first-month map stays.  Returns entries dropped."""
        dropped = self.calendar.drop_month(month)
        for key in [k for k in self.months if k[1] == month]:
            del self.months[key]
        tails = 0
        for cell in [k for k in self.tails if k[1] == month]:
            tails += len(self.tails.pop(cell))
        return dropped + tails

    def merge(self, other: LicenseLedger) -> LicenseLedger:
        """Join ``other``'s calendar and tail entries in (in place); returns self."""
        for entry in other.calendar.entries():
            self.add(*entry)
        for entry in other.tail_entries():
            self.add_tail(*entry)
        return self

    # ------------------------------------------------------------------ reading

    def contribution(self, tenant: str, month: str, wtype: str, wid: str) -> Contribution | None:
        """The workload's rate and new-ness in ``month``'s report; ``None``: not counted
        (nor in any month before the history start: those have no report)."""
        if self._start is not None and month < self._start:
            return None
        return self._contribution(tenant, month, wtype, wid)

    def _contribution(self, tenant: str, month: str, wtype: str, wid: str) -> Contribution | None:
        cal = self.calendar.rate(tenant, month, wtype, wid)
        tail = self._tail(tenant, month, wtype, wid) if self.tails else None
        if cal is None:
            if tail is None:
                return None
            return tail, False  # seen the month before: not new
        rate = cal if tail is None or cal >= tail else tail
        start = self._start
        new = start is not None and month > start and self.first_month(tenant, wtype, wid) == month
        return rate, new

    def workloads(self, month: str) -> Iterator[tuple[str, str, str, Contribution]]:
        """``(tenant, type, workload, contribution)`` of every workload counted in ``month``
        (none before the history start)."""
        if self._start is not None and month < self._start:
            return
        seen: set[tuple[str, str, str]] = set()
        for tm in self.calendar.tenant_months():
            if tm.month != month:
                continue
            for wtype, wid, _ in tm.entries():
                c = self._contribution(tm.tenant_id, month, wtype, wid)
                assert c is not None
                seen.add((tm.tenant_id, wtype, wid))
                yield tm.tenant_id, wtype, wid, c
        for t, m, w, i, _ in self.tail_entries(month):
            if (t, w, i) not in seen:
                c = self._contribution(t, m, w, i)
                assert c is not None
                yield t, w, i, c

    def ratecards_by_month(self, tenant_id: str | None = None) -> dict[str, set[str]]:
        """Every month's card versions of the workloads counted in it (of ``tenant_id``
        only, when given): :meth:`workloads` of every month, in one pass over the ledger."""
        start = self._start
        out: dict[str, set[str]] = {}
        for tm in self.calendar.tenant_months():
            month = tm.month
            if (start is not None and month < start) or tenant_id not in (None, tm.tenant_id):
                continue
            cards = out.setdefault(month, set())
            for wtype, wid, _ in tm.entries():
                c = self._contribution(tm.tenant_id, month, wtype, wid)
                assert c is not None
                cards.add(c[0][1])
        for t, m, w, i, _ in self.tail_entries():
            if (start is not None and m < start) or tenant_id not in (None, t):
                continue
            c = self._contribution(t, m, w, i)
            assert c is not None
            out.setdefault(m, set()).add(c[0][1])
        return out

    def points_by_month(self) -> dict[str, tuple[int, int]]:
        """``month -> (points, new_points)`` of the whole provider: :meth:`points` and
        :meth:`new_points` of every month, in one pass."""
        out: dict[str, tuple[int, int]] = {}
        for (_, m), lm in self.months.items():
            p, n = out.get(m, (0, 0))
            out[m] = (p + lm.points, n + lm.new_points)
        return out

    def before_start(self, tenant_id: str | None = None) -> int:
        """Workload-months of the calendar ledger dated before the history start (of
        ``tenant_id`` only, when given): tenant usage the license view has no month for."""
        start = self._start
        if start is None:
            return 0
        return sum(
            len(ids)
            for (t, m, _), ids in self.calendar.cells.items()
            if m < start and tenant_id in (None, t)
        )

    def tenant_month(self, tenant: str, month: str) -> LicenseMonth | None:
        return self.months.get((tenant, month))

    def tenant_months(self) -> Iterable[LicenseMonth]:
        return self.months.values()

    def report_months(self) -> list[str]:
        """Every month with a counted workload, oldest first."""
        return sorted({m for (_, m), lm in self.months.items() if lm.totals})

    def rows(self, month: str | None = None, tenant_id: str | None = None) -> list[LicenseRow]:
        """Rows sorted by month, tenant, type; one per non-empty group."""
        rows = [
            row
            for (t, m), lm in self.months.items()
            if (month is None or m == month) and (tenant_id is None or t == tenant_id)
            for row in lm.rows()
        ]
        rows.sort(key=lambda r: (r.month, r.tenant_id, r.workload_type))
        return rows

    def new_points(self, month: str) -> int:
        return sum(lm.new_points for (_, m), lm in self.months.items() if m == month)

    def points(self, month: str) -> int:
        return sum(lm.points for (_, m), lm in self.months.items() if m == month)

    # ------------------------------------------------------------------ totals

    def _shift(
        self,
        tenant: str,
        month: str,
        wtype: str,
        before: Contribution | None,
        after: Contribution | None,
    ) -> None:
        if before == after:
            return
        start = self._start
        if start is not None and month < start:
            return  # before the history start: no license report
        key = (tenant, month)
        lm = self.months.get(key)
        if lm is None:
            lm = self.months[key] = LicenseMonth(tenant, month)
        t = lm.totals.get(wtype)
        if t is None:
            t = lm.totals[wtype] = [0, 0, 0, 0, 0]
        height = self.height
        if before is not None:
            rate, new = before
            t[0] -= 1
            t[2] -= rental_machine(rate)
            if new:
                t[1] -= 1
                t[4] -= rate[0]
                lm.revision -= height(rate)
            else:
                t[3] -= rate[0]
                lm.revision -= height(rate) + 1
        if after is not None:
            rate, new = after
            t[0] += 1
            t[2] += rental_machine(rate)
            if new:
                t[1] += 1
                t[4] += rate[0]
                lm.revision += height(rate)
            else:
                t[3] += rate[0]
                lm.revision += height(rate) + 1

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LicenseLedger):
            return NotImplemented
        return self.calendar == other.calendar and sorted(self.tail_entries()) == sorted(
            other.tail_entries()
        )

    __hash__ = None  # type: ignore[assignment]


def license_ledger(
    calendar: Ledger, tails: Iterable[tuple[Key, Rate]], history_start: str | None = None
) -> LicenseLedger:
    """The license view of a calendar ledger and its tail entries (``meter rate``).

    The view shares ``calendar``: what is added to it later joins that ledger too."""
    view = LicenseLedger(calendar, history_start)
    for (t, m, w, i), rate in tails:
        view.add_tail(t, m, w, i, rate)
    return view


# ---------------------------------------------------------------- the provider's license

#: Days an expired license keeps working.
GRACE_DAYS: Final = 60
#: Days before expiry that meter starts warning.
EXPIRY_WARNING_DAYS: Final = 30
#: The states of :func:`license_status`, worst first.
STATES: Final = ("expired", "over_allowance", "grace", "warning", "expiring", "ok", "undeclared")


@dataclass(frozen=True, slots=True)
class ProviderLicense:
    """What the provider licensed from the vendor (``--license FILE``)."""

    licensed_points: int
    #: The last day the license is valid (UTC); ``None``: no expiry declared.
    expires: date | None = None
    source: str = ""
    #: The month metering began (``YYYY-MM``): the license view's history start.
    history_start: str | None = None


def over_warning(licensed: int) -> int:
    """Points over the licensed number past which the vendor's console warns:
    max(10, 10% of licensed).  Used points are whole, so the floor compares exactly."""
    return max(10, licensed // 10)


def over_allowed(licensed: int) -> int:
    """Points the provider may use over the licensed number, before last month's new
    points: max(20, 20% of licensed)."""
    return max(20, licensed // 5)


@dataclass(frozen=True, slots=True)
class LicenseStatus:
    """Used points of a month against the license; every number a reader needs."""

    month: str
    used_points: int
    new_points: int
    previous_new_points: int
    license: ProviderLicense | None
    today: date

    @property
    def declared(self) -> bool:
        return self.license is not None

    @property
    def warning_points(self) -> int | None:
        lic = self.license
        return None if lic is None else lic.licensed_points + over_warning(lic.licensed_points)

    @property
    def allowed_points(self) -> int | None:
        """Licensed + max(20, 20%) + the new points of the previous calendar month."""
        lic = self.license
        if lic is None:
            return None
        return lic.licensed_points + over_allowed(lic.licensed_points) + self.previous_new_points

    @property
    def days_to_expiry(self) -> int | None:
        lic = self.license
        if lic is None or lic.expires is None:
            return None
        return (lic.expires - self.today).days

    @property
    def state(self) -> str:
        if self.license is None:
            return "undeclared"
        days = self.days_to_expiry
        if days is not None and days < -GRACE_DAYS:
            return "expired"
        allowed, warning = self.allowed_points, self.warning_points
        assert allowed is not None and warning is not None
        if self.used_points > allowed:
            return "over_allowance"
        if days is not None and days < 0:
            return "grace"
        if self.used_points > warning:
            return "warning"
        if days is not None and days < EXPIRY_WARNING_DAYS:
            return "expiring"
        return "ok"

    def as_dict(self) -> dict[str, object]:
        lic = self.license
        return {
            "declared": lic is not None,
            "licensed_points": None if lic is None else lic.licensed_points,
            "expires": None if lic is None or lic.expires is None else lic.expires.isoformat(),
            "days_to_expiry": self.days_to_expiry,
            "month": self.month,
            "used_points": self.used_points,
            "new_points": self.new_points,
            "previous_new_points": self.previous_new_points,
            "warning_points": self.warning_points,
            "allowed_points": self.allowed_points,
            "state": self.state,
        }


def parse_license(doc: object, where: str = "<license>") -> ProviderLicense:
    """Validate a decoded license document: ``{"licensed_points": N, "expires": "YYYY-MM-DD",
    "history_start": "YYYY-MM"}`` (``expires`` and ``history_start``, the month metering
    began, optional).  Raises :class:`~meter.errors.ConfigError` naming the problem."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected an object with licensed_points (and expires)")
    unknown = sorted(set(doc) - {"licensed_points", "expires", "history_start", "comment"})
    if unknown:
        raise ConfigError(
            f"{where}: unknown keys {', '.join(map(repr, unknown))}; "
            "expected licensed_points, expires, history_start (and comment)"
        )
    start = doc.get("history_start")
    if start is not None:
        try:
            start = parse_month(start) if isinstance(start, str) else parse_month("")
        except ValueError:
            raise ConfigError(
                f"{where}: history_start must be the month metering began, YYYY-MM, "
                f"got {start!r:.40}"
            ) from None
    points = doc.get("licensed_points")
    if isinstance(points, int) and not isinstance(points, bool):
        if not 0 <= points <= MAX_LICENSED_POINTS:
            raise ConfigError(
                f"{where}: licensed_points {points} is out of range: allowed 0 to "
                f"{MAX_LICENSED_POINTS}"
            )
    else:
        raise ConfigError(f"{where}: licensed_points must be a whole number >= 0, got {points!r}")
    expires = doc.get("expires")
    day: date | None = None
    if expires is not None:
        day = _iso_date(expires)
        if day is None:
            raise ConfigError(
                f"{where}: expires must be a date YYYY-MM-DD (the last valid day), "
                f"got {expires!r:.40}"
            )
    assert isinstance(points, int)
    return ProviderLicense(points, day, where, start)


def _iso_date(value: object) -> date | None:
    if not isinstance(value, str) or len(value) != 10:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        return None


#: The largest license file read: a license is a few hundred bytes.
MAX_LICENSE_BYTES: Final = 64 * 1024
#: The largest licensed_points: a metric (a float64) holds every whole number up to it.
MAX_LICENSED_POINTS: Final = 2**53 - 1


class _Written:
    """A JSON number that is not an integer, as written in the file (``1.5``, ``1e19``):
    never a number of points, and an error shows it as the file has it."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON value")


def read_license_file(path: str) -> bytes:
    """The license file's bytes; a missing, unreadable or oversized one is a ConfigError."""
    try:
        with Path(path).open("rb") as f:
            raw = f.read(MAX_LICENSE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read license file: {exc.strerror}") from exc
    if len(raw) > MAX_LICENSE_BYTES:
        raise ConfigError(
            f"{path}: the file is larger than {MAX_LICENSE_BYTES} bytes: not a license file "
            "(one is a JSON object of a few hundred bytes)"
        )
    return raw


def license_from_bytes(raw: bytes, where: str) -> ProviderLicense:
    """Decode and validate a license file's bytes.  Integers are decoded exactly (a
    ``licensed_points`` of 2^64 is out of range, not 1.8e19), other numbers kept as
    written."""
    try:
        doc = json.loads(raw, parse_float=_Written, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: not valid JSON: {exc}") from exc
    return parse_license(doc, where)


def load_license(path: str) -> ProviderLicense:
    """Read a license file (JSON); a missing, malformed or oversized one is a ConfigError."""
    return license_from_bytes(read_license_file(path), path)


def license_summary(lic: ProviderLicense) -> str:
    """``1000 points, expires 2027-06-30`` (or ``no expiry``)."""
    expiry = "no expiry" if lic.expires is None else f"expires {lic.expires.isoformat()}"
    return f"{lic.licensed_points} points, {expiry}"


class LicenseWatch:
    """The license file of a running worker, checked again now and then (and on SIGHUP).

    :meth:`seen` is the whole rule, pure: given what the file holds now (its bytes, or
    the problem reading it), it keeps :attr:`current` or replaces it, and returns the one
    line to log, or ``None`` when nothing is new:

    - a valid file whose license differs: it becomes current; INFO ``old -> new``;
    - a broken, oversized or deleted file, or one that changes ``history_start`` (a
      restart of every worker changes that, never one worker in flight): the running
      license stays; one WARNING naming the problem, once per distinct problem;
    - the same bytes as last time, or a valid file with the same license: nothing.
    """

    def __init__(self, path: str, current: ProviderLicense) -> None:
        self.path = path
        self.current = current
        self._last: bytes | str | None = None  # the bytes or problem last seen
        self._problem: str | None = None

    def seen(self, raw: bytes | None, problem: str | None = None) -> tuple[int, str] | None:
        """What the file holds now: ``raw`` (its bytes) or ``problem`` (why it could not be
        read).  Returns ``(logging level, message)`` to log, or ``None``."""
        state: bytes | str = raw if raw is not None else f"problem:{problem}"
        if state == self._last:
            return None
        self._last = state
        new: ProviderLicense | None = None
        if raw is not None:
            try:
                new = license_from_bytes(raw, self.path)
            except ConfigError as exc:
                problem = str(exc)
        if new is not None and new.history_start != self.current.history_start:
            problem = (
                f"{self.path}: history_start {new.history_start or 'none'} differs from "
                f"{self.current.history_start or 'none'}, the one the worker runs with: "
                "restart the workers to change it"
            )
            new = None
        if new is None:
            if problem == self._problem:
                return None
            self._problem = problem
            return logging.WARNING, (
                f"license file {problem}; keeping the running license "
                f"({license_summary(self.current)})"
            )
        had_problem, self._problem = self._problem, None
        old, self.current = self.current, new
        if new.licensed_points == old.licensed_points and new.expires == old.expires:
            if had_problem is None:
                return None
            return logging.INFO, (
                f"license file {self.path} is valid again: {license_summary(new)} (unchanged)"
            )
        return logging.INFO, (
            f"license file {self.path} reloaded: {license_summary(old)} -> {license_summary(new)}"
        )

    def check(self) -> tuple[int, str] | None:
        """Read the file and :meth:`seen` it (the adapter: the only part that reads)."""
        try:
            raw = read_license_file(self.path)
        except ConfigError as exc:
            return self.seen(None, str(exc))
        return self.seen(raw)
