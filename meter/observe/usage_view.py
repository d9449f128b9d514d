"""A live view of ``meter.usage``: tails the topic, keeps the highest revision per key
(of equal revisions the later record, as :func:`~meter.stream.usage.keep_latest` does).

It serves the status page and ``/api/usage`` whatever number of workers there
are, because it reads what all of them publish.

A month whose every usage record is final (``"final": true``, ``closed_at``) is
shown as submitted, with the corrections after its close and the corrected
totals; any other month is running: its records with the corrections folded in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from meter.domain.license import LicenseStatus, ProviderLicense, previous_month
from meter.kafka import KafkaSettings, close_consumer, describe_partitions
from meter.observe.snapshot import Coalesced
from meter.report import UsageReport
from meter.stream.usage import (
    fold,
    keep_correction,
    keep_latest,
    keep_license,
    keep_license_correction,
    license_correction_well_formed,
    license_well_formed,
    usage_rows,
)

log = logging.getLogger(__name__)

#: Whether a whole month is closed, and its latest close time.
MonthState = tuple[bool, str | None]


class UsageView:
    #: How records and corrections of one key are reduced (the usage topic's rules).
    keep_record = staticmethod(keep_latest)
    keep_fix = staticmethod(keep_correction)

    def __init__(self, settings: KafkaSettings, topic: str, corrections: str | None = None) -> None:
        self.settings = settings
        self.topic = topic
        self.corrections_topic = corrections or f"{topic}.corrections"
        self.records: dict[str, dict[str, Any]] = {}
        self.corrections: dict[str, dict[str, Any]] = {}
        self.version = 0  # bumps on every change, for cheap polling
        #: Set by whoever builds the view: the license document of a month (or None),
        #: added to :meth:`document` as ``license``.
        self.license_doc: Callable[[str], dict[str, Any] | None] | None = None
        self._rec_ix = KeyIndex()
        self._fix_ix = KeyIndex()
        self._indexed_for: tuple[int, int, int, int] = (0, -1, 0, -1)
        #: (month, tenant) -> its big document, made off the loop and served again
        self._docs: dict[tuple[str, str | None], Coalesced[tuple[int, MonthAnswer]]] = {}

    def months(self) -> list[str]:
        rec, fix = self._indexes()
        return sorted(rec.by_month.keys() | fix.by_month.keys(), reverse=True)

    def _indexes(self) -> tuple[KeyIndex, KeyIndex]:
        """The keys by month and by tenant-month, kept as records arrive; rebuilt only if
        the dicts were replaced or filled by hand (tests)."""
        if self._indexed_for != (id(self.records), len(self.records),
                                 id(self.corrections), len(self.corrections)):  # fmt: skip
            self._rec_ix = KeyIndex.of(self.records, self.final_record, self.valid_record)
            self._fix_ix = KeyIndex.of(self.corrections)
            self._mark_indexed()
            self.rebuilt()
        return self._rec_ix, self._fix_ix

    def _mark_indexed(self) -> None:
        self._indexed_for = (id(self.records), len(self.records),
                             id(self.corrections), len(self.corrections))  # fmt: skip

    def subset(
        self, month: str, tenant_id: str | None = None
    ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """The records and corrections of one month (of one tenant): found through the
        index, so a tenant's are a dictionary lookup at any number of tenants."""
        rec, fix = self._indexes()
        rk, fk = rec.keys(month, tenant_id), fix.keys(month, tenant_id)
        return {k: self.records[k] for k in rk}, {k: self.corrections[k] for k in fk}

    def document(self, month: str | None = None, tenant_id: str | None = None) -> dict[str, Any]:
        """The same shape as ``meter report --format json``; for one month, with its
        status (see :func:`month_document`) and ``license`` when there is one."""
        if month is None:
            rows = usage_rows(fold(self.records, self.corrections), tenant_id=tenant_id)
            return UsageReport(usage=rows).as_dict()
        records, corrections = self.subset(month, tenant_id)
        doc = month_document(records, corrections, month, tenant_id, self.month_state(month))
        return self.with_license(doc, month)

    def month_state(self, month: str) -> MonthState:
        """Whether every record of ``month`` (all tenants) is final, and the latest close
        time: what a month is, whichever tenant is asked for."""
        rec, fix = self._indexes()
        has = month in rec.by_month or any(
            _correction(self.corrections[k]) for k in fix.by_month.get(month, ())
        )
        closed = has and not rec.open.get(month, 0)
        times = rec.closed_at.get(month)
        return closed, max(times) if times else None

    async def month_answer(self, month: str, tenant_id: str | None = None) -> MonthAnswer:
        """:meth:`document` of one month with ``version`` (the view's when it was made) and
        ``summary`` (:func:`summarised`), the tenants by points, and for a big document its
        JSON too; without ``license``.

        A big document (a whole month of many tenants) is made in a thread from the
        month's records, copied out on the loop: it never stalls the worker sharing this
        event loop.  Concurrent asks share one build; while events flow it is made again
        at most once per :data:`BIG_DOC_MAX_AGE` seconds, or less often when making it is
        slow (:data:`~meter.observe.snapshot.BUILD_SHARE`)."""
        rec, fix = self._indexes()
        size = len(rec.keys_count(month, tenant_id)) + len(fix.keys_count(month, tenant_id))
        if size < OFF_LOOP_RECORDS:
            records, corrections = self.subset(month, tenant_id)
            doc = month_document(records, corrections, month, tenant_id, self.month_state(month))
            doc, order = summarised({**doc, "version": self.version})
            return MonthAnswer(doc, None, order)
        key = (month, tenant_id)
        cache = self._docs.get(key)
        if cache is None:

            async def build() -> tuple[int, MonthAnswer]:
                version = self.version
                records, corrections = self.subset(month, tenant_id)
                state = self.month_state(month)

                def make() -> tuple[int, MonthAnswer]:
                    made = month_document(records, corrections, month, tenant_id, state)
                    doc, order = summarised({**made, "version": version})
                    return version, MonthAnswer(doc, orjson.dumps(doc), order)

                return await asyncio.to_thread(make)

            cache = self._docs[key] = Coalesced(
                build, BIG_DOC_MAX_AGE, fresh=lambda held: held[0] == self.version
            )
        return (await cache.get())[1]

    def with_license(self, doc: dict[str, Any], month: str) -> dict[str, Any]:
        if self.license_doc is not None:
            lic = self.license_doc(month)
            if lic is not None:
                doc["license"] = lic
        return doc

    async def run(self, stop: asyncio.Event) -> None:
        """Tail the topic until ``stop``; reconnects on its own."""
        while not stop.is_set():
            consumer = None
            try:
                topics = [self.topic, self.corrections_topic]
                counts = await describe_partitions(self.settings, topics)
                if not counts.get(self.topic):
                    await _sleep(stop, 1.0)
                    continue
                consumer = AIOKafkaConsumer(
                    **self.settings.client_kwargs(),
                    group_id=None,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                )
                await consumer.start()
                tps = [TopicPartition(t, p) for t in topics for p in range(counts.get(t, 0))]
                # Apache Kafka lists a new topic before its leader serves it; aiokafka's
                # ListOffsets waits for that quietly, a fetch position reset logs an ERROR
                # (the view starts as the worker creates the topics).
                await consumer.beginning_offsets(tps)
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                while not stop.is_set():
                    batch = await consumer.getmany(timeout_ms=250)
                    for tp, records in batch.items():
                        into = self.records if tp.topic == self.topic else self.corrections
                        for rec in records:
                            self._take(rec.key, rec.value, into, rec.timestamp)
            except (KafkaError, OSError) as exc:
                log.warning("usage view: %s; retrying", exc)
                await _sleep(stop, 1.0)
            finally:
                if consumer is not None:
                    await close_consumer(consumer, max_seconds=5.0)

    def _take(
        self,
        key: bytes | None,
        value: bytes | None,
        into: dict[str, dict[str, Any]],
        timestamp_ms: int = -1,
    ) -> None:
        if key is None or value is None:
            return
        try:
            record = orjson.loads(value)
        except orjson.JSONDecodeError:
            return
        if isinstance(record, dict):
            k = key.decode("utf-8", "replace")
            rec_ix, fix_ix = self._indexes()
            before = into.get(k)
            if into is self.records:
                self.keep_record(into, k, record)
            else:
                self.keep_fix(into, k, record)
            after = into.get(k)
            if after is not before:
                (rec_ix if into is self.records else fix_ix).move(k, before, after)
                self._mark_indexed()
                self.version += 1
                self.changed(before, after, timestamp_ms)

    @staticmethod
    def final_record(record: dict[str, Any]) -> bool:
        return record.get("final") is True

    @staticmethod
    def valid_record(record: dict[str, Any]) -> bool:
        """A record the month's status counts (all: :func:`month_document` reads any)."""
        return True

    def changed(
        self, before: dict[str, Any] | None, after: dict[str, Any] | None, timestamp_ms: int
    ) -> None:
        """A key's record went from ``before`` to ``after``, published at ``timestamp_ms``."""

    def rebuilt(self) -> None:
        """The indexes were rebuilt from the dicts as they are (filled other than by
        :meth:`_take`): recompute anything kept beside them."""


