"""Reading ``meter.usage``: the highest revision per tenant-month is the truth.

Of equal revisions (the same state), the later record wins: see :func:`keep_latest`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from meter.domain import UsageRow
from meter.domain.license import LicenseRow, LicenseStatus, ProviderLicense, previous_month
from meter.kafka import KafkaSettings, TopicError, iter_to_end
from meter.report.license import MonthInfo
from meter.stream.closing import license_order

log = logging.getLogger(__name__)


def keep_latest(
    latest: dict[str, dict[str, Any]], key: str, record: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Keep ``record`` for ``key`` unless a higher revision is already held.

    Ties keep the later record (``>=``): an equal revision means the same state,
    and the later record is at least as new (a month's final record has the
    revision of the running record it follows, and must win).
    """
    held = latest.get(key)
    if held is None or _revision(record) >= _revision(held):
        latest[key] = record
    return latest


def _revision(record: dict[str, Any]) -> int:
    """The record's revision; -1 when it has none that is an integer."""
    rev = record.get("revision")
    return rev if isinstance(rev, int) and not isinstance(rev, bool) else -1


def keep_correction(
    latest: dict[str, dict[str, Any]], key: str, record: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Per workload, the correction with the most added is the truth (both only grow)."""
    held = latest.get(key)

    def size(r: dict[str, Any]) -> tuple[int, int]:
        return int(r.get("workloads_added", 0)), int(r.get("points_added", 0))

    if held is None or size(record) >= size(held):
        latest[key] = record
    return latest


async def read_corrections(settings: KafkaSettings, topic: str) -> dict[str, dict[str, Any]]:
    """Every workload's latest correction on ``topic`` (none if the topic does not exist)."""
    try:
        return await read_keyed(settings, topic, keep_correction)
    except TopicError:
        return {}


def fold(
    records: dict[str, dict[str, Any]], corrections: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Usage records with the corrections after them added in: what the events say now."""
    out: dict[str, dict[str, Any]] = {
        k: {**r, "usage": {w: dict(u) for w, u in r.get("usage", {}).items()}}
        for k, r in records.items()
    }
    for c in corrections.values():
        if not (
            isinstance(c.get("tenant_id"), str)
            and isinstance(c.get("month"), str)
            and isinstance(c.get("workload_type"), str)
            and isinstance(c.get("workloads_added"), int)
            and isinstance(c.get("points_added"), int)
        ):
            log.warning("correction %r is not in the documented shape; skipped", c)
            continue
        key = f"{c['tenant_id']}/{c['month']}"
        rec = out.setdefault(key, {"tenant_id": c["tenant_id"], "month": c["month"], "usage": {}})
        u = rec["usage"].setdefault(c["workload_type"], {"workloads": 0, "points": 0})
        u["workloads"] += int(c["workloads_added"])
        u["points"] += int(c["points_added"])
        u["rental_workloads"] = u.get("rental_workloads", 0) + int(c.get("rental_added", 0))
    return out


async def read_usage(settings: KafkaSettings, topic: str) -> dict[str, dict[str, Any]]:
    """Every tenant-month's highest-revision record on ``topic``, read to its end."""
    try:
        return await read_keyed(settings, topic, keep_latest)
    except TopicError:
        log.warning("%s does not exist yet: no usage published so far", topic)
        return {}


async def read_license(settings: KafkaSettings, topic: str) -> dict[str, dict[str, Any]]:
    """Every tenant-month's newest license record on ``topic`` (none if it does not exist)."""
    try:
        return await read_keyed(settings, topic, keep_license)
    except TopicError:
        return {}


async def read_license_corrections(
    settings: KafkaSettings, topic: str
) -> dict[str, dict[str, Any]]:
    try:
        return await read_keyed(settings, topic, keep_license_correction)
    except TopicError:
        return {}


def keep_last(
    latest: dict[str, dict[str, Any]], key: str, record: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The last record per key wins (what compaction keeps)."""
    latest[key] = record
    return latest


Keep = Callable[[dict[str, dict[str, Any]], str, dict[str, Any]], object]


async def read_keyed(
    settings: KafkaSettings, topic: str, keep: Keep, *, max_seconds: float | None = 60.0
) -> dict[str, dict[str, Any]]:
    """Every keyed JSON object on ``topic``, read to its end, reduced per key by ``keep``.

    Raises :class:`~meter.kafka.TopicError` if the topic does not exist.
    """
    latest: dict[str, dict[str, Any]] = {}
    async for rec in iter_to_end(settings, topic, max_seconds=max_seconds):
        if rec.key is None or not rec.value:
            continue
        try:
            record = orjson.loads(rec.value)
        except orjson.JSONDecodeError:
            log.warning("%s[%d]@%d is not JSON; skipped", rec.topic, rec.partition, rec.offset)
            continue
        if isinstance(record, dict):
            keep(latest, rec.key.decode("utf-8", "replace"), record)
    return latest


def usage_rows(
    records: dict[str, dict[str, Any]], month: str | None = None, tenant_id: str | None = None
) -> list[UsageRow]:
    """Report rows from usage records; a record not in the documented shape is skipped."""
    rows = []
    for r in records.values():
        if not _well_formed(r):
            log.warning("usage record %r is not in the documented shape; skipped", r)
            continue
        if (month is not None and r["month"] != month) or (
            tenant_id is not None and r["tenant_id"] != tenant_id
        ):
            continue
        for wtype, u in r["usage"].items():
            if u["workloads"] > 0:
                rows.append(
                    UsageRow(
                        r["month"],
                        r["tenant_id"],
                        wtype,
                        u["workloads"],
                        u["points"],
                        int(u.get("rental_workloads", 0)),
                    )
                )
    rows.sort(key=lambda r: (r.month, r.tenant_id, r.workload_type))
    return rows


def _well_formed(r: dict[str, Any]) -> bool:
    usage = r.get("usage")
    return (
        isinstance(r.get("month"), str)
        and isinstance(r.get("tenant_id"), str)
        and isinstance(usage, dict)
        and all(
            isinstance(u, dict)
            and isinstance(u.get("workloads"), int)
            and isinstance(u.get("points"), int)
            for u in usage.values()
        )
    )


# ---------------------------------------------------------------- the license view


def keep_license(
    latest: dict[str, dict[str, Any]], key: str, record: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Per tenant-month, the newest license record (:func:`license_order`); ties: the later."""
    held = latest.get(key)
    if held is None or license_order(record) >= license_order(held):
        latest[key] = record
    return latest


def keep_license_correction(
    latest: dict[str, dict[str, Any]], key: str, record: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Per workload, the latest state of its correction: workloads and all points only grow."""
    held = latest.get(key)

    def size(r: dict[str, Any]) -> tuple[int, int, int]:
        points, new = int(r.get("points_added", 0)), int(r.get("new_points_added", 0))
        return int(r.get("workloads_added", 0)), points + new, points

    if held is None or size(record) >= size(held):
        latest[key] = record
    return latest


_LICENSE_FIELDS = ("workloads", "new_workloads", "rental_workloads", "points", "new_points")
_ADDED = {
    "workloads": "workloads_added",
    "new_workloads": "new_added",
    "rental_workloads": "rental_added",
    "points": "points_added",
    "new_points": "new_points_added",
}


def fold_license(
    records: dict[str, dict[str, Any]], corrections: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """License records with the corrections after their close added in (what the events
    say now); a record that was corrected gets ``"corrected": true``."""
    out: dict[str, dict[str, Any]] = {
        k: {**r, "usage": {w: dict(u) for w, u in r.get("usage", {}).items()}}
        for k, r in records.items()
        if license_well_formed(r)
    }
    for c in corrections.values():
        if not license_correction_well_formed(c):
            log.warning("license correction %r is not in the documented shape; skipped", c)
            continue
        key = f"{c['tenant_id']}/{c['month']}"
        rec = out.setdefault(
            key,
            {"view": "license", "tenant_id": c["tenant_id"], "month": c["month"],
             "status": "final", "usage": {}},
        )  # fmt: skip
        u = rec["usage"].setdefault(c["workload_type"], dict.fromkeys(_LICENSE_FIELDS, 0))
        for name, added in _ADDED.items():
            u[name] = u.get(name, 0) + int(c[added])
        rec["corrected"] = True
    return out


def license_rows(
    records: dict[str, dict[str, Any]], month: str | None = None, tenant_id: str | None = None
) -> list[LicenseRow]:
    """Report rows of the license view from (folded) license records."""
    rows = []
    for r in records.values():
        if not license_well_formed(r):
            continue
        if (month is not None and r["month"] != month) or (
            tenant_id is not None and r["tenant_id"] != tenant_id
        ):
            continue
        for wtype, u in r["usage"].items():
            if u.get("workloads", 0) > 0:
                rows.append(
                    LicenseRow(r["month"], r["tenant_id"], wtype,
                               *(int(u.get(f, 0)) for f in _LICENSE_FIELDS))
                )  # fmt: skip
    rows.sort(key=lambda r: (r.month, r.tenant_id, r.workload_type))
    return rows


def license_month_state(records: dict[str, dict[str, Any]], month: str) -> str:
    """``running`` while any of the month's records is; else ``final``, or
    ``final+corrections`` once corrections are folded in.  One month: for many, group the
    records once (:func:`by_month`) and call :func:`month_state` on each group."""
    return month_state([r for r in records.values() if r.get("month") == month])


def month_state(mine: list[dict[str, Any]]) -> str:
    """The state of one month's license report from that month's records."""
    if not mine or any(r.get("status") != "final" for r in mine):
        return "running"
    return "final+corrections" if any(r.get("corrected") for r in mine) else "final"


def by_month(records: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The records grouped by their ``month``, in one pass (a record without a string
    month is in no group).  A report over many months reads each group, never every
    record once per month: that was O(months x records), minutes over 4,000 months."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records.values():
        m = r.get("month")
        if isinstance(m, str):
            out.setdefault(m, []).append(r)
    return out


def license_correction_well_formed(c: dict[str, Any]) -> bool:
    """A license correction in the documented shape (others are skipped, with a warning)."""
    return (
        isinstance(c.get("tenant_id"), str)
        and isinstance(c.get("month"), str)
        and isinstance(c.get("workload_type"), str)
        and all(isinstance(c.get(a), int) for a in _ADDED.values())
    )


def license_well_formed(r: dict[str, Any]) -> bool:
    """A license record in the documented shape (others are skipped)."""
    usage = r.get("usage")
    return (
        isinstance(r.get("month"), str)
        and isinstance(r.get("tenant_id"), str)
        and isinstance(usage, dict)
        and all(
            isinstance(u, dict) and all(isinstance(u.get(f, 0), int) for f in _LICENSE_FIELDS)
            for u in usage.values()
        )
    )


def record_month_infos(
    usage: dict[str, dict[str, Any]],
    shown: dict[str, dict[str, Any]],
    now_: dict[str, dict[str, Any]],
    months: Sequence[str],
    *,
    generated_at: datetime,
    license: ProviderLicense | None = None,
    tenant_id: str | None = None,
) -> list[MonthInfo]:
    """What each of ``months``' license report is, from the topics' records (``meter
    report``): its state and history start from the license records ``shown``, its card
    versions from the ``usage`` records (of ``tenant_id`` only, when given), and the whole
    provider's used points against ``license`` from ``now_`` (every correction folded in).

    Each record set is read once, whatever the number of months (linear, not
    O(months x records))."""
    shown_by = by_month(shown)
    cards: dict[str, set[str]] = {}
    for m, recs in by_month(usage).items():
        mine = cards.setdefault(m, set())
        for r in recs:
            if tenant_id in (None, r.get("tenant_id")):
                mine.update(c for c in r.get("ratecards", []) if isinstance(c, str))
    used: dict[str, list[int]] = {}
    for row in license_rows(now_):
        u = used.setdefault(row.month, [0, 0])
        u[0] += row.points
        u[1] += row.new_points
    infos = []
    for m in months:
        recs = shown_by.get(m, [])
        starts = [r["history_start"] for r in recs if isinstance(r.get("history_start"), str)]
        prev = previous_month(m)
        points, new_points = used.get(m, (0, 0))
        infos.append(
            MonthInfo(
                month=m,
                status=month_state(recs),
                generated_at=generated_at,
                ratecards=tuple(sorted(cards.get(m, ()))),
                history_start=min(starts) if starts else None,
                license=LicenseStatus(
                    month=m,
                    used_points=points,
                    new_points=new_points,
                    previous_new_points=0 if prev is None else used.get(prev, (0, 0))[1],
                    license=license,
                    today=generated_at.astimezone(UTC).date(),
                ),
                tenant_id=tenant_id,
            )
        )
    return infos
