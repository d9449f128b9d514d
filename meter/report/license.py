"""The license usage report (vendor rules): the vendor CSV, a JSON section and a table.

Shared by ``meter rate`` and ``meter report``.  They compute the rows
(:class:`~meter.domain.license.LicenseRow`, from a
:class:`~meter.domain.license.LicenseLedger`) and say what each month's report is
(:class:`MonthInfo`, or :func:`month_info` from a ledger); the functions here only
render.  The calendar-month view (**tenant usage**) is rendered by
:mod:`meter.report.render`; this one is **license usage**, what the provider submits
to the vendor and is billed on.

``--format vspc-csv`` (:func:`render_license_csv`): one row per tenant and workload
type, then one provider row per workload type and a ``TOTAL`` row, for each month.
Every row repeats what the report is, so a running CSV can never pass for a final one:

=================  ==========================================================
column             meaning
=================  ==========================================================
month              the report month, YYYY-MM
period_start       start of its 31-day window, UTC (``2026-01-29T00:00:00Z``)
period_end         end of the window, exclusive: 00:00 UTC on the first day of
                   the next month (``2026-03-01T00:00:00Z``)
status             ``running`` (the month is not closed yet: it can still
                   change), ``final`` (as closed) or ``final+corrections``
                   (as closed, with late events folded in)
tenant_id          the tenant; ``*`` on the provider rows, or the one tenant of a
                   report filtered to it (``--tenant``): its sums are never labelled
                   as the provider's
workload           the vendor's workload name (:data:`~meter.report.vspc.WORKLOAD_NAMES`),
                   ``TOTAL`` on the provider's grand total
count              protected workloads: a success or warning session in the window
new_count          of ``count``, new this month (first session in this month): free
rental_count       of ``count``, rental machines: free because their tenant is on
                   rental (:func:`~meter.domain.ratecard.rental_machine`); a
                   rental tenant's replica or cloud workload pays, so is not one
billable_count     ``count - new_count``
points_per_unit    the rate card's points for one workload of a tenant *not* on
                   rental (:func:`~meter.report.vspc.per_unit`); empty on ``TOTAL``
points             points consumed by the billable workloads (new excluded): what
                   the vendor bills
new_points         points the new workloads would have consumed (for information)
ratecards          the rate-card versions that rated the month's workloads, ``;``-separated
history_start      the first month of meter's history, as declared (it has no new
                   workloads); ``none``: none declared, so no workload is new (all
                   are billed)
generated_at       when the report was made, UTC (``2026-11-28T11:20:00Z``)
=================  ==========================================================

A month described by a :class:`MonthInfo` but with no rows still gets its ``TOTAL``
row (all zero), so an empty month is reported, not missing.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Final

from meter.domain.license import (
    RULES,
    LicenseLedger,
    LicenseRow,
    LicenseStatus,
    ProviderLicense,
    previous_month,
    window,
)
from meter.domain.ratecard import RateCards
from meter.report.vspc import WORKLOAD_NAMES, per_unit

#: What a month's report is.
STATUSES: Final = ("running", "final", "final+corrections")

CSV_COLUMNS: Final = (
    "month",
    "period_start",
    "period_end",
    "status",
    "tenant_id",
    "workload",
    "count",
    "new_count",
    "rental_count",
    "billable_count",
    "points_per_unit",
    "points",
    "new_points",
    "ratecards",
    "history_start",
    "generated_at",
)

#: The history start column (and table) when none is declared: no workload is new.
NO_HISTORY_START: Final = "none"

#: The totals of a month, in this order: JSON ``totals`` keys and the table's columns.
TOTALS: Final = ("workloads", "new", "rental", "billable", "points", "new_points")


@dataclass(frozen=True, slots=True)
class MonthInfo:
    """What one month's license report is: everything a reader needs besides the rows."""

    month: str
    #: one of :data:`STATUSES`
    status: str
    #: when the report was made (aware; printed in UTC)
    generated_at: datetime
    #: rate-card versions that rated the month's workloads
    ratecards: tuple[str, ...] = ()
    #: the declared first month of meter's history (no new workloads in it); ``None``:
    #: none declared, no workload is new
    history_start: str | None = None
    #: workload-months of tenant usage dated before the history start (all months): in
    #: the license view only where a window reaches back to them
    before_history_start: int = 0
    #: used points against the provider's license; ``None``: not computed
    license: LicenseStatus | None = None
    #: the one tenant the report was filtered to (``--tenant``); ``None``: the provider
    tenant_id: str | None = None
    rules: Mapping[str, object] = field(default_factory=lambda: RULES)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r}: expected one of {', '.join(STATUSES)}")
        if self.generated_at.tzinfo is None:
            raise ValueError("generated_at must be an aware datetime")

    @property
    def period_start(self) -> str:
        return day_iso(window(self.month)[0])

    @property
    def period_end(self) -> str:
        """Exclusive; 10000-01-01 for 9999-12 (no ``date`` holds it)."""
        end = window(self.month)[1]
        return "10000-01-01T00:00:00Z" if end is None else day_iso(end)

    @property
    def generated(self) -> str:
        return time_iso(self.generated_at)