#: A month document of this many records and corrections or more is made in a thread.
OFF_LOOP_RECORDS = 2_000
#: Seconds a big month document is served again while newer events arrive.
BIG_DOC_MAX_AGE = 1.0


class KeyIndex:
    """The keys of a dict of records, by the ``month`` and ``tenant_id`` the records say
    (not the key's text: a record is shown where its content puts it)."""

    def __init__(
        self,
        final: Callable[[dict[str, Any]], bool] = lambda r: r.get("final") is True,
        valid: Callable[[dict[str, Any]], bool] = lambda r: True,
    ) -> None:
        self.final = final
        self.valid = valid
        self.by_month: dict[str, set[str]] = {}
        self.by_tenant: dict[tuple[str, str], set[str]] = {}
        #: per month: records not final, and the close times of the final ones
        self.open: dict[str, int] = {}
        self.closed_at: dict[str, Counter[str]] = {}

    @classmethod
    def of(
        cls,
        records: dict[str, dict[str, Any]],
        final: Callable[[dict[str, Any]], bool] = lambda r: r.get("final") is True,
        valid: Callable[[dict[str, Any]], bool] = lambda r: True,
    ) -> KeyIndex:
        ix = cls(final, valid)
        for k, r in records.items():
            ix.move(k, None, r)
        return ix

    def move(self, key: str, before: dict[str, Any] | None, after: dict[str, Any] | None) -> None:
        for record, add in ((before, False), (after, True)):
            if record is None or not self.valid(record):
                continue
            month, tenant = record.get("month"), record.get("tenant_id")
            if not isinstance(month, str):
                continue
            places = [self.by_month.setdefault(month, set())]
            if isinstance(tenant, str):
                places.append(self.by_tenant.setdefault((tenant, month), set()))
            for keys in places:
                if add:
                    keys.add(key)
                else:
                    keys.discard(key)
            step = 1 if add else -1
            if self.final(record):
                at = record.get("closed_at")
                if isinstance(at, str):
                    counts = self.closed_at.setdefault(month, Counter())
                    counts[at] += step
                    if counts[at] <= 0:
                        del counts[at]
            else:
                self.open[month] = self.open.get(month, 0) + step
            if not add and not self.by_month[month]:
                del self.by_month[month]

    def keys_count(self, month: str, tenant_id: str | None) -> set[str]:
        """The keys of :meth:`keys`, not copied (to count them)."""
        if tenant_id is None:
            return self.by_month.get(month, set())
        return self.by_tenant.get((tenant_id, month), set())

    def keys(self, month: str, tenant_id: str | None) -> set[str]:
        if tenant_id is None:
            return set(self.by_month.get(month, ()))
        return set(self.by_tenant.get((tenant_id, month), ()))


