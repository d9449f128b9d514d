"""The monthly ledger: distinct counted workloads per tenant and month, as a join.

State is a map ``(tenant, month) -> workload_type -> {workload_id: Rate}``
where the value is the highest rate of the workload's counted events that
month.  Applying an event or merging another ledger only ever takes a maximum
or adds a key, so the ledger is a join-semilattice: merging in any order, any
number of times, gives the same state.  That one property makes duplicates,
reordering, replays, redeliveries and rebalances harmless.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from meter.domain.ratecard import Height, Rate, points_height, rental_machine

COUNTED: Final = "counted"
DUPLICATE: Final = "duplicate"
NOT_COUNTED: Final = "not_counted"
REJECTED: Final = "rejected"
OUTCOMES: Final = (COUNTED, DUPLICATE, NOT_COUNTED, REJECTED)

#: (tenant, month, workload_type): one type of workloads in a tenant-month
Cell = tuple[str, str, str]


class TenantMonth:
    """One tenant's workloads in one month, with running totals per type.

    ``types[workload_type][workload_id]`` is the workload's rate: ids keyed by themselves
    inside a type, no tuple per workload (a month of a million workloads is held in
    about a tenth of the memory tuple keys took).  ``revision`` is the sum of the
    workloads' heights (``height`` maps the rate order strictly into positive integers,
    see :attr:`RateCards.height`).  The join only adds workloads or raises a workload's
    rate, so the revision strictly grows with every change of state, whatever changed
    (a workload, its points, its license, its card version), and is the same for the
    same state, in whatever order the entries came.  It is kept as state changes.
    """

    __slots__ = ("card_counts", "height", "month", "revision", "tenant_id", "totals", "types")

    def __init__(self, tenant_id: str, month: str, height: Height = points_height) -> None:
        self.tenant_id = tenant_id
        self.month = month
        self.height = height
        #: workload_type -> workload_id -> rate
        self.types: dict[str, dict[str, Rate]] = {}
        #: workload_type -> [workloads, points, charged as rental]; derived from ``types``.
        self.totals: dict[str, list[int]] = {}
        #: card version -> workloads rated by it; derived from ``types``.
        self.card_counts: dict[str, int] = {}
        self.revision = 0

    def add(self, workload_type: str, workload_id: str, rate: Rate) -> bool:
        """Join one workload's rate in; True when the state changed."""
        held = self.types.get(workload_type)
        if held is None:
            held = self.types[workload_type] = {}
        old = held.get(workload_id)
        if old is not None and old >= rate:
            return False
        held[workload_id] = rate
        self.counted(workload_type, old, rate)
        return True

    def counted(self, workload_type: str, old: Rate | None, rate: Rate) -> None:
        """Bring the totals up to date with a workload that went from ``old`` (``None``:
        absent) to the higher ``rate`` in :attr:`types`."""
        cards = self.card_counts
        if old is None:
            t = self.totals.get(workload_type)
            rental = rental_machine(rate)
            if t is None:
                self.totals[workload_type] = [1, rate[0], rental]
            else:
                t[0] += 1
                t[1] += rate[0]
                t[2] += rental
            self.revision += self.height(rate)
            cards[rate[1]] = cards.get(rate[1], 0) + 1
            return
        t = self.totals[workload_type]
        t[1] += rate[0] - old[0]
        t[2] += rental_machine(rate) - rental_machine(old)
        self.revision += self.height(rate) - self.height(old)
        if rate[1] != old[1]:
            cards[rate[1]] = cards.get(rate[1], 0) + 1
            if cards[old[1]] == 1:
                del cards[old[1]]
            else:
                cards[old[1]] -= 1

    def rate(self, workload_type: str, workload_id: str) -> Rate | None:
        """The workload's rate; ``None`` when it is not counted here."""
        held = self.types.get(workload_type)
        return None if held is None else held.get(workload_id)

    def entries(self) -> Iterator[tuple[str, str, Rate]]:
        """Every ``(workload_type, workload_id, rate)``."""
        for wtype, held in self.types.items():
            for wid, rate in held.items():
                yield wtype, wid, rate

    def snapshot(self) -> dict[tuple[str, str], Rate]:
        """``(workload_type, workload_id) -> rate`` of every workload (a month's close)."""
        return {(w, i): r for w, held in self.types.items() for i, r in held.items()}

    def __len__(self) -> int:
        return sum(len(held) for held in self.types.values())

    @property
    def workload_count(self) -> int:
        return sum(t[0] for t in self.totals.values())

    @property
    def points(self) -> int:
        return sum(t[1] for t in self.totals.values())

    @property
    def ratecards(self) -> list[str]:
        """The card versions that rated this tenant-month's workloads."""
        return sorted(self.card_counts)


@dataclass(frozen=True, slots=True)
class UsageRow:
    month: str
    tenant_id: str
    workload_type: str
    workloads: int
    points: int
    #: Of ``workloads``, rental machines: free because their tenant is on rental
    #: (:func:`~meter.domain.ratecard.rental_machine`).
    rental: int = 0


