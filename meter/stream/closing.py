"""Month close for one worker's home partitions: state, and the records it publishes.

Kept apart from the worker's event loop; pure except for what the worker hands in.
See :mod:`meter.domain.close` for the rules.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson

from meter.domain import Height, Ledger, Rate, TenantMonth, points_height
from meter.domain.close import Correction, closes_at, corrections

FINAL = "final"
CLOSED = "closed"


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
    height: Height = points_height

    def snapshot(self, ledger: Ledger, month: str) -> dict[str, dict[tuple[str, str], Rate]]:
        return {
            tm.tenant_id: dict(tm.workloads) for tm in ledger.tenant_months() if tm.month == month
        }

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
        "tenants": len([tm for tm in tms if tm.workloads]),
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
    return {
        "type": "provider_summary",
        "month": month,
        "tenants": sum(p["tenants"] for p in parts),
        "usage": usage,
        "workloads": sum(u["workloads"] for u in usage.values()),
        "points": sum(u["points"] for u in usage.values()),
        "closed_at": iso(closes_at(month, grace)),
    }