class LicenseView(UsageView):
    """A live view of ``meter.license`` (the license view, vendor rules) and its
    corrections: what the status page's license gauge shows against the license."""

    keep_record = staticmethod(keep_license)
    keep_fix = staticmethod(keep_license_correction)

    def __init__(self, settings: KafkaSettings, topic: str, corrections: str | None = None) -> None:
        #: month -> the provider's [used, new] points now, records and corrections together
        self._sums: dict[str, list[int]] = {}
        #: month -> UTC day -> used points after the last record published that day: the
        #: trend, from the records' own timestamps (a replay draws the same line)
        self.trend: dict[str, dict[str, int]] = {}
        super().__init__(settings, topic, corrections)

    @staticmethod
    def final_record(record: dict[str, Any]) -> bool:
        return record.get("status") == "final"

    @staticmethod
    def valid_record(record: dict[str, Any]) -> bool:
        """What fold_license skips, the month's status does not count either."""
        return license_well_formed(record)

    def changed(
        self, before: dict[str, Any] | None, after: dict[str, Any] | None, timestamp_ms: int
    ) -> None:
        month = (after or before or {}).get("month")
        if not isinstance(month, str):
            return
        (p1, n1), (p0, n0) = _points(after), _points(before)
        sums = self._sums.setdefault(month, [0, 0])
        sums[0] += p1 - p0
        sums[1] += n1 - n0
        if timestamp_ms >= 0 and (p1 != p0 or month not in self.trend):
            day = datetime.fromtimestamp(timestamp_ms / 1000, UTC).date().isoformat()
            self.trend.setdefault(month, {})[day] = sums[0]

    def rebuilt(self) -> None:
        self._sums = {}
        for r in [*self.records.values(), *self.corrections.values()]:
            self.changed(None, r, -1)

    def status(
        self, month: str, license_: ProviderLicense | None, today: date
    ) -> dict[str, Any] | None:
        """``month``'s used points (the whole provider, corrections folded in) against the
        license, as :meth:`LicenseStatus.as_dict`; ``None`` before anything was read."""
        if not self.records and license_ is None:
            return None
        rec, fix = self._indexes()  # also brings the sums up to date
        used, new = self._sums.get(month, (0, 0))
        prev = previous_month(month)
        doc = LicenseStatus(
            month=month,
            used_points=used,
            new_points=new,
            previous_new_points=self._sums.get(prev, (0, 0))[1] if prev else 0,
            license=license_,
            today=today,
        ).as_dict()
        # As license_month_state of the folded records, from the index: running while
        # any record is (or none is there), final+corrections once a correction is.
        fixes = any(
            license_correction_well_formed(self.corrections[k]) for k in fix.by_month.get(month, ())
        )
        if (month not in rec.by_month and not fixes) or rec.open.get(month, 0):
            doc["status"] = "running"
        else:
            doc["status"] = "final+corrections" if fixes else "final"
        doc["trend"] = [[day, points] for day, points in sorted(self.trend.get(month, {}).items())]
        return doc


