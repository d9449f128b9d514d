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
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from meter.domain.license import LicenseStatus, ProviderLicense, previous_month
from meter.kafka import KafkaSettings, close_consumer, describe_partitions
from meter.report import UsageReport
from meter.stream.usage import (
    fold,
    fold_license,
    keep_correction,
    keep_latest,
    keep_license,
    keep_license_correction,
    license_month_state,
    license_rows,
    usage_rows,
)

log = logging.getLogger(__name__)


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

    def months(self) -> list[str]:
        months = {r["month"] for r in self.records.values() if "month" in r}
        months |= {c["month"] for c in self.corrections.values() if "month" in c}
        return sorted(months, reverse=True)

    def document(self, month: str | None = None, tenant_id: str | None = None) -> dict[str, Any]:
        """The same shape as ``meter report --format json``; for one month, with its
        status (see :func:`month_document`) and ``license`` when there is one."""
        if month is None:
            rows = usage_rows(fold(self.records, self.corrections), tenant_id=tenant_id)
            return UsageReport(usage=rows).as_dict()
        doc = month_document(self.records, self.corrections, month, tenant_id)
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
            before = into.get(k)
            if into is self.records:
                self.keep_record(into, k, record)
            else:
                self.keep_fix(into, k, record)
            after = into.get(k)
            if after is not before:
                self.version += 1
                self.changed(before, after, timestamp_ms)

    def changed(
        self, before: dict[str, Any] | None, after: dict[str, Any] | None, timestamp_ms: int
    ) -> None:
        """A key's record went from ``before`` to ``after``, published at ``timestamp_ms``."""


class LicenseView(UsageView):
    """A live view of ``meter.license`` (the license view, vendor rules) and its
    corrections: what the status page's license gauge shows against the license."""

    keep_record = staticmethod(keep_license)
    keep_fix = staticmethod(keep_license_correction)

    def __init__(self, settings: KafkaSettings, topic: str, corrections: str | None = None) -> None:
        super().__init__(settings, topic, corrections)
        #: month -> the provider's used points now, records and corrections together
        self._used: dict[str, int] = {}
        #: month -> UTC day -> used points after the last record published that day: the
        #: trend, from the records' own timestamps (a replay draws the same line)
        self.trend: dict[str, dict[str, int]] = {}

    def changed(
        self, before: dict[str, Any] | None, after: dict[str, Any] | None, timestamp_ms: int
    ) -> None:
        month = (after or before or {}).get("month")
        if not isinstance(month, str):
            return
        change = _points(after) - _points(before)
        used = self._used[month] = self._used.get(month, 0) + change
        if timestamp_ms >= 0 and (change or month not in self.trend):
            day = datetime.fromtimestamp(timestamp_ms / 1000, UTC).date().isoformat()
            self.trend.setdefault(month, {})[day] = used

    def status(
        self, month: str, license_: ProviderLicense | None, today: date
    ) -> dict[str, Any] | None:
        """``month``'s used points (the whole provider, corrections folded in) against the
        license, as :meth:`LicenseStatus.as_dict`; ``None`` before anything was read."""
        if not self.records and license_ is None:
            return None
        rows = license_rows(fold_license(self.records, self.corrections))
        prev = previous_month(month)
        doc = LicenseStatus(
            month=month,
            used_points=sum(r.points for r in rows if r.month == month),
            new_points=sum(r.new_points for r in rows if r.month == month),
            previous_new_points=sum(r.new_points for r in rows if r.month == prev),
            license=license_,
            today=today,
        ).as_dict()
        doc["status"] = license_month_state(fold_license(self.records, self.corrections), month)
        doc["trend"] = [[day, points] for day, points in sorted(self.trend.get(month, {}).items())]
        return doc


def _points(record: dict[str, Any] | None) -> int:
    """The billable points a license record or correction adds to its month."""
    if record is None:
        return 0
    if "points_added" in record:
        points = record.get("points_added")
        return points if isinstance(points, int) else 0
    usage = record.get("usage")
    if not isinstance(usage, dict):
        return 0
    return sum(
        u["points"]
        for u in usage.values()
        if isinstance(u, dict) and isinstance(u.get("points"), int)
    )


def month_document(
    records: dict[str, dict[str, Any]],
    corrections: dict[str, dict[str, Any]],
    month: str,
    tenant_id: str | None = None,
) -> dict[str, Any]:
    """One month's usage and what it is, as ``meter report --month M --with-corrections``.

    - ``running`` (``"final": false``): not every record of the month is final yet;
      ``usage`` is what the events say now (corrections folded in).
    - ``final``: every record is final; ``usage`` is the month as closed, ``closed_at``.
    - ``final+corrections``: also late events after the close: ``corrections`` (per
      workload) and ``corrected_usage`` (final + corrections).

    A month known only from corrections (closed with no usage, late events after) is final.
    """
    mine = [r for r in records.values() if r.get("month") == month]
    fixes = [c for c in corrections.values() if c.get("month") == month and _correction(c)]
    closed = all(r.get("final") is True for r in mine) and bool(mine or fixes)
    if not closed:
        rows = usage_rows(fold(records, corrections), month=month, tenant_id=tenant_id)
        return {**UsageReport(usage=rows).as_dict(), "final": False, "status": "running"}
    doc = UsageReport(usage=usage_rows(records, month=month, tenant_id=tenant_id)).as_dict()
    doc["final"] = True
    closed_at = sorted({r["closed_at"] for r in mine if isinstance(r.get("closed_at"), str)})
    if closed_at:
        doc["closed_at"] = closed_at[-1]
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