def day_iso(d: date) -> str:
    """00:00 UTC of ``d``: ``YYYY-MM-DDT00:00:00Z`` (four-digit year also before 1000)."""
    return f"{d.year:04d}-{d.month:02d}-{d.day:02d}T00:00:00Z"


def time_iso(t: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ`` of an aware time, in UTC."""
    u = t.astimezone(UTC)
    return f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}Z"


# ------------------------------------------------------------------ from a ledger


def license_status(
    view: LicenseLedger, month: str, license: ProviderLicense | None, today: date
) -> LicenseStatus:
    """``month``'s used points (vendor rules, new excluded, the whole provider) against
    ``license``; undeclared when ``license`` is ``None``."""
    prev = previous_month(month)
    return LicenseStatus(
        month=month,
        used_points=view.points(month),
        new_points=view.new_points(month),
        previous_new_points=0 if prev is None else view.new_points(prev),
        license=license,
        today=today,
    )


def month_info(
    view: LicenseLedger,
    month: str,
    status: str,
    generated_at: datetime,
    license: ProviderLicense | None = None,
    tenant_id: str | None = None,
) -> MonthInfo:
    """A :class:`MonthInfo` from the ledger: card versions of the workloads counted in
    ``month`` (of ``tenant_id`` only, when given) and the license status (always the
    whole provider's: the license is the provider's).  One month: for many, use
    :func:`month_infos` (this reads the whole ledger)."""
    return month_infos(view, {month: status}, generated_at, license, tenant_id)[0]


def month_infos(
    view: LicenseLedger,
    statuses: Mapping[str, str],
    generated_at: datetime,
    license: ProviderLicense | None = None,
    tenant_id: str | None = None,
) -> list[MonthInfo]:
    """:func:`month_info` of each month of ``statuses`` (month -> its status), in that
    order, reading the ledger once: linear in the ledger, not O(months x ledger)."""
    cards = view.ratecards_by_month(tenant_id)
    points = view.points_by_month()
    before = view.before_start(tenant_id)
    today = generated_at.astimezone(UTC).date()
    infos = []
    for month, status in statuses.items():
        prev = previous_month(month)
        used, new = points.get(month, (0, 0))
        infos.append(
            MonthInfo(
                month=month,
                status=status,
                generated_at=generated_at,
                ratecards=tuple(sorted(cards.get(month, ()))),
                history_start=view.history_start,
                before_history_start=before,
                tenant_id=tenant_id,
                license=LicenseStatus(
                    month=month,
                    used_points=used,
                    new_points=new,
                    previous_new_points=0 if prev is None else points.get(prev, (0, 0))[1],
                    license=license,
                    today=today,
                ),
            )
        )
    return infos


# ------------------------------------------------------------------ grouping


def _months(
    rows: Sequence[LicenseRow], infos: Iterable[MonthInfo]
) -> list[tuple[MonthInfo, list[LicenseRow]]]:
    """Each described month, oldest first, with its rows by tenant and vendor order."""
    by_month = {i.month: i for i in infos}
    order = {wtype: n for n, wtype in enumerate(WORKLOAD_NAMES)}
    grouped: dict[str, list[LicenseRow]] = {m: [] for m in by_month}
    for r in rows:
        if r.month not in by_month:
            raise ValueError(f"rows of {r.month} but no MonthInfo for it")
        grouped[r.month].append(r)
    return [
        (
            by_month[m],
            sorted(grouped[m], key=lambda r: (r.tenant_id, order.get(r.workload_type, 99))),
        )
        for m in sorted(grouped)
    ]


def totals(rows: Iterable[LicenseRow]) -> dict[str, int]:
    """``{workloads, new, rental, billable, points, new_points}`` summed over ``rows``."""
    out = dict.fromkeys(TOTALS, 0)
    for r in rows:
        out["workloads"] += r.workloads
        out["new"] += r.new
        out["rental"] += r.rental
        out["billable"] += r.billable
        out["points"] += r.points
        out["new_points"] += r.new_points
    return out


def _by_type(rows: Sequence[LicenseRow]) -> list[tuple[str, dict[str, int]]]:
    types = [w for w in WORKLOAD_NAMES if any(r.workload_type == w for r in rows)]
    types += sorted({r.workload_type for r in rows} - set(types))
    return [(w, totals(r for r in rows if r.workload_type == w)) for w in types]


# ------------------------------------------------------------------ CSV


def render_license_csv(
    rows: Sequence[LicenseRow], infos: Iterable[MonthInfo], cards: RateCards
) -> str:
    """The vendor CSV (``--format vspc-csv``) of the described months; see the module
    docstring for the columns.  Every row of ``rows`` must be of a described month."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for info, mine in _months(rows, infos):
        m = info.month
        head = [m, info.period_start, info.period_end, info.status]
        whole = info.tenant_id or "*"  # the sums' label: the filter's tenant, or everyone
        tail = [";".join(info.ratecards), info.history_start or NO_HISTORY_START, info.generated]
        for r in mine:
            w.writerow(
                [
                    *head,
                    r.tenant_id,
                    WORKLOAD_NAMES.get(r.workload_type, r.workload_type),
                    r.workloads,
                    r.new,
                    r.rental,
                    r.billable,
                    per_unit(cards, m, r.workload_type),
                    r.points,
                    r.new_points,
                    *tail,
                ]
            )
        for wtype, t in _by_type(mine):
            w.writerow(
                [
                    *head,
                    whole,
                    WORKLOAD_NAMES.get(wtype, wtype),
                    *_counts(t),
                    per_unit(cards, m, wtype),
                    t["points"],
                    t["new_points"],
                    *tail,
                ]
            )
        t = totals(mine)
        w.writerow([*head, whole, "TOTAL", *_counts(t), "", t["points"], t["new_points"], *tail])
    return out.getvalue()


def _counts(t: Mapping[str, int]) -> list[int]:
    return [t["workloads"], t["new"], t["rental"], t["billable"]]


# ------------------------------------------------------------------ JSON


def license_section(
    rows: Sequence[LicenseRow], infos: Iterable[MonthInfo]
) -> dict[str, dict[str, Any]]:
    """``{"license_usage": {...}}``, to add to a JSON report document::

    {"license_usage": {"view": "license", "rules": RULES,
      "months": [{"month", "period_start", "period_end", "status", "generated_at",
                  "history_start" (null: none declared, nothing is new),
                  "before_history_start" (workload-months before it), "ratecards": [...],
                  "rows": [{"tenant_id", "workload_type", "workload", "workloads",
                            "new", "rental", "billable", "points", "new_points"}],
                  "totals": {"workloads", "new", "rental", "billable", "points",
                             "new_points"},
                  "license": LicenseStatus.as_dict() or null}]}}
    """
    months = []
    rules: Mapping[str, object] = RULES
    for info, mine in _months(rows, infos):
        rules = info.rules
        months.append(
            {
                "month": info.month,
                "period_start": info.period_start,
                "period_end": info.period_end,
                "status": info.status,
                "generated_at": info.generated,
                "history_start": info.history_start,
                "before_history_start": info.before_history_start,
                "tenant_id": info.tenant_id,
                "ratecards": list(info.ratecards),
                "rows": [
                    {
                        "tenant_id": r.tenant_id,
                        "workload_type": r.workload_type,
                        "workload": WORKLOAD_NAMES.get(r.workload_type, r.workload_type),
                        "workloads": r.workloads,
                        "new": r.new,
                        "rental": r.rental,
                        "billable": r.billable,
                        "points": r.points,
                        "new_points": r.new_points,
                    }
                    for r in mine
                ],
                "totals": totals(mine),
                "license": None if info.license is None else info.license.as_dict(),
            }
        )
    return {"license_usage": {"view": "license", "rules": dict(rules), "months": months}}


# ------------------------------------------------------------------ table


def license_table(rows: Sequence[LicenseRow], infos: Iterable[MonthInfo]) -> str:
    """The license usage for people: per month, a title that says what it is, the
    totals per workload type and the license line."""
    parts: list[str] = []
    for info, mine in _months(rows, infos):
        if parts:
            parts.append("")
        only = f" — tenant {info.tenant_id} only" if info.tenant_id else ""
        parts.append(
            f"LICENSE USAGE (vendor rules) {info.month} — {info.status} — "
            f"window {info.period_start}..{info.period_end}{only}"
        )
        parts += _type_table(mine)
        line = license_line(info.license)
        if info.tenant_id:
            line = line.replace("license: ", "license (the whole provider's, all tenants): ", 1)
        parts.append(line)
        parts.append(history_line(info))
        parts.append(
            f"generated {info.generated}; rate cards {', '.join(info.ratecards) or '-'}; "
            f"new workloads are free in their first month; a workload counts with a "
            f"success or warning session in the window"
        )
    if not parts:
        return "LICENSE USAGE (vendor rules): no month with counted workloads\n"
    return "\n".join(parts) + "\n"


def history_line(info: MonthInfo) -> str:
    """What the history start is, and what lies before it."""
    start = info.history_start
    if start is None:
        return (
            "history start: none declared, so no workload is new: all are billed (declare "
            "the month metering began: --history-start or history_start in the license file)"
        )
    line = f"history start: {start} (declared; no new workloads in it)"
    if info.before_history_start:
        line += (
            f"; {info.before_history_start} workload-months dated before it count in tenant "
            "usage only"
        )
    return line


def _type_table(rows: Sequence[LicenseRow]) -> list[str]:
    head = ("WORKLOAD TYPE", "WORKLOADS", "NEW", "BILLABLE", "POINTS", "NEW POINTS")
    keys = ("workloads", "new", "billable", "points", "new_points")
    body = [(wtype, *(str(t[k]) for k in keys)) for wtype, t in _by_type(rows)]
    total = totals(rows)
    # "ALL TYPES", not "TOTAL": the tenant usage table above has the one TOTAL line.
    footer = ("ALL TYPES", *(str(total[k]) for k in keys))
    widths = [max(len(x[i]) for x in [head, footer, *body]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        rest = "  ".join(c.rjust(widths[i + 1]) for i, c in enumerate(cells[1:]))
        return f"{cells[0].ljust(widths[0])}  {rest}"

    rule = "-" * len(line(head))
    out = [line(head), rule, *(line(b) for b in body)]
    if not body:
        out.append("(no counted workloads)")
    return [*out, rule, line(footer)]


def license_line(status: LicenseStatus | None) -> str:
    """``license: used X of licensed L points; warning at W; allowed A (...); state``."""
    if status is None or not status.declared:
        used = "" if status is None else f"used {status.used_points} points; "
        return f"license: {used}no license declared (--license FILE)"
    lic = status.license
    assert lic is not None
    expiry = ""
    if lic.expires is not None:
        expiry = f"; expires {lic.expires.isoformat()} ({status.days_to_expiry} days)"
    return (
        f"license: used {status.used_points} of licensed {lic.licensed_points} points; "
        f"warning at {status.warning_points}; allowed {status.allowed_points} "
        f"(incl. {status.previous_new_points} new points of the month before){expiry}; "
        f"{status.state}"
    )
