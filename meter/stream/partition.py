"""One home partition's state and its lifecycle: who may use it, and when.

A *home partition* ``p`` is partition ``p`` of ``meter.jobs.by-tenant`` and of
the ledger changelog; the worker that owns it in the consumer group keeps its
ledger.  Every rule about when that ledger may be trusted lives here, in one
enum and one table of allowed moves (the shape of Kafka Streams' ``Task.State``)::

    RECOVERING --replayed to the changelog's end--> ACTIVE
    ACTIVE --ownership in doubt: lease lapsed, a foreign write, a failed write--> FENCED
    FENCED --caught up from the changelog (or rebuilt)--> RECOVERING --> ACTIVE
    any --given away in a rebalance--> CLOSED

The rules:

- Only an ACTIVE partition is published from, and events homed on it are applied
  only while it is ACTIVE.
- A change is *pending* until the changelog write that carries it is acknowledged;
  only then does its tenant-month become publishable (``dirty``).  So
  ``meter.usage`` only ever shows state the changelog holds.
- ``changelog_end``: every changelog record below this offset is joined into the
  ledger.  The broker gives a partition's offsets one after the other, so our own
  acknowledged writes must land exactly there.  A write that lands *past* it means
  someone else wrote in between (another worker took the partition while this one
  was paused): FENCED, and caught up from ``changelog_end`` before use.  A write that
  lands *below* it means the log went backwards: the broker lost data
  (:class:`DataLostError`), and nothing is trusted any more.
- A write that failed or was abandoned leaves changes in the ledger that the
  changelog does not hold: the ledger is rebuilt from offset 0 before use.
- The worker may have a batch's changelog write in flight while it applies the next
  batch: each batch's changes travel in their own :class:`ChangeBatch`, and only its
  acknowledgement makes *its* tenant-months publishable.  A batch acknowledged after
  the partition was fenced (``epoch`` moved on) promotes nothing: catching up from the
  changelog republishes everything anyway.

Catching up is always safe because the changelog is a join: replaying any records
again, ours included, changes nothing.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, TypeVar

import orjson

from meter.domain import Height, Ledger, Rate, points_height
from meter.domain.license import Contribution, LicenseLedger
from meter.errors import BrokerError
from meter.store import Checkpoint, LocalStateError, PartitionStore, RowsElsewhere, StoreError
from meter.stream.closing import (
    HomeClose,
    LicenseSnapshot,
    encode_closed_marker,
    encode_final_chunk,
)
from meter.stream.records import (
    ChangelogError,
    Entry,
    StateGroup,
    encode_firsts,
    encode_license_final_chunk,
    encode_state,
    encode_tails,
    read_changelog,
)
from meter.stream.snapshots import Published

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_K = TypeVar("_K")

#: (tenant, month) of a tenant-month.
TM = tuple[str, str]
#: (tenant, month, workload_type, workload_id) of a workload in a tenant-month.
WorkloadKey = tuple[str, str, str, str]


class Phase(enum.Enum):
    RECOVERING = "recovering"
    ACTIVE = "active"
    FENCED = "fenced"
    CLOSED = "closed"


_MOVES: Final = {
    Phase.RECOVERING: frozenset({Phase.ACTIVE, Phase.FENCED, Phase.CLOSED}),
    Phase.ACTIVE: frozenset({Phase.FENCED, Phase.CLOSED}),
    Phase.FENCED: frozenset({Phase.RECOVERING, Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}


@dataclass(slots=True)
class ChangeBatch:
    """What one input batch changed in a home partition: the changelog entries that carry
    it, and what becomes publishable once they are acknowledged."""

    #: The partition's epoch when the batch was taken (see :attr:`HomePartition.epoch`).
    epoch: int = -1
    entries: list[Entry] = field(default_factory=list)
    #: Late events' ids by index into ``entries``.
    event_ids: dict[int, str] = field(default_factory=dict)
    #: Tail entries (license view).
    tails: list[Entry] = field(default_factory=list)
    #: Tenant-month -> earliest arrival (ms) of a change to it.
    pending: dict[TM, int] = field(default_factory=dict)
    corr: set[WorkloadKey] = field(default_factory=set)
    lic: set[TM] = field(default_factory=set)
    lcorr: set[WorkloadKey] = field(default_factory=set)

    def __bool__(self) -> bool:
        """True when there is anything to write to the changelog."""
        return bool(self.entries or self.tails)


#: (tenant, workload_type, workloads, points, charged as rental)
UsageTotal = tuple[str, str, int, int, int]
#: (tenant, workload_type, workloads, new, rental, points, new points)
LicenseTotal = tuple[str, str, int, int, int, int, int]


@dataclass(frozen=True, slots=True)
class MonthTotals:
    """What /metrics shows of a month pruned from memory: its tenants' totals per type, in
    both views, a few bytes per tenant where the month itself takes a few hundred per
    workload.  Kept in local state as the row ``totals:<month>``."""

    month: str
    usage: tuple[UsageTotal, ...]
    license: tuple[LicenseTotal, ...]

    @classmethod
    def of(cls, ledger: Ledger, license: LicenseLedger, month: str) -> MonthTotals:
        return cls(
            month,
            tuple(
                (tm.tenant_id, w, t[0], t[1], t[2])
                for tm in ledger.tenant_months()
                if tm.month == month
                for w, t in sorted(tm.totals.items())
                if t[0]
            ),
            tuple(
                (lm.tenant_id, w, *t)  # type: ignore[misc]
                for lm in license.tenant_months()
                if lm.month == month
                for w, t in sorted(lm.totals.items())
                if t[0]
            ),
        )

    def encode(self) -> bytes:
        return orjson.dumps(
            {"kind": "totals", "month": self.month, "usage": self.usage, "license": self.license}
        )

    @classmethod
    def decode(cls, raw: bytes) -> MonthTotals:
        """Raises :class:`StoreError` for anything but a totals row of this version."""
        try:
            doc = orjson.loads(raw)
            if doc["kind"] != "totals":
                raise StoreError(f"not a totals row: kind {doc['kind']!r:.40}")
            usage = tuple(_totals_row(r, 3) for r in doc["usage"])
            license = tuple(_totals_row(r, 5) for r in doc["license"])
            month = doc["month"]
            if not isinstance(month, str):
                raise StoreError("a totals row without a month")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"unreadable totals row: {exc}") from exc
        return cls(month, usage, license)  # type: ignore[arg-type]


def _totals_row(row: object, counts: int) -> tuple[object, ...]:
    if (
        not isinstance(row, list)
        or len(row) != 2 + counts
        or not all(isinstance(v, str) for v in row[:2])
        or not all(type(v) is int for v in row[2:])
    ):
        raise ValueError(f"a totals line is not [tenant, type, {counts} counts]: {row!r:.80}")
    return tuple(row)


#: The local row listing :attr:`HomePartition.elsewhere` (never published: it is this host's).
ELSEWHERE: Final = "elsewhere"


def parse_elsewhere(raw: bytes) -> dict[str, list[int]]:
    """Raises :class:`StoreError` for anything but ``{"month:M": [offset, ...], ...}``."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise StoreError(f"unreadable {ELSEWHERE} row: {exc}") from exc
    if not isinstance(doc, dict) or not all(
        isinstance(k, str)
        and k.startswith("month:")
        and isinstance(v, list)
        and all(type(o) is int and o >= 0 for o in v)
        for k, v in doc.items()
    ):
        raise StoreError(f"malformed {ELSEWHERE} row: {raw[:80]!r}")
    return doc


