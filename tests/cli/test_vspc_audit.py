from __future__ import annotations

from datetime import UTC, datetime

import pytest

from meter.domain import UsageRow, load_ratecards
from meter.domain.license import LicenseRow
from meter.report.audit import compare, compare_license
from meter.report.license import MonthInfo, license_section, license_table, render_license_csv
from meter.report.vspc import render_vspc


def test_vspc_csv_rows_and_provider_totals() -> None:
    rows = [
        UsageRow("2026-10", "acme", "vm", 3, 10, 1),
        UsageRow("2026-10", "acme", "replica", 1, 10, 1),
        UsageRow("2026-10", "globex", "vm", 2, 0, 2),
        UsageRow("2026-10", "globex", "cloud_vm", 1, 11, 0),
    ]
    lines = render_vspc(rows, load_ratecards()).splitlines()
    assert lines == [
        "month,tenant_id,workload,count,rental_count,points_per_unit,points",
        "2026-10,acme,CC_VM_Backup,3,1,5,10",
        "2026-10,acme,CC_VM_Replica,1,1,10,10",
        "2026-10,globex,CC_VM_Backup,2,2,5,0",
        "2026-10,globex,PC_VM_Backup,1,0,11,11",
        "2026-10,*,CC_VM_Backup,5,3,5,10",
        "2026-10,*,CC_VM_Replica,1,1,10,10",
        "2026-10,*,PC_VM_Backup,1,0,11,11",
        "2026-10,*,TOTAL,7,4,,31",
    ]


def test_audit_names_every_difference() -> None:
    want = [UsageRow("2026-10", "acme", "vm", 3, 15), UsageRow("2026-10", "b", "vm", 1, 5)]
    got = [UsageRow("2026-10", "acme", "vm", 3, 10), UsageRow("2026-10", "c", "vm", 1, 0)]
    diffs = compare(want, got)
    assert [(d.tenant_id, d.expected, d.published) for d in diffs] == [
        ("acme", (3, 15), (3, 10)),
        ("b", (1, 5), (0, 0)),
        ("c", (0, 0), (1, 0)),
    ]
    assert "events say 3 workloads / 15 points, published 3 / 10" in str(diffs[0])
    assert compare(want, want) == []


def test_the_license_audit_names_forged_lost_and_invented_rows() -> None:
    want = [LicenseRow("2026-10", "acme", "vm", 3, 1, 0, 10, 5),
            LicenseRow("2026-10", "b", "replica", 1, 0, 1, 10, 0)]  # fmt: skip
    got = [LicenseRow("2026-10", "acme", "vm", 3, 0, 0, 15, 0),  # its new one billed
           LicenseRow("2026-10", "c", "vm", 1, 0, 0, 5, 0)]  # fmt: skip
    diffs = compare_license(want, got)
    assert [(d.tenant_id, d.expected, d.published) for d in diffs] == [
        ("acme", (3, 1, 0, 10, 5), (3, 0, 0, 15, 0)),
        ("b", (1, 0, 1, 10, 0), (0, 0, 0, 0, 0)),  # lost
        ("c", (0, 0, 0, 0, 0), (1, 0, 0, 5, 0)),  # invented
    ]
    assert str(diffs[0]) == (
        "license 2026-10 acme vm: events say 3 workloads, 1 new, 0 rental, 10 points, 5 new "
        "points; published 3 workloads, 0 new, 0 rental, 15 points, 0 new points"
    )
    assert compare_license(want, want) == []


def test_table_shows_a_final_report_and_its_corrections() -> None:
    from meter.report import UsageReport, render

    text = render(
        UsageReport(
            usage=[UsageRow("2026-10", "acme", "vm", 2, 10)],
            extra={
                "month": "2026-10",
                "final": True,
                "closed_at": "2026-11-03T00:00:00Z",
                "corrections": [
                    {"tenant_id": "acme", "workload_type": "vm", "workload_id": "vm-9",
                     "workloads_added": 1, "points_added": 5, "event_id": "e-9", "reason": "late"}
                ],
                "corrected_usage": [{"workloads": 3, "points": 15}],
            },
        ),
        "table",
    )  # fmt: skip
    assert text.startswith("FINAL report for 2026-10 (closed 2026-11-03T00:00:00Z)")
    assert "acme  vm  vm-9: +1 workloads, +5 points (event e-9, late)" in text
    assert "corrected totals: 3 workloads, 15 points" in text


def test_license_csv_from_rows_and_month_info() -> None:
    """The renderers ``meter report`` calls: rows and what each month's report is."""
    at = datetime(2026, 3, 5, 12, 0, 7, tzinfo=UTC)
    rows = [
        LicenseRow("2026-02", "acme", "replica", 1, 0, 1, 10, 0),
        LicenseRow("2026-02", "acme", "vm", 3, 1, 1, 5, 5),
        LicenseRow("2026-02", "globex", "cloud_vm", 1, 1, 0, 0, 11),
    ]
    infos = [
        MonthInfo("2026-02", "final+corrections", at, ("vcsp-2026",), "2025-12"),
        MonthInfo("9999-12", "running", at),
    ]
    lines = render_license_csv(rows, infos, load_ratecards()).splitlines()
    head = "2026-02,2026-01-29T00:00:00Z,2026-03-01T00:00:00Z,final+corrections"
    tail = "vcsp-2026,2025-12,2026-03-05T12:00:07Z"
    assert lines[1:] == [
        f"{head},acme,CC_VM_Backup,3,1,1,2,5,5,5,{tail}",
        f"{head},acme,CC_VM_Replica,1,0,1,1,10,10,0,{tail}",
        f"{head},globex,PC_VM_Backup,1,1,0,0,11,0,11,{tail}",
        f"{head},*,CC_VM_Backup,3,1,1,2,5,5,5,{tail}",
        f"{head},*,CC_VM_Replica,1,0,1,1,10,10,0,{tail}",
        f"{head},*,PC_VM_Backup,1,1,0,0,11,0,11,{tail}",
        f"{head},*,TOTAL,5,2,2,3,,15,16,{tail}",
        "9999-12,9999-12-01T00:00:00Z,10000-01-01T00:00:00Z,running,*,TOTAL,0,0,0,0,,0,0,,none,"
        "2026-03-05T12:00:07Z",  # no history start declared: "none", nothing is new
    ]
    feb = license_section(rows, infos)["license_usage"]["months"][0]
    assert (feb["status"], feb["license"], feb["totals"]["points"]) == (
        "final+corrections",
        None,
        15,
    )
    text = license_table(rows, infos)
    assert text.startswith(
        "LICENSE USAGE (vendor rules) 2026-02 — final+corrections — "
        "window 2026-01-29T00:00:00Z..2026-03-01T00:00:00Z\n"
    )
    assert "license: no license declared (--license FILE)" in text
    with pytest.raises(ValueError, match="rows of 2026-02 but no MonthInfo"):
        render_license_csv(rows, infos[1:], load_ratecards())
    with pytest.raises(ValueError, match="status 'closed'"):
        MonthInfo("2026-02", "closed", at)
