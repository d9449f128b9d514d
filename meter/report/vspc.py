"""The vendor's workload names and per-unit points, and the old calendar-month CSV.

``--format vspc-csv`` is the license usage report by the vendor's rules (31-day
window, new workloads free in their first month): :mod:`meter.report.license`
renders it, with :data:`WORKLOAD_NAMES` and :func:`per_unit` from here.

:func:`render_vspc` is the earlier CSV of the **calendar-month** view (tenant usage),
kept only while ``meter report`` still calls it; it is *not* what the vendor bills.
One row per tenant and workload type, then one provider total row per workload
type and a grand total:

=================  ==========================================================
column             meaning
=================  ==========================================================
month              the UTC calendar month, YYYY-MM
tenant_id          the tenant; ``*`` on the provider total rows
workload           the vendor's workload name (see ``WORKLOAD_NAMES``)
count              distinct protected workloads
rental_count       of ``count``, rental machines: free because their tenant is on
                   rental (:func:`~meter.domain.ratecard.rental_machine`)
points_per_unit    the rate card's points for one workload of a tenant *not* on rental
                   (a rental workload of a backup type is charged 0; a replica is
                   charged the same either way)
points             points consumed: what the provider is billed
=================  ==========================================================
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Final

from meter.domain import RateCards, UsageRow

WORKLOAD_NAMES: Final = {
    "vm": "CC_VM_Backup",
    "replica": "CC_VM_Replica",
    "workstation": "CC_Workstation_Backup",
    "server": "CC_Server_Backup",
    "cloud_vm": "PC_VM_Backup",
    "cloud_database": "PC_Database_Backup",
    "cloud_file_share": "PC_File_Share_Backup",
    "cloud_vpc": "PC_VPC_Backup",
}
COLUMNS: Final = (
    "month",
    "tenant_id",
    "workload",
    "count",
    "rental_count",
    "points_per_unit",
    "points",
)


def render_vspc(rows: Sequence[UsageRow], cards: RateCards) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(COLUMNS)
    order = list(WORKLOAD_NAMES)
    rows = sorted(rows, key=lambda r: (r.month, r.tenant_id, order.index(r.workload_type)))
    for r in rows:
        w.writerow(
            [
                r.month,
                r.tenant_id,
                WORKLOAD_NAMES[r.workload_type],
                r.workloads,
                r.rental,
                per_unit(cards, r.month, r.workload_type),
                r.points,
            ]
        )
    for month in sorted({r.month for r in rows}):
        in_month = [r for r in rows if r.month == month]
        for wtype in order:
            of_type = [r for r in in_month if r.workload_type == wtype]
            if of_type:
                w.writerow(
                    [
                        month,
                        "*",
                        WORKLOAD_NAMES[wtype],
                        sum(r.workloads for r in of_type),
                        sum(r.rental for r in of_type),
                        per_unit(cards, month, wtype),
                        sum(r.points for r in of_type),
                    ]
                )
        w.writerow(
            [
                month,
                "*",
                "TOTAL",
                sum(r.workloads for r in in_month),
                sum(r.rental for r in in_month),
                "",
                sum(r.points for r in in_month),
            ]
        )
    return out.getvalue()


def per_unit(cards: RateCards, month: str, workload_type: str) -> int:
    """The non-rental rate of the card in effect at the end of ``month``."""
    y, m = int(month[:4]), int(month[5:7])
    card = cards.card_at(y * 10000 + m * 100 + 31) or cards.cards[0]
    return card.points(workload_type, "subscription")