class LifecycleError(BrokerError):
    """A move the partition lifecycle does not allow (a bug, never bad input)."""


class DataLostError(BrokerError):
    """The broker lost records meter had read or written: its log went backwards."""


class HomePartition:
    """The ledger, close state and publish queue of one home partition."""

    __slots__ = (
        "_batch",
        "_cells",
        "_finals_pending",
        "_lfinals_pending",
        "_lstarts_pending",
        "changed",
        "changelog_end",
        "close",
        "corr_dirty",
        "dirty",
        "elsewhere",
        "epoch",
        "height",
        "history_start",
        "lcorr_dirty",
        "ledger",
        "lic_dirty",
        "license",
        "needs_rebuild",
        "number",
        "phase",
        "pruned",
        "published",
        "published_end",
        "reason",
        "saved_end",
        "store",
        "summaries",
        "unpublished",
    )

    def __init__(
        self, number: int, height: Height = points_height, history_start: str | None = None
    ) -> None:
        self.number = number
        self.height = height
        self.history_start = history_start
        self.phase = Phase.RECOVERING
        #: Why the partition was last fenced (for logs and /healthz).
        self.reason = ""
        self.ledger = Ledger(height)
        #: The ledger's cells, for the duplicate check (most events) without a call.
        self._cells = self.ledger.cells
        #: The license view (vendor rules) beside the calendar ledger; shares it.
        self.license = LicenseLedger(self.ledger, history_start, height)
        self.close = HomeClose(height=height)
        #: Every changelog record below this offset is joined into the ledger.
        self.changelog_end = 0
        #: The ledger holds changes the changelog does not: rebuild from offset 0.
        self.needs_rebuild = False
        #: Moves on every fence: a batch taken before it promotes nothing when acknowledged.
        self.epoch = 0
        #: Acknowledged, not yet published: tenant-month -> earliest arrival (ms, -1 unknown).
        self.dirty: dict[TM, int] = {}
        #: Acknowledged changes to closed months, not yet published as corrections.
        self.corr_dirty: set[WorkloadKey] = set()
        #: License view: acknowledged changes of open months' reports, not yet published.
        self.lic_dirty: set[TM] = set()
        #: License view: acknowledged changes to closed months' reports (corrections).
        self.lcorr_dirty: set[WorkloadKey] = set()
        #: This batch's changes, pending until the changelog write that carries them is
        #: acknowledged (:meth:`take_batch`, :meth:`written`).
        self._batch = ChangeBatch()
        #: Final-snapshot chunks read while replaying, waiting for their close marker.
        self._finals_pending: dict[str, dict[str, dict[tuple[str, str], Rate]]] = {}
        self._lfinals_pending: dict[str, LicenseSnapshot] = {}
        self._lstarts_pending: dict[str, str | None] = {}
        #: Local state (``--state-dir``): the checkpoint is read at start, written by
        #: :meth:`save`; closed months may then be pruned from memory.
        self.store: PartitionStore | None = None
        #: Closed months not in memory: their state is in :attr:`store`, read back when
        #: something needs it (a late event, a close to publish again).
        self.pruned: set[str] = set()
        #: Months whose state changed since the last :meth:`save`.
        self.changed: set[str] = set()
        #: ``changelog_end`` at the last :meth:`save` (-1: never saved).
        self.saved_end = -1
        #: Where the last snapshot of the saved state is on Kafka (:mod:`.snapshots`), and
        #: the rows saved since, not yet in one.
        self.published = Published({})
        self.published_end = -1
        self.unpublished: set[str] = set()
        #: Pruned months' totals, for /metrics: a month leaves memory at its correction
        #: horizon, not when dashboards stop showing it.
        self.summaries: dict[str, MonthTotals] = {}
        #: Pruned months' rows on the snapshots topic only (key -> offsets there): a worker
        #: on a new host reads this month's state, not history (local row ``elsewhere``).
        self.elsewhere: dict[str, list[int]] = {}

    def __repr__(self) -> str:
        return f"HomePartition({self.number}, {self.phase.value}, end={self.changelog_end})"

    # ------------------------------------------------------------------ lifecycle

    def move(self, to: Phase, reason: str = "") -> None:
        if to not in _MOVES[self.phase]:
            raise LifecycleError(
                f"home partition {self.number}: {self.phase.value} -> {to.value} is not allowed"
            )
        self.phase = to
        if to is Phase.FENCED:
            self.reason = reason
            self.epoch += 1
            # Nothing unverified is published: after catching up, everything is again.
            self.dirty.clear()
            self.corr_dirty.clear()
            self.lic_dirty.clear()
            self.lcorr_dirty.clear()

    @property
    def active(self) -> bool:
        return self.phase is Phase.ACTIVE

    def fence(self, reason: str) -> bool:
        """ACTIVE (or RECOVERING) -> FENCED; True when it moved."""
        if self.phase in (Phase.ACTIVE, Phase.RECOVERING):
            self.move(Phase.FENCED, reason)
            return True
        return False

    def begin_recovery(self) -> int:
        """Any -> RECOVERING; the changelog offset to replay from."""
        if self.phase is Phase.ACTIVE:
            self.move(Phase.FENCED, "caught up again before use")
        if self.phase is Phase.FENCED:
            self.move(Phase.RECOVERING)
        if self.needs_rebuild:
            self._reset()
        return self.changelog_end

    def _reset(self) -> None:
        self.ledger = Ledger(self.height)
        self._cells = self.ledger.cells
        self.license = LicenseLedger(self.ledger, self.history_start, self.height)
        self.close = HomeClose(height=self.height)
        self.changelog_end = 0
        self.needs_rebuild = False
        self._finals_pending.clear()
        self._lfinals_pending.clear()
        self._lstarts_pending.clear()
        self.pruned.clear()
        self.summaries.clear()
        self.elsewhere.clear()
        self.changed.clear()
        self.saved_end = -1
        self.published = self.published.behind()
        self.unpublished.clear()
        self._drop_batch()

    def recovered(self, end: int) -> None:
        """Replayed up to ``end``: ACTIVE, with every open tenant-month and correction due."""
        if end < self.changelog_end:
            raise DataLostError(
                f"changelog partition {self.number} ends at offset {end}, below offset "
                f"{self.changelog_end} this worker had read and written"
            )
        self.changelog_end = end
        hc = self.close
        for tm in self.ledger.tenant_months():
            if tm.month not in hc.closed:
                self.dirty.setdefault((tm.tenant_id, tm.month), -1)
        for month in hc.closed:
            self.corr_dirty.update(
                (c.tenant_id, c.month, c.workload_type, c.workload_id)
                for c in hc.corrections(self.ledger, month)
            )
        for lm in self.license.tenant_months():
            if lm.month not in hc.closed:
                self.lic_dirty.add((lm.tenant_id, lm.month))
        for month in hc.closed:
            final = hc.license_finals.get(month, {})
            for tenant, wtype, wid, c in self.license.workloads(month):
                if final.get(tenant, {}).get((wtype, wid)) != c:
                    self.lcorr_dirty.add((tenant, month, wtype, wid))
            for tenant, held in final.items():
                for wtype, wid in held:
                    if self.license.contribution(tenant, month, wtype, wid) is None:
                        self.lcorr_dirty.add((tenant, month, wtype, wid))  # cannot happen: a join
        self.move(Phase.ACTIVE)

    # ------------------------------------------------------------------ one batch

    def apply(
        self,
        tenant: str,
        month: str,
        wtype: str,
        wid: str,
        rate: Rate,
        ts: int,
        event_id: str,
        tail: str | None = None,
    ) -> bool:
        """Join one rated event in; True when its calendar month's state changed.

        ``tail``: the next month, when the event's day is in that month's 31-day window
        (:func:`~meter.domain.license.tail_month`).  Every change is pending until acked.
        """
        if tail is None:
            # Most events repeat a workload already counted at this rate or higher.
            held = self._cells.get((tenant, month, wtype))
            if held is not None:
                old = held.get(wid)
                if old is not None and old >= rate:
                    return False
        if self.pruned:
            self._unprune_for(tenant, month, wtype, wid, tail)
        lic = self.license
        batch = self._batch
        if tail is not None and lic.add_tail(tenant, tail, wtype, wid, rate):
            batch.tails.append((tenant, tail, wtype, wid, rate))
            self._touch_license(tenant, tail, wtype, wid)
        if not lic.add(tenant, month, wtype, wid, rate):
            return False
        self._touch_license(tenant, month, wtype, wid)
        if lic.moved_first is not None:
            self._touch_license(tenant, lic.moved_first, wtype, wid)  # no longer new there
        batch.entries.append((tenant, month, wtype, wid, rate))
        if month in self.close.closed:
            # Late: the final record stays; the difference becomes a correction.
            wkey = (tenant, month, wtype, wid)
            self.close.late_ids[wkey] = event_id
            batch.corr.add(wkey)
            batch.event_ids[len(batch.entries) - 1] = event_id
        else:
            pending = batch.pending
            since = pending.get((tenant, month))
            if since is None or ts < since:
                pending[(tenant, month)] = ts
        return True

    def _touch_license(self, tenant: str, month: str, wtype: str, wid: str) -> None:
        if month in self.close.closed:
            self._batch.lcorr.add((tenant, month, wtype, wid))
        else:
            self._batch.lic.add((tenant, month))

    def take_batch(self) -> ChangeBatch:
        """This batch's changes for the changelog (they stay pending in the batch until
        :meth:`written` is called with it)."""
        batch, self._batch = self._batch, ChangeBatch()
        batch.epoch = self.epoch
        return batch

    def written(self, batch: ChangeBatch, offsets: list[int]) -> None:
        """``batch``'s changelog records were acknowledged at ``offsets``: its changes
        become publishable.

        Raises :class:`DataLostError` when they landed below ``changelog_end``; fences
        the partition when someone else's records lie between.  A batch taken before the
        partition was last fenced changes nothing (catching up reads it again).
        """
        if batch.epoch != self.epoch or self.phase is not Phase.ACTIVE:
            return
        dirty = self.dirty
        for tm, ts in batch.pending.items():
            held = dirty.get(tm)
            if held is None or 0 <= ts < held:
                dirty[tm] = ts
        self.corr_dirty |= batch.corr
        self.lic_dirty |= batch.lic
        self.lcorr_dirty |= batch.lcorr
        if self.store is not None:
            self._changed(batch.entries, batch.tails, (k[1] for k in batch.lcorr))
        self.acknowledged(offsets)

    def acknowledged(self, offsets: list[int]) -> None:
        """Our changelog records were acknowledged at ``offsets``: move ``changelog_end``.

        Raises :class:`DataLostError` when they landed below it; fences the partition
        when someone else's records lie between."""
        if not offsets:
            return
        offsets = sorted(offsets)
        if offsets[0] < self.changelog_end:
            raise DataLostError(
                f"a write to changelog partition {self.number} was acknowledged at offset "
                f"{offsets[0]}, below offset {self.changelog_end} it had reached"
            )
        for offset in offsets:
            if offset != self.changelog_end:
                self.fence(
                    f"another writer added changelog records at offsets {self.changelog_end}.."
                    f"{offset - 1} (this worker may have lost the partition while paused)"
                )
                return
            self.changelog_end = offset + 1

    def write_failed(self, why: str) -> None:
        """A batch's changelog write failed or was abandoned: rebuild before use."""
        self._drop_batch()
        self.needs_rebuild = True
        if not self.fence(f"a changelog write did not complete ({why})"):
            self.reason = f"a changelog write did not complete ({why})"

    def _changed(
        self, entries: Iterable[Entry], tails: Iterable[Entry], months: Iterable[str]
    ) -> None:
        """Note the months these changes reach, for the next :meth:`save`."""
        changed = self.changed
        changed.update(e[1] for e in entries)
        changed.update(e[1] for e in tails)
        changed.update(months)

    def _drop_batch(self) -> None:
        self._batch = ChangeBatch()

    def take_dirty(self) -> dict[TM, int]:
        dirty, self.dirty = self.dirty, {}
        return dirty

    # ------------------------------------------------------------------ replay

    def replay(self, raw: bytes) -> int:
        """Join one changelog record in (recovery and catch-up); returns entries applied.

        Raises :class:`~meter.stream.records.ChangelogError` for a record this
        version cannot read.
        """
        cl = read_changelog(raw)
        lic = self.license
        hc = self.close
        if self.pruned:
            for t, m, w, i, _ in cl.entries:
                self._unprune_for(t, m, w, i, None)
            self.load_months(
                {e[1] for e in cl.tails}
                | {m for m in (cl.final, cl.license_final, cl.closed, cl.state) if m is not None}
            )
        if self.store is not None:
            marked = (cl.final, cl.license_final, cl.closed, cl.state)
            self._changed(cl.entries, cl.tails, (m for m in marked if m is not None))
        if cl.firsts is not None:
            for t, w, i in cl.first_entries:
                lic.note_first(t, w, i, cl.firsts)
        if cl.state is not None:
            lic.load_state(cl.state, cl.groups)
            for t, w, i, eid in cl.late:
                hc.late_ids[(t, cl.state, w, i)] = eid
        for n, entry in enumerate(cl.entries):
            lic.add(*entry)
            if n in cl.event_ids:
                hc.late_ids[entry[:4]] = cl.event_ids[n]
        for entry in cl.tails:
            lic.add_tail(*entry)
        if cl.final is not None:
            snap = self._finals_pending.setdefault(cl.final, {})
            for tenant, wtype, wid, rate in cl.final_entries:
                lic.add(tenant, cl.final, wtype, wid, rate)
                held = snap.setdefault(tenant, {}).get((wtype, wid))
                if held is None or rate > held:
                    snap[tenant][(wtype, wid)] = rate
        if cl.license_final is not None:
            lsnap = self._lfinals_pending.setdefault(cl.license_final, {})
            self._lstarts_pending[cl.license_final] = cl.history_start
            for tenant, wtype, wid, rate, new in cl.license_entries:
                lsnap.setdefault(tenant, {})[(wtype, wid)] = (rate, new)
        if cl.closed is not None:
            hc.closed.add(cl.closed)
            hc.finals[cl.closed] = self._finals_pending.pop(cl.closed, {})
            hc.license_finals[cl.closed] = self._lfinals_pending.pop(cl.closed, {})
            hc.license_starts[cl.closed] = self._lstarts_pending.pop(cl.closed, None)
        return len(cl.entries) + len(cl.final_entries) + len(cl.tails)

    # ------------------------------------------------------------------ month close

    def closed(
        self,
        month: str,
        snapshot: dict[str, dict[tuple[str, str], Rate]],
        license_snapshot: LicenseSnapshot | None = None,
        history_start: str | None = None,
    ) -> None:
        """``month``'s final snapshots and marker are acknowledged on the changelog."""
        self.close.closed.add(month)
        self.close.finals[month] = snapshot
        self.close.license_finals[month] = license_snapshot or {}
        self.close.license_starts[month] = history_start
        self.changed.add(month)
        for tenant in snapshot:
            self.dirty.pop((tenant, month), None)
        self.lic_dirty = {tm for tm in self.lic_dirty if tm[1] != month}

    def license_now(self, tenant: str, month: str, wtype: str, wid: str) -> Contribution | None:
        return self.license.contribution(tenant, month, wtype, wid)

    def months(self) -> Iterator[str]:
        return (tm.month for tm in self.ledger.tenant_months())

    def keep_totals(self, shown: Container[str]) -> None:
        """Forget the totals of pruned months /metrics no longer shows."""
        for month in [m for m in self.summaries if m not in shown]:
            del self.summaries[month]

    def usage_totals(self, months: set[str]) -> Iterator[tuple[str, UsageTotal]]:
        """``(month, (tenant, type, workloads, points, rental))`` of ``months``, in memory
        or pruned (for /metrics)."""
        for tm in self.ledger.tenant_months():
            if tm.month in months:
                for w, t in tm.totals.items():
                    yield tm.month, (tm.tenant_id, w, t[0], t[1], t[2])
        for month in months & self.summaries.keys():
            for row in self.summaries[month].usage:
                yield month, row

    def license_totals(self, months: set[str]) -> Iterator[tuple[str, LicenseTotal]]:
        """``(month, (tenant, type, workloads, new, rental, points, new points))`` of
        ``months``, in memory or pruned (for /metrics)."""
        for lm in self.license.tenant_months():
            if lm.month in months:
                for w, t in lm.totals.items():
                    yield lm.month, (lm.tenant_id, w, t[0], t[1], t[2], t[3], t[4])
        for month in months & self.summaries.keys():
            for row in self.summaries[month].license:
                yield month, row

    # ------------------------------------------------------------------ local state

    def _unprune_for(self, tenant: str, month: str, wtype: str, wid: str, tail: str | None) -> None:
        """Read back the pruned months that joining this entry can change: its month, its
        tail month, the month it was new in (when it moves earlier) and the history start
        (when that moves earlier)."""
        pruned = self.pruned
        need = {m for m in (month, tail) if m in pruned}
        lic = self.license
        first = lic.first_month(tenant, wtype, wid)
        if first is not None and month < first and first in pruned:
            need.add(first)
        if need:
            self.load_months(need)

    def load_months(self, months: set[str]) -> None:
        """Read pruned ``months`` back from the local store into memory (a join: their
        records are replayed).  Raises :class:`LocalStateError` when the store fails: the
        partition then needs a rebuild from the changelog (:meth:`state_lost`), and
        :class:`RowsElsewhere`, before anything is read, when rows are on the snapshots
        topic only (:attr:`elsewhere`)."""
        wanted = sorted(months & self.pruned)
        if not wanted:
            return
        assert self.store is not None
        away = {k: self.elsewhere[k] for m in wanted if (k := f"month:{m}") in self.elsewhere}
        if away:
            raise RowsElsewhere(self.number, away)
        try:
            here = set(self.store.keys())
        except StoreError as exc:
            raise LocalStateError(self.number, str(exc)) from exc
        missing = [m for m in wanted if f"month:{m}" not in here]
        if missing:
            raise LocalStateError(self.number, f"pruned months {missing} are not in local state")
        for month in wanted:
            records = 0
            self.pruned.discard(month)
            self.summaries.pop(month, None)  # the month's own state is back
            try:
                for raw in self.store.read(f"month:{month}"):
                    self.replay(raw)
                    records += 1
            except (StoreError, ChangelogError) as exc:  # damaged, or not this version's
                raise LocalStateError(self.number, str(exc)) from exc
            self.changed.discard(month)  # what was just read is what the store holds
            log.info(
                "home partition %d: %s read back from local state (%d records)",
                self.number,
                month,
                records,
            )

    def state_lost(self, why: str) -> None:
        """The local store failed: forget it, and rebuild from the changelog before use."""
        if self.store is not None:
            try:
                self.store.clear()
            except StoreError as exc:
                log.error("home partition %d: %s", self.number, exc)  # noqa: TRY400
        self._drop_batch()
        self.needs_rebuild = True
        if not self.fence(f"local state failed ({why}); rebuilding from the changelog"):
            self.reason = f"local state failed ({why})"

    def restore(
        self, store: PartitionStore, checkpoint: Checkpoint, shown: Container[str] | None = None
    ) -> int:
        """Load saved state (RECOVERING, nothing in memory yet): every first-month row, the
        rows of months not pruned, and the totals of the pruned months /metrics shows
        (``shown``; ``None``: every pruned month's); the changelog is then replayed from
        ``checkpoint.offset``.  Returns the records read.  Raises :class:`StoreError` when
        a row is not what was saved (and forgets whatever it had loaded)."""
        if self.phase is not Phase.RECOVERING or self.changelog_end != 0 or len(self.ledger):
            raise LifecycleError(f"home partition {self.number}: restore into a used state")
        try:
            n = self._load(store, set(checkpoint.pruned), shown)
        except StoreError:
            self._reset()  # nothing half-loaded is kept
            raise
        self.close.closed.update(checkpoint.closed)
        self.pruned = set(checkpoint.pruned)
        self.changelog_end = checkpoint.offset
        self.saved_end = checkpoint.offset
        self.changed.clear()
        self.store = store
        return n

    def _load(self, store: PartitionStore, pruned: set[str], shown: Container[str] | None) -> int:
        keys = store.keys()
        # Pruned months' rows are checked when read back (each record's CRC-32); their
        # count and checksums against the checkpoint were checked by ``checkpoint()``.
        n = 0
        firsts = sorted(k for k in keys if k.startswith("firsts:"))
        months = sorted(
            k for k in keys if k.startswith("month:") and k.removeprefix("month:") not in pruned
        )
        for key in firsts + months:
            for raw in store.read(key):
                try:
                    self.replay(raw)
                except ChangelogError as exc:  # a row this version cannot read: not state
                    raise StoreError(f"row {key} of {store!r}: {exc}") from exc
                n += 1
        if ELSEWHERE in keys:
            for raw in store.read(ELSEWHERE):
                self.elsewhere = parse_elsewhere(raw)
                n += 1
        for month in sorted(pruned):
            if f"totals:{month}" in keys and (shown is None or month in shown):
                for raw in store.read(f"totals:{month}"):
                    totals = MonthTotals.decode(raw)
                    if totals.month != month:
                        raise StoreError(f"totals:{month} holds {totals.month}'s totals")
                    self.summaries[month] = totals
                    n += 1
        return n

    def month_rows(self, month: str) -> Iterator[bytes]:
        """``month``'s whole state as changelog-format records: its entries (late ones with
        their event ids), the tail entries of its window, its final snapshots and close.
        Encoded a chunk at a time, so saving a month of a million workloads never holds
        more than one chunk besides the state itself."""
        hc = self.close
        late = hc.late_ids
        for groups in _state_chunks(self.ledger, month, late):
            ids = (
                [
                    (t, w, i, eid)
                    for t, w, _, wids in groups
                    for i in wids
                    if (eid := late.get((t, month, w, i))) is not None
                ]
                if late
                else []
            )
            yield encode_state(month, groups, ids)
        for chunk in _chunks(self.license.tail_entries(month)):
            yield encode_tails(chunk)
        if month not in hc.closed:
            return
        finals = (
            (t, w, i, r)
            for t, held in hc.finals.get(month, {}).items()
            for (w, i), r in held.items()
        )
        for fchunk in _chunks(finals):
            yield encode_final_chunk(month, fchunk)
        lfinals = (
            (t, w, i, rate, new)
            for t, held in hc.license_finals.get(month, {}).items()
            for (w, i), (rate, new) in held.items()
        )
        start = hc.license_starts.get(month)
        any_license = False
        for lchunk in _chunks(lfinals):
            any_license = True
            yield encode_license_final_chunk(month, lchunk, start)
        if not any_license:
            yield encode_license_final_chunk(month, [], start)  # it carries the history start
        yield encode_closed_marker(month, _EPOCH)

    def _first_rows(self, month: str) -> Iterator[bytes]:
        """The workloads whose first month is ``month``, grouped by tenant and type."""
        groups: dict[tuple[str, str], list[str]] = {}
        for (t, w), firsts in self.license.first.items():
            ids = [i for i, m in firsts.items() if m == month]
            if ids:
                groups[(t, w)] = ids
        for chunk in _group_chunks(groups.items()):
            yield encode_firsts(month, [(t, w, wids) for (t, w), wids in chunk])

    def save(self, fingerprint: int, prunable: set[str] | None = None) -> int:
        """Write the months changed since the last save and the checkpoint (ACTIVE, with
        nothing in flight: every change is acknowledged, ``changelog_end`` covers it), then
        prune ``prunable`` closed months with nothing left to publish.  Returns the months
        pruned.  Raises :class:`StoreError` when the store cannot be written."""
        store = self.store
        if store is None or self.phase is not Phase.ACTIVE or self._batch:
            return 0
        if self.changed or self.saved_end != self.changelog_end:
            rows: dict[str, Iterable[bytes]] = {}
            for month in sorted(self.changed):
                rows[f"month:{month}"] = self.month_rows(month)
                rows[f"firsts:{month}"] = self._first_rows(month)
            store.save(self._checkpoint(fingerprint), rows)
            self.unpublished.update(rows)
            self.changed.clear()
            self.saved_end = self.changelog_end
        totals: dict[str, Iterable[bytes]] = {}
        for month in sorted(prunable or ()):
            if self._prunable(month):
                self._prune(month)
                totals[f"totals:{month}"] = [self.summaries[month].encode()]
        if totals:
            store.save(self._checkpoint(fingerprint), totals)
            self.unpublished.update(totals)
        return len(totals)

    def _checkpoint(self, fingerprint: int) -> Checkpoint:
        return Checkpoint(
            self.changelog_end,
            fingerprint,
            tuple(sorted(self.close.closed)),
            tuple(sorted(self.pruned)),
        )

    def _prunable(self, month: str) -> bool:
        return (
            month in self.close.closed
            and month not in self.pruned
            and month not in self.changed
            and not any(k[1] == month for k in self.corr_dirty)
            and not any(k[1] == month for k in self.lcorr_dirty)
            and not any(tm[1] == month for tm in self.dirty)
        )

    def _prune(self, month: str) -> None:
        hc = self.close
        self.summaries[month] = MonthTotals.of(self.ledger, self.license, month)
        dropped = self.license.drop_month(month)
        hc.finals.pop(month, None)
        hc.license_finals.pop(month, None)
        hc.license_starts.pop(month, None)
        if hc.late_ids:
            for key in [k for k in hc.late_ids if k[1] == month]:
                del hc.late_ids[key]
        self.pruned.add(month)
        log.info(
            "home partition %d: %s pruned from memory (%d entries; kept in local state)",
            self.number,
            month,
            dropped,
        )


