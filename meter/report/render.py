"""Render a usage report as a table (for people), CSV or JSON.

The JSON document is::

    {"usage": [{"month", "tenant_id", "workload_type", "workloads", "points"}, ...],
     "events": {"read", "counted", "duplicate", "not_counted", "rejected"},
     "rejected": [{"line": 7, "reason": "..."}, ...],
     "rejected_not_listed": 0}

``events`` and ``rejected`` are present when the report was computed from
events (``meter rate``); a report read from the usage topic has ``usage`` only.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from meter.domain import Tally, UsageRow

FORMATS: Final = ("table", "csv", "json")
#: The title of the calendar-month table where the license usage (vendor rules) is
#: shown too, so nobody confuses the two views.
TENANT_USAGE_TITLE: Final = "TENANT USAGE (calendar month)"


@dataclass
class UsageReport:
    usage: Sequence[UsageRow]
    tally: Tally | None = None
    rejected: list[dict[str, Any]] = field(default_factory=list)
    rejected_not_listed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "usage": [
                {
                    "month": r.month,
                    "tenant_id": r.tenant_id,
                    "workload_type": r.workload_type,
                    "workloads": r.workloads,
                    "points": r.points,
                }
                for r in self.usage
            ]
        }
        if self.tally is not None:
            doc["events"] = self.tally.as_dict()
            doc["rejected"] = self.rejected
            doc["rejected_not_listed"] = self.rejected_not_listed
        doc.update(self.extra)
        return doc


def render(report: UsageReport, fmt: str) -> str:
    if fmt == "json":
        return orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2).decode() + "\n"
    if fmt == "csv":
        return _csv(report)
    if fmt == "table":
        return _table(report)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _csv(report: UsageReport) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["month", "tenant_id", "workload_type", "workloads", "points"])
    for r in report.usage:
        w.writerow([r.month, r.tenant_id, r.workload_type, r.workloads, r.points])
    return out.getvalue()


def _table(report: UsageReport) -> str:
    head = ("MONTH", "TENANT", "WORKLOAD TYPE", "WORKLOADS", "POINTS")
    rows = [
        (r.month, r.tenant_id, r.workload_type, str(r.workloads), str(r.points))
        for r in report.usage
    ]
    # One TOTAL per month: a month's points are what is charged for it; months do not add
    # into one bill.  A report of one month (or none) keeps the month column of TOTAL empty.
    # Summed in one pass over the rows (not once per month: O(months x rows)).
    sums: dict[str, list[int]] = {}
    for r in report.usage:
        s = sums.setdefault(r.month, [0, 0])
        s[0] += r.workloads
        s[1] += r.points
    months = sorted(sums)
    footers = [
        (
            m if len(months) > 1 else "",
            "TOTAL",
            "",
            *(str(n) for n in sums.get(m, (0, 0))),
        )
        for m in months or [""]
    ]
    widths = [max(len(x[i]) for x in [head, *footers, *rows]) for i in range(5)]

    def line(cells: Sequence[str]) -> str:
        left = "  ".join(c.ljust(widths[i]) for i, c in enumerate(cells[:3]))
        right = "  ".join(c.rjust(widths[i + 3]) for i, c in enumerate(cells[3:]))
        return f"{left}  {right}".rstrip()

    rule = "-" * len(line(head))
    parts = []
    extra = report.extra
    if extra.get("final"):
        parts.append(f"FINAL report for {extra.get('month')} (closed {extra.get('closed_at')})")
        parts.append("")
    parts += [line(head), rule, *(line(r) for r in rows)]
    if not rows:
        parts.append("(no counted workloads)")
    parts += [rule, *(line(f) for f in footers)]
    if report.tally is not None:
        t = report.tally
        parts.append("")
        parts.append(
            f"events: {t.read} read, {t.counted} counted, {t.duplicate} duplicate, "
            f"{t.not_counted} not counted, {t.rejected} rejected"
        )
        for rej in report.rejected:
            parts.append(f"  rejected line {rej['line']}: {rej['reason']}")
        if report.rejected_not_listed:
            parts.append(f"  ... and {report.rejected_not_listed} more rejected lines not listed")
    if extra.get("corrections_since_close"):
        parts.append("")
        parts.append(
            f"{extra['corrections_since_close']} correction(s) since the close (late events): "
            f"{extra.get('corrected_points')} points with them; see them with "
            f"meter report --month {extra.get('month')} --with-corrections"
        )
    if "corrections" in extra:
        parts.append("")
        parts.append(f"corrections after the close ({len(extra['corrections'])}):")
        for c in extra["corrections"]:
            parts.append(
                f"  {c['tenant_id']}  {c['workload_type']}  {c['workload_id']}: "
                f"+{c['workloads_added']} workloads, +{c['points_added']} points "
                f"(event {c.get('event_id')}, {c.get('reason')})"
            )
        corrected = extra.get("corrected_usage", [])
        parts.append(
            f"corrected totals: {sum(u['workloads'] for u in corrected)} workloads, "
            f"{sum(u['points'] for u in corrected)} points"
        )
    return "\n".join(parts) + "\n"