def _points(record: dict[str, Any] | None) -> tuple[int, int]:
    """The billable and new points a license record or correction adds to its month, as
    :func:`~meter.stream.usage.fold_license` counts them (nothing for a malformed one)."""
    if record is None:
        return 0, 0
    if "points_added" in record:
        if not license_correction_well_formed(record):
            return 0, 0
        return record["points_added"], record["new_points_added"]
    if not license_well_formed(record):
        return 0, 0
    usage = record["usage"].values()
    return sum(u.get("points", 0) for u in usage), sum(u.get("new_points", 0) for u in usage)


def month_document(
    records: dict[str, dict[str, Any]],
    corrections: dict[str, dict[str, Any]],
    month: str,
    tenant_id: str | None = None,
    state: MonthState | None = None,
) -> dict[str, Any]:
    """One month's usage and what it is, as ``meter report --month M --with-corrections``.
    ``state``: whether the whole month is closed, and when (default: from ``records``,
    which must then hold the whole month).

    - ``running`` (``"final": false``): not every record of the month is final yet;
      ``usage`` is what the events say now (corrections folded in).
    - ``final``: every record is final; ``usage`` is the month as closed, ``closed_at``.
    - ``final+corrections``: also late events after the close: ``corrections`` (per
      workload) and ``corrected_usage`` (final + corrections).

    A month known only from corrections (closed with no usage, late events after) is final.
    """
    mine = [r for r in records.values() if r.get("month") == month]
    fixes = [c for c in corrections.values() if c.get("month") == month and _correction(c)]
    if state is None:
        closed = all(r.get("final") is True for r in mine) and bool(mine or fixes)
        times = sorted({r["closed_at"] for r in mine if isinstance(r.get("closed_at"), str)})
        state = closed, times[-1] if times else None
    closed, last_close = state
    if not closed:
        rows = usage_rows(fold(records, corrections), month=month, tenant_id=tenant_id)
        return {**UsageReport(usage=rows).as_dict(), "final": False, "status": "running"}
    doc = UsageReport(usage=usage_rows(records, month=month, tenant_id=tenant_id)).as_dict()
    doc["final"] = True
    if last_close is not None:
        doc["closed_at"] = last_close
    fixes = sorted(
        (c for c in fixes if tenant_id in (None, c["tenant_id"])),
        key=lambda c: (c["tenant_id"], c["workload_type"], str(c.get("workload_id"))),
    )
    doc["status"] = "final+corrections" if fixes else "final"
    if fixes:
        doc["corrections"] = fixes
        corrected = usage_rows(fold(records, corrections), month=month, tenant_id=tenant_id)
        doc["corrected_usage"] = UsageReport(usage=corrected).as_dict()["usage"]
    return doc