#: Entries per record in local state rows.
_ROW_CHUNK: Final = 5_000
#: Bytes per record in local state rows, at most (estimated as the records are cut): the
#: rows go to the snapshots topic, and Apache Kafka's default message limit is 1 MiB.
ROW_BYTES: Final = 512 * 1024


def _w(text: str) -> int:
    """At most the bytes ``text`` takes in JSON: an ASCII character at most 2 (controls are
    not allowed in ids), any other at most 6 (``\\uXXXX``).  ``isascii`` is O(1)."""
    return len(text) * (2 if text.isascii() else 6)


def _state_chunks(
    ledger: Ledger, month: str, late: Mapping[tuple[str, str, str, str], str] | None = None
) -> Iterator[list[StateGroup]]:
    """``month``'s entries as (tenant, type, rate, workload ids) groups, about
    :data:`_ROW_CHUNK` workloads and at most about :data:`ROW_BYTES` to a chunk (a late
    workload's event id, in ``late``, counted with it)."""

    def groups() -> Iterator[tuple[tuple[str, str, Rate], list[str]]]:
        for tm in ledger.tenant_months():
            if tm.month != month:
                continue
            for w, by_id in tm.types.items():
                held: dict[Rate, list[str]] = {}
                for i, rate in by_id.items():
                    ids = held.get(rate)
                    if ids is None:
                        held[rate] = [i]
                    else:
                        ids.append(i)
                for rate, ids in held.items():
                    yield (tm.tenant_id, w, rate), ids

    def weight(head: tuple[str, str, Rate], i: str) -> int:
        eid = late.get((head[0], month, head[1], i)) if late else None
        cost = _w(i) + 4
        return cost if eid is None else 2 * cost + _w(eid) + _w(head[0]) + _w(head[1]) + 16

    for chunk in _group_chunks(groups(), weight):
        yield [(t, w, rate, wids) for (t, w, rate), wids in chunk]


