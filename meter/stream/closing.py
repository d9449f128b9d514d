"""Month close for one worker's home partitions: state, and the records it publishes.

Kept apart from the worker's event loop; pure except for what the worker hands in.
See :mod:`meter.domain.close` for the rules.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import orjson

from meter.domain import Height, Ledger, Rate, TenantMonth, points_height
from meter.domain.close import Correction, closes_at, corrections
from meter.domain.license import Contribution, LicenseLedger, LicenseMonth, window
from meter.domain.ratecard import rental_machine
from meter.stream.records import changelog_slices, encode_license_final_chunk

FINAL = "final"
CLOSED = "closed"

#: tenant -> {(workload_type, workload_id): (rate, new)}: a month's license report at close.
LicenseSnapshot = dict[str, dict[tuple[str, str], Contribution]]


def iso(t: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ`` of a UTC time, four-digit year also before 1000
    (``strftime("%Y")`` writes year 1 as ``1``); :data:`~meter.domain.close.NEVER`
    is ``9999-12-31T23:59:59Z``."""
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}Z"


@dataclass
class HomeClose:
    """Close state of one home partition.

    ``height`` must be the one the partition's :class:`Ledger` has
    (``HomeClose(height=cards.height)``), so a final record carries the same
    revision as the running record of the same state.
    """

    closed: set[str] = field(default_factory=set)
    #: month -> tenant -> {(workload_type, workload_id): rate} at close
    finals: dict[str, dict[str, dict[tuple[str, str], Rate]]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    #: (tenant, month, workload_type, workload_id) -> id of the event behind a late change
    late_ids: dict[tuple[str, str, str, str], str] = field(default_factory=dict)
    #: month -> the license view's report at close (vendor rules), and its history start
    license_finals: dict[str, LicenseSnapshot] = field(default_factory=dict)
    license_starts: dict[str, str | None] = field(default_factory=dict)
    height: Height = points_height

    def license_snapshot(self, lic: LicenseLedger, month: str) -> LicenseSnapshot:
        snap: LicenseSnapshot = {}
        for tenant, wtype, wid, c in lic.workloads(month):
            snap.setdefault(tenant, {})[(wtype, wid)] = c
        return snap

    def final_license_month(self, tenant: str, month: str) -> LicenseMonth:
        """A tenant's license totals at ``month``'s close."""
        lm = LicenseMonth(tenant, month)
        for (wtype, _), (rate, new) in self.license_finals.get(month, {}).get(tenant, {}).items():
            t = lm.totals.setdefault(wtype, [0, 0, 0, 0, 0])
            t[0] += 1
            t[1] += new
            t[2] += rental_machine(rate)
            t[3 + new] += rate[0]
            lm.revision += self.height(rate) + (not new)
        return lm

    def snapshot(self, ledger: Ledger, month: str) -> dict[str, dict[tuple[str, str], Rate]]:
        return {tm.tenant_id: tm.snapshot() for tm in ledger.tenant_months() if tm.month == month}

    def final_tenant_month(self, tenant: str, month: str) -> TenantMonth:
        tm = TenantMonth(tenant, month, self.height)
        for (wtype, wid), rate in self.finals[month].get(tenant, {}).items():
            tm.add(wtype, wid, rate)
        return tm

    def corrections(self, ledger: Ledger, month: str) -> list[Correction]:
        out: list[Correction] = []
        final = self.finals.get(month, {})
        for tm in ledger.tenant_months():
            if tm.month == month:
                out.extend(corrections(tm, final.get(tm.tenant_id, {})))
        return out


# ---------------------------------------------------------------- changelog records


def encode_final_chunk(month: str, tenant_entries: Iterable[tuple[str, str, str, Rate]]) -> bytes:
    return orjson.dumps(
        {
            "v": 1,
            FINAL: month,
            "entries": [[t, w, i, r[0], r[1], r[2]] for t, w, i, r in tenant_entries],
        }
    )


def encode_closed_marker(month: str, closed_at: datetime) -> bytes:
    return orjson.dumps({"v": 1, CLOSED: month, "closed_at": iso(closed_at)})


def close_records(
    month: str,
    snapshot: dict[str, dict[tuple[str, str], Rate]],
    license_snapshot: LicenseSnapshot,
    history_start: str | None,
    closed_at: datetime,
) -> list[bytes]:
    """The changelog records that close ``month`` on a home partition: its final snapshot
    and the license view's in records that fit (the license view's at least one, empty or
    not: it carries the history start of the close), then the close marker, last (a
    snapshot without it is not a close)."""
    rows = [(t, month, w, i, r) for t, wl in snapshot.items() for (w, i), r in wl.items()]
    out = [
        encode_final_chunk(month, [(t, w, i, r) for t, _, w, i, r in rows[part]])
        for part in changelog_slices(rows)
    ]
    lrows = [
        (t, w, i, r, new) for t, wl in license_snapshot.items() for (w, i), (r, new) in wl.items()
    ]
    parts = list(changelog_slices([(t, month, w, i, r) for t, w, i, r, _ in lrows]))
    out += [
        encode_license_final_chunk(month, lrows[p], history_start) for p in parts or [slice(0, 0)]
    ]
    out.append(encode_closed_marker(month, closed_at))
    return out


# ---------------------------------------------------------------- published records


def correction_record(c: Correction, event_id: str | None, corrected_at: str) -> dict[str, Any]:
    return {
        "tenant_id": c.tenant_id,
        "month": c.month,
        "workload_type": c.workload_type,
        "workload_id": c.workload_id,
        "workloads_added": c.workloads_added,
        "points_added": c.points_added,
        "rental_added": c.rental_added,
        "ratecard": c.ratecard,
        "event_id": event_id,
        "reason": "late",
        "corrected_at": corrected_at,
    }


def totals_of(tms: Iterable[TenantMonth]) -> tuple[dict[str, dict[str, int]], int, int]:
    by_type: dict[str, dict[str, int]] = {}
    for tm in tms:
        for wtype, (n, p, rental) in tm.totals.items():
            t = by_type.setdefault(wtype, {"workloads": 0, "points": 0, "rental_workloads": 0})
            t["workloads"] += n
            t["points"] += p
            t["rental_workloads"] += rental
    by_type = dict(sorted(by_type.items()))
    return (
        by_type,
        sum(t["workloads"] for t in by_type.values()),
        sum(t["points"] for t in by_type.values()),
    )


def tenant_report(tm: TenantMonth, grace: timedelta) -> dict[str, Any]:
    usage, workloads, points = totals_of([tm])
    return {
        "type": "tenant_month",
        "tenant_id": tm.tenant_id,
        "month": tm.month,
        "usage": usage,
        "workloads": workloads,
        "points": points,
        "ratecard": ",".join(tm.ratecards),
        "revision": tm.revision,
        "closed_at": iso(closes_at(tm.month, grace)),
    }


def partition_summary(
    month: str, partition: int, partitions: int, tms: list[TenantMonth], grace: timedelta
) -> dict[str, Any]:
    usage, workloads, points = totals_of(tms)
    return {
        "type": "partition_summary",
        "month": month,
        "partition": partition,
        "partitions": partitions,
        "tenants": len([tm for tm in tms if tm.types]),
        "usage": usage,
        "workloads": workloads,
        "points": points,
        "closed_at": iso(closes_at(month, grace)),
    }


def provider_summary(month: str, parts: list[dict[str, Any]], grace: timedelta) -> dict[str, Any]:
    usage: dict[str, dict[str, int]] = {}
    for part in parts:
        for wtype, t in part["usage"].items():
            u = usage.setdefault(wtype, {"workloads": 0, "points": 0, "rental_workloads": 0})
            u["workloads"] += t["workloads"]
            u["points"] += t["points"]
            u["rental_workloads"] += t.get("rental_workloads", 0)
    usage = dict(sorted(usage.items()))
    lic: dict[str, Any] = {}
    for part in parts:
        pl = part.get("license_usage")
        if not isinstance(pl, dict):
            continue
        lic.setdefault("history_start", pl.get("history_start"))
        for wtype, u in pl.get("usage", {}).items():
            held = lic.setdefault("usage", {}).setdefault(wtype, dict.fromkeys(u, 0))
            for k, v in u.items():
                held[k] = held.get(k, 0) + v
    if lic:
        lic["usage"] = dict(sorted(lic.get("usage", {}).items()))
        for name in ("workloads", "new_workloads", "rental_workloads", "points", "new_points"):
            lic[name] = sum(u.get(name, 0) for u in lic["usage"].values())
    doc = {
        "type": "provider_summary",
        "month": month,
        "tenants": sum(p["tenants"] for p in parts),
        "usage": usage,
        "workloads": sum(u["workloads"] for u in usage.values()),
        "points": sum(u["points"] for u in usage.values()),
        "closed_at": iso(closes_at(month, grace)),
    }
    if lic:
        doc["license_usage"] = lic
    return doc


# ---------------------------------------------------------------- license view records


def license_key(tenant_id: str, month: str) -> bytes:
    return f"{tenant_id}/{month}".encode()


def _day(d: date | None) -> str | None:
    return None if d is None else f"{d.year:04d}-{d.month:02d}-{d.day:02d}T00:00:00Z"


#: month -> its 31-day window as the record's period_start and period_end (few months)
_PERIODS: dict[str, tuple[str | None, str | None]] = {}


def license_totals(lms: Iterable[LicenseMonth]) -> dict[str, Any]:
    """Per workload type and in all: workloads, new, rental, points (billable), new points.

    From the tenant-months' per-type totals (a flush calls this for every changed
    tenant-month: it costs O(types), never O(workloads))."""
    totals: dict[str, list[int]] = {}
    copied = False  # one tenant-month (a running record) is read as it is, not copied
    for k, lm in enumerate(lms):
        if k == 0:
            totals = lm.totals
            continue
        if not copied:
            totals = {w: list(t) for w, t in totals.items()}
            copied = True
        for wtype, t in lm.totals.items():
            held = totals.get(wtype)
            if held is None:
                totals[wtype] = list(t)
            else:
                held[0] += t[0]
                held[1] += t[1]
                held[2] += t[2]
                held[3] += t[3]
                held[4] += t[4]
    usage: dict[str, dict[str, int]] = {}
    workloads = new = rental = points = new_points = 0
    for wtype in sorted(totals):
        n, nw, r, p, np_ = totals[wtype]
        if not n:
            continue
        usage[wtype] = {
            "workloads": n,
            "new_workloads": nw,
            "rental_workloads": r,
            "points": p,
            "new_points": np_,
        }
        workloads += n
        new += nw
        rental += r
        points += p
        new_points += np_
    return {
        "usage": usage,
        "workloads": workloads,
        "new_workloads": new,
        "rental_workloads": rental,
        "points": points,
        "new_points": new_points,
    }


def _period(month: str) -> tuple[str | None, str | None]:
    held = _PERIODS.get(month)
    if held is None:
        start, end = window(month)
        if len(_PERIODS) > 10_000:
            _PERIODS.clear()
        held = _PERIODS[month] = (_day(start), _day(end))
    return held


def license_record(
    lm: LicenseMonth,
    history_start: str | None,
    updated_at: str,
    *,
    status: str,
    closed_at: str | None = None,
) -> dict[str, Any]:
    """One tenant-month of the license view (``meter.license``), running or final.

    ``points`` are what the vendor bills (new workloads excluded); the window is
    ``[period_start, period_end)``.  Readers keep, per key, the record with the earliest
    ``history_start`` and then the highest ``revision`` (:func:`license_order`)."""
    start, end = _period(lm.month)
    doc: dict[str, Any] = {
        "view": "license",
        "tenant_id": lm.tenant_id,
        "month": lm.month,
        "status": status,
        "period_start": start,
        "period_end": end,
        "history_start": history_start,
        "revision": lm.revision,
        **license_totals([lm]),
        "updated_at": updated_at,
    }
    if closed_at is not None:
        doc["closed_at"] = closed_at
    return doc


def license_order(record: dict[str, Any]) -> tuple[int, int]:
    """Which of two records of one tenant-month is newer: the history start only moves
    earlier and, with the same start, the revision only grows."""
    hs = record.get("history_start")
    start = -(int(hs[:4]) * 12 + int(hs[5:7])) if isinstance(hs, str) and len(hs) == 7 else 0
    rev = record.get("revision")
    return start, rev if isinstance(rev, int) and not isinstance(rev, bool) else -1


def license_correction_record(
    key: tuple[str, str, str, str],
    now: Contribution | None,
    before: Contribution | None,
    event_id: str | None,
    corrected_at: str,
) -> dict[str, Any] | None:
    """How one workload's line in a closed month's license report differs from the final
    report; ``None`` when it does not."""
    if now == before:
        return None
    tenant, month, wtype, wid = key

    def parts(c: Contribution | None) -> tuple[int, int, int, int, int]:
        if c is None:
            return 0, 0, 0, 0, 0
        rate, new = c
        return 1, int(new), rental_machine(rate), 0 if new else rate[0], rate[0] if new else 0

    a, b = parts(now), parts(before)
    return {
        "view": "license",
        "tenant_id": tenant,
        "month": month,
        "workload_type": wtype,
        "workload_id": wid,
        "workloads_added": a[0] - b[0],
        "new_added": a[1] - b[1],
        "rental_added": a[2] - b[2],
        "points_added": a[3] - b[3],
        "new_points_added": a[4] - b[4],
        "ratecard": None if now is None else now[0][1],
        "event_id": event_id,
        "reason": "late",
        "corrected_at": corrected_at,
    }