class Ledger:
    """Join-shaped monthly state.  ``add`` is the hot path.

    ``height`` gives each tenant-month's ``revision``; a ledger whose revisions
    are published takes its rate cards' (``Ledger(height=cards.height)``).  The
    default, :func:`~meter.domain.ratecard.points_height`, makes the revision
    ``workloads + points``, which ties when only a card version or license changes.
    """

    __slots__ = ("_months", "cells", "height")

    def __init__(self, height: Height = points_height) -> None:
        self.height = height
        self._months: dict[tuple[str, str], TenantMonth] = {}
        #: (tenant, month, type) -> the tenant-month's own ``workload -> rate`` dict of that
        #: type: two lookups answer "already counted at this rate or higher?", which is
        #: what most events are.  Read it; change it only through this class's methods.
        self.cells: dict[Cell, dict[str, Rate]] = {}

    def cell(self, tenant_id: str, month: str, workload_type: str) -> dict[str, Rate]:
        """The tenant-month's ``workload -> rate`` dict of a type, made when absent.  A
        caller that puts a new workload in it itself brings the totals up to date with
        :meth:`index_new` before anything reads them."""
        held = self.cells.get((tenant_id, month, workload_type))
        if held is None:
            tm = self._months.get((tenant_id, month))
            if tm is None:
                tm = self._months[(tenant_id, month)] = TenantMonth(tenant_id, month, self.height)
            held = tm.types.get(workload_type)
            if held is None:
                held = tm.types[workload_type] = {}
            self.cells[(tenant_id, month, workload_type)] = held
        return held

    def add(
        self, tenant_id: str, month: str, workload_type: str, workload_id: str, rate: Rate
    ) -> bool:
        """Join one ledger entry in; True when the state changed."""
        held = self.cells.get((tenant_id, month, workload_type))
        if held is None:
            held = self.cell(tenant_id, month, workload_type)
        old = held.get(workload_id)
        if old is not None and old >= rate:
            return False
        held[workload_id] = rate
        self._months[(tenant_id, month)].counted(workload_type, old, rate)
        return True

    def index_new(self, entries: list[tuple[Cell, Rate]]) -> None:
        """Bring the tenant-months' totals up to date with ``entries``: the (tenant, month,
        type) and rate of workloads each just put into its :meth:`cell` where it was absent
        (``meter rate``'s hot path puts them there itself, so the events after it find
        them, and calls this once a batch).  Between the two, the totals are not to be
        read."""
        months = self._months
        height = self.height
        tm: TenantMonth | None = None
        for (tenant_id, month, workload_type), rate in entries:
            if tm is None or tm.tenant_id is not tenant_id or tm.month != month:
                tm = months[(tenant_id, month)]
            t = tm.totals.get(workload_type)
            rental = rental_machine(rate)
            if t is None:
                tm.totals[workload_type] = [1, rate[0], rental]
            else:
                t[0] += 1
                t[1] += rate[0]
                t[2] += rental
            tm.revision += height(rate)
            cards = tm.card_counts
            cards[rate[1]] = cards.get(rate[1], 0) + 1

    def load(
        self, tenant_id: str, month: str, workload_type: str, rate: Rate, ids: list[str]
    ) -> None:
        """Join workloads of one type at one rate into a tenant-month, none of which it holds
        yet (loading saved state: the caller has checked): one totals update per call."""
        n = len(ids)
        if not n:
            return
        self.cell(tenant_id, month, workload_type).update(dict.fromkeys(ids, rate))
        tm = self._months[(tenant_id, month)]
        rental = n * rental_machine(rate)
        t = tm.totals.get(workload_type)
        if t is None:
            tm.totals[workload_type] = [n, rate[0] * n, rental]
        else:
            t[0] += n
            t[1] += rate[0] * n
            t[2] += rental
        tm.revision += self.height(rate) * n
        tm.card_counts[rate[1]] = tm.card_counts.get(rate[1], 0) + n

    def drop_month(self, month: str) -> int:
        """Forget every tenant-month of ``month`` (its state is kept elsewhere: pruning a
        closed month from memory); returns the entries dropped."""
        gone = [key for key in self._months if key[1] == month]
        dropped = 0
        cells = self.cells
        for key in gone:
            tm = self._months.pop(key)
            for wtype in tm.types:
                cells.pop((tm.tenant_id, month, wtype), None)
            dropped += len(tm)
        return dropped

    def rate(self, tenant_id: str, month: str, workload_type: str, workload_id: str) -> Rate | None:
        """The workload's rate in the tenant-month; ``None`` when it is not counted there."""
        held = self.cells.get((tenant_id, month, workload_type))
        return None if held is None else held.get(workload_id)

    def merge(self, other: Ledger) -> Ledger:
        """Join ``other`` into this ledger (in place) and return self.

        Revisions are this ledger's, by this ledger's ``height``."""
        for entry in other.entries():
            self.add(*entry)
        return self

    def entries(self) -> Iterator[tuple[str, str, str, str, Rate]]:
        """Every ``(tenant_id, month, workload_type, workload_id, rate)``."""
        for tm in self._months.values():
            for wtype, held in tm.types.items():
                for wid, rate in held.items():
                    yield tm.tenant_id, tm.month, wtype, wid, rate

    def tenant_month(self, tenant_id: str, month: str) -> TenantMonth | None:
        return self._months.get((tenant_id, month))

    def tenant_months(self) -> Iterable[TenantMonth]:
        return self._months.values()

    def usage(self, month: str | None = None, tenant_id: str | None = None) -> list[UsageRow]:
        """Rows sorted by month, tenant_id, workload_type; one per non-empty group."""
        rows = [
            UsageRow(tm.month, tm.tenant_id, wtype, t[0], t[1], t[2])
            for tm in self._months.values()
            if (month is None or tm.month == month)
            and (tenant_id is None or tm.tenant_id == tenant_id)
            for wtype, t in tm.totals.items()
            if t[0] > 0
        ]
        rows.sort(key=lambda r: (r.month, r.tenant_id, r.workload_type))
        return rows

    def __len__(self) -> int:
        return sum(len(held) for held in self.cells.values())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ledger):
            return NotImplemented
        return sorted(self.entries()) == sorted(other.entries())

    __hash__ = None  # type: ignore[assignment]