def _id_weight(head: object, i: str) -> int:
    return _w(i) + 4


def _head_weight(head: tuple[object, ...]) -> int:
    return sum(_w(h) for h in head if isinstance(h, str)) + 48


def _group_chunks(
    groups: Iterable[tuple[_K, list[str]]],
    weight: Callable[[_K, str], int] = _id_weight,
) -> Iterator[list[tuple[_K, list[str]]]]:
    """Groups of workload ids, cut and gathered about :data:`_ROW_CHUNK` ids and at most
    about :data:`ROW_BYTES` (each id's ``weight`` with its group head) to a chunk."""
    chunk: list[tuple[_K, list[str]]] = []
    size = nbytes = 0
    for head, wids in groups:
        head_bytes = _head_weight(head)  # type: ignore[arg-type]
        part: list[str] = []
        for i in wids:
            cost = weight(head, i)
            if size and (size >= _ROW_CHUNK or nbytes + head_bytes + cost > ROW_BYTES):
                if part:
                    chunk.append((head, part))
                yield chunk
                chunk, part, size, nbytes = [], [], 0, 0
            if not part:
                nbytes += head_bytes
            part.append(i)
            size += 1
            nbytes += cost
        if part:
            chunk.append((head, part))
    if chunk:
        yield chunk


def _item_weight(item: tuple[object, ...]) -> int:
    total = 64
    for x in item:
        if isinstance(x, str):
            total += _w(x)
        elif isinstance(x, tuple):
            total += sum(_w(y) for y in x if isinstance(y, str)) + 24
    return total


def _chunks(items: Iterable[_T]) -> Iterator[list[_T]]:
    """``items`` (tuples of strings, numbers and rates) cut about :data:`_ROW_CHUNK` and at
    most about :data:`ROW_BYTES` to a chunk."""
    chunk: list[_T] = []
    nbytes = 0
    for item in items:
        cost = _item_weight(item)  # type: ignore[arg-type]
        if chunk and (len(chunk) >= _ROW_CHUNK or nbytes + cost > ROW_BYTES):
            yield chunk
            chunk, nbytes = [], 0
        chunk.append(item)
        nbytes += cost
    if chunk:
        yield chunk


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