@dataclass(frozen=True, slots=True)
class MonthAnswer:
    """What ``/api/usage`` answers for a month: the document, its JSON when it was made
    off the loop (``None``: small), and its tenants, most points first."""

    doc: dict[str, Any]
    body: bytes | None
    order: list[str]


def summarised(doc: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``doc`` with ``summary`` (and ``corrected_summary`` beside ``corrected_usage``):
    tenants, workloads, points and per workload type, over every row; and the tenants,
    most points first (ties by id), to answer ``top=N`` without sorting again."""
    out = {**doc, "summary": _summary(doc.get("usage", []))}
    if "corrected_usage" in doc:
        out["corrected_summary"] = _summary(doc["corrected_usage"])
    points: dict[str, int] = {}
    for r in doc.get("usage", []):
        points[r["tenant_id"]] = points.get(r["tenant_id"], 0) + r["points"]
    return out, sorted(points, key=lambda t: (-points[t], t))


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_type: dict[str, dict[str, int]] = {}
    tenants = set()
    for r in rows:
        tenants.add(r["tenant_id"])
        t = by_type.setdefault(r["workload_type"], {"workloads": 0, "points": 0})
        t["workloads"] += r["workloads"]
        t["points"] += r["points"]
    return {
        "tenants": len(tenants),
        "workloads": sum(t["workloads"] for t in by_type.values()),
        "points": sum(t["points"] for t in by_type.values()),
        "by_type": dict(sorted(by_type.items())),
    }


def top_tenants(answer: MonthAnswer, n: int) -> dict[str, Any]:
    """The answer's document with the rows (and corrected rows) of its ``n`` tenants with
    the most points only, most points first; ``summary`` stays over every tenant."""
    chosen = answer.order[:n]
    rank = {t: i for i, t in enumerate(chosen)}
    doc = answer.doc
    out = {**doc, "top": n, "tenants_shown": len(chosen)}
    for key in ("usage", "corrected_usage"):
        if key in doc:
            rows = [r for r in doc[key] if r["tenant_id"] in rank]
            rows.sort(key=lambda r: (rank[r["tenant_id"]], r["workload_type"]))
            out[key] = rows
    return out


def _correction(c: dict[str, Any]) -> bool:
    """In the shape :func:`~meter.stream.usage.fold` adds in."""
    return (
        isinstance(c.get("tenant_id"), str)
        and isinstance(c.get("workload_type"), str)
        and isinstance(c.get("workloads_added"), int)
        and isinstance(c.get("points_added"), int)
    )


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
