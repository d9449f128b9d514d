"""``meter rate``'s license usage (vendor rules) beside the tenant usage (calendar month).

The events are real JSON lines, rated by the command as a user runs it; the clock is a
file (``--clock``) so a month is running or final on purpose.
"""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path
from typing import Any

import orjson
import pytest

from meter.cli import main
from tests.domain.events import line

#: After both months of the vendor's example closed (December closes 2027-01-03).
AFTER = "2027-01-05T09:30:00Z"


def rate(tmp_path: Path, lines: list[bytes], *args: str, now: str = AFTER) -> str:
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n")
    clock = tmp_path / "clock"
    clock.write_text(now)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["rate", str(events), "--clock", str(clock), *args]) == 0
    return out.getvalue()


def vspc(tmp_path: Path, lines: list[bytes], *args: str, now: str = AFTER) -> list[dict[str, str]]:
    text = rate(tmp_path, lines, "--format", "vspc-csv", *args, now=now)
    return list(csv.DictReader(io.StringIO(text)))


def run_meter(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``meter ARGS`` in-process: (exit code, stdout, stderr), argparse's exits included."""
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def vm(n: int, time: str, tenant: str = "acme", license: str = "subscription") -> bytes:
    return line(tenant=tenant, workload=f"vm-{n}", license=license, time=time, id=f"{time}-{n}")


def seven_plus_two() -> list[bytes]:
    """The vendor's example: 7 machines in November; in December the same 7 and 2 more."""
    november = [vm(n, "2026-11-10T22:00:00Z") for n in range(1, 8)]
    december = [vm(n, "2026-12-10T22:00:00Z") for n in range(1, 10)]
    return november + december


def counts(row: dict[str, str]) -> tuple[int, ...]:
    keys = ("count", "new_count", "rental_count", "billable_count", "points", "new_points")
    return tuple(int(row[k]) for k in keys)


def totals(rows: list[dict[str, str]]) -> dict[str, tuple[int, ...]]:
    return {r["month"]: counts(r) for r in rows if r["workload"] == "TOTAL"}


# ------------------------------------------------------------------ vspc-csv


def test_seven_plus_two_machines_the_two_are_new_and_free_in_december(tmp_path: Path) -> None:
    rows = vspc(tmp_path, seven_plus_two(), "--history-start", "2026-11")
    assert list(rows[0]) == [
        "month", "period_start", "period_end", "status", "tenant_id", "workload", "count",
        "new_count", "rental_count", "billable_count", "points_per_unit", "points",
        "new_points", "ratecards", "history_start", "generated_at",
    ]  # fmt: skip
    assert [(r["month"], r["tenant_id"], r["workload"]) for r in rows] == [
        ("2026-11", "acme", "CC_VM_Backup"),
        ("2026-11", "*", "CC_VM_Backup"),
        ("2026-11", "*", "TOTAL"),
        ("2026-12", "acme", "CC_VM_Backup"),
        ("2026-12", "*", "CC_VM_Backup"),
        ("2026-12", "*", "TOTAL"),
    ]
    #                 (count, new, rental, billable, points, new_points)
    assert totals(rows) == {"2026-11": (7, 0, 0, 7, 35, 0), "2026-12": (9, 2, 0, 7, 35, 10)}
    assert counts(rows[3]) == (9, 2, 0, 7, 35, 10)
    assert {r["points_per_unit"] for r in rows if r["workload"] != "TOTAL"} == {"5"}
    assert {r["points_per_unit"] for r in rows if r["workload"] == "TOTAL"} == {""}
    dec = rows[3]
    assert (dec["period_start"], dec["period_end"]) == (
        "2026-12-01T00:00:00Z",
        "2027-01-01T00:00:00Z",
    )
    # Every row says what the report is, what made it and when.
    assert {(r["status"], r["ratecards"], r["history_start"], r["generated_at"]) for r in rows} == {
        ("final", "vcsp-2026", "2026-11", "2027-01-05T09:30:00Z")
    }


def test_a_month_is_running_until_it_closes(tmp_path: Path) -> None:
    # 2 December: November has ended but closes on the 3rd; December is under way (its
    # events of the 10th are ahead of this clock: accepted, --clock-skew off).
    early = ("--clock-skew", "off")
    rows = vspc(tmp_path, seven_plus_two(), *early, now="2026-12-02T23:59:59Z")
    assert {r["month"]: r["status"] for r in rows} == {"2026-11": "running", "2026-12": "running"}
    rows = vspc(tmp_path, seven_plus_two(), *early, now="2026-12-03T00:00:00+00:00")
    assert {r["month"]: r["status"] for r in rows} == {"2026-11": "final", "2026-12": "running"}


def test_history_start_makes_the_first_months_machines_new(tmp_path: Path) -> None:
    rows = vspc(tmp_path, seven_plus_two(), "--history-start", "2026-10")
    # November is no longer the first month of history: its 7 are new there, and free.
    assert totals(rows) == {"2026-11": (7, 7, 0, 0, 0, 35), "2026-12": (9, 2, 0, 7, 35, 10)}
    assert {r["history_start"] for r in rows} == {"2026-10"}
    # December is the first month: November has no license report, nothing is new.
    rows = vspc(tmp_path, seven_plus_two(), "--history-start", "2026-12")
    assert totals(rows) == {"2026-12": (9, 0, 0, 9, 45, 0)}
    # A history start after the data: no license report at all.
    assert vspc(tmp_path, seven_plus_two(), "--history-start", "2027-01") == []
    # None declared: nothing is new anywhere, and every row says so.
    rows = vspc(tmp_path, seven_plus_two())
    assert totals(rows) == {"2026-11": (7, 0, 0, 7, 35, 0), "2026-12": (9, 0, 0, 9, 45, 0)}
    assert {r["history_start"] for r in rows} == {"none"}


def test_february_window_reaches_into_january(tmp_path: Path) -> None:
    lines = [
        vm(1, "2026-01-28T23:59:59Z"),  # January only: before February's window
        vm(2, "2026-01-29T00:00:00Z"),  # first second of February's window
        vm(3, "2026-01-31T12:00:00Z", license="rental"),
        vm(4, "2026-02-10T10:00:00Z"),  # new in February
        vm(5, "2026-02-28T23:59:59Z"),  # new in February, last second of the window
        vm(6, "2026-03-01T00:00:00Z"),  # March
    ]
    start = ("--history-start", "2026-01")
    rows = vspc(tmp_path, lines, *start, now="2026-03-02T00:00:00Z")
    feb = [r for r in rows if r["month"] == "2026-02"]
    assert {(r["period_start"], r["period_end"]) for r in feb} == {
        ("2026-01-29T00:00:00Z", "2026-03-01T00:00:00Z")
    }
    # vm-2 and vm-3 were seen in January: counted again in February, not new.
    assert totals(rows)["2026-02"] == (4, 2, 1, 2, 5, 10)
    assert totals(rows)["2026-01"] == (3, 0, 1, 3, 10, 0)
    assert totals(rows)["2026-03"] == (1, 1, 0, 0, 0, 5)
    assert {r["month"]: r["status"] for r in rows} == {
        "2026-01": "final",
        "2026-02": "running",
        "2026-03": "running",
    }
    # --month keeps the window: February alone still reaches into January.
    only = vspc(tmp_path, lines, *start, "--month", "2026-02", now="2026-03-02T00:00:00Z")
    assert only == feb


def test_an_empty_month_is_reported_with_a_zero_total(tmp_path: Path) -> None:
    rows = vspc(tmp_path, seven_plus_two(), "--month", "2027-02", now="2027-03-03T00:00:00Z")
    assert [(r["month"], r["tenant_id"], r["workload"], r["status"]) for r in rows] == [
        ("2027-02", "*", "TOTAL", "final")
    ]
    assert counts(rows[0]) == (0, 0, 0, 0, 0, 0)
    assert rows[0]["period_start"] == "2027-01-29T00:00:00Z"


def test_tenant_filter_keeps_only_its_rows(tmp_path: Path) -> None:
    lines = [*seven_plus_two(), vm(1, "2026-12-11T00:00:00Z", tenant="globex")]
    rows = vspc(tmp_path, lines, "--tenant", "globex", "--history-start", "2026-11")
    # The sums are labelled with the tenant, never "*": they are not the provider's.
    assert [(r["month"], r["tenant_id"], r["workload"]) for r in rows] == [
        ("2026-12", "globex", "CC_VM_Backup"),
        ("2026-12", "globex", "CC_VM_Backup"),
        ("2026-12", "globex", "TOTAL"),
    ]
    # globex's first month is December, after the history start: new.
    assert counts(rows[-1]) == (1, 1, 0, 0, 0, 5)
    # The table says it is filtered, and that the license line is the whole provider's.
    lic = tmp_path / "license.json"
    lic.write_bytes(b'{"licensed_points": 100}')
    start = ("--history-start", "2026-11", "--license", str(lic))
    text = rate(tmp_path, lines, "--tenant", "globex", *start)
    assert "LICENSE USAGE (vendor rules) 2026-12 — final — window " in text
    assert "2027-01-01T00:00:00Z — tenant globex only\n" in text
    # acme's 7 old VMs (35) are the provider's points beside globex's new one (0).
    assert "license (the whole provider's, all tenants): used 35 of licensed 100 points" in text
    doc = orjson.loads(rate(tmp_path, lines, "--tenant", "globex", *start, "--format", "json"))
    assert [m["tenant_id"] for m in doc["license_usage"]["months"]] == ["globex"]
    whole = orjson.loads(rate(tmp_path, lines, *start, "--format", "json"))
    assert {m["tenant_id"] for m in whole["license_usage"]["months"]} == {None}


# ------------------------------------------------------------------ flags


@pytest.mark.parametrize("value", ["2026-13", "2026-00", "0000-01", "2026-1", "26-01", "soon"])
def test_an_invalid_month_flag_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    events = tmp_path / "e.jsonl"
    events.write_bytes(vm(1, "2026-11-10T00:00:00Z") + b"\n")
    for flag in ("--history-start", "--month"):
        code, out, err = run_meter(capsys, "rate", str(events), flag, value, "--format", "vspc-csv")
        assert code == 2, err
        assert out == ""
        assert f"argument {flag}: " in err
        assert repr(value) in err
        assert "expected YYYY-MM" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read license file"),
        (b"{licensed_points: 5}", "not valid JSON"),
        (b'{"licensed_points": -1}', "licensed_points -1 is out of range: allowed 0 to"),
        (b'{"licensed_points": 100, "expires": "31.12.2026"}', "expires must be a date"),
        (b'{"licensed_points": 100, "points": 5}', "unknown keys 'points'"),
        (b"[100]", "expected an object with licensed_points"),
    ],
)
def test_an_invalid_license_file_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, message: str
) -> None:
    events = tmp_path / "e.jsonl"
    events.write_bytes(vm(1, "2026-11-10T00:00:00Z") + b"\n")
    lic = tmp_path / "license.json"
    if content is not None:
        lic.write_bytes(content)
    code, out, err = run_meter(capsys, "rate", str(events), "--license", str(lic))
    assert code == 2
    assert out == ""
    assert err.startswith(f"meter: error: {lic}: ")
    assert message in err


# ------------------------------------------------------------------ JSON and table


def license_doc(tmp_path: Path, *args: str) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(rate(tmp_path, seven_plus_two(), "--format", "json", *args))
    return doc


def test_license_status_against_a_license_file(tmp_path: Path) -> None:
    lic = tmp_path / "license.json"
    lic.write_bytes(b'{"licensed_points": 20, "expires": "2027-01-31"}')
    doc = license_doc(tmp_path, "--history-start", "2026-10", "--license", str(lic))
    section = doc["license_usage"]
    assert section["view"] == "license"
    assert section["rules"]["window_days"] == 31
    nov, dec = section["months"]
    assert dec["license"] == {
        "declared": True,
        "licensed_points": 20,
        "expires": "2027-01-31",
        "days_to_expiry": 26,  # from 2027-01-05
        "month": "2026-12",
        "used_points": 35,  # the 7 of November; the 2 new ones are free
        "new_points": 10,
        "previous_new_points": 35,  # November's 7 were new (history starts in October)
        "warning_points": 30,  # 20 + max(10, 10%)
        "allowed_points": 75,  # 20 + max(20, 20%) + 35
        "state": "warning",
    }
    assert nov["license"]["used_points"] == 0
    assert nov["license"]["state"] == "expiring"  # under the limit, expiry within 30 days
    assert dec["totals"] == {
        "workloads": 9,
        "new": 2,
        "rental": 0,
        "billable": 7,
        "points": 35,
        "new_points": 10,
    }
    assert dec["rows"] == [
        {
            "tenant_id": "acme",
            "workload_type": "vm",
            "workload": "CC_VM_Backup",
            "workloads": 9,
            "new": 2,
            "rental": 0,
            "billable": 7,
            "points": 35,
            "new_points": 10,
        }
    ]
    assert {k: dec[k] for k in ("month", "period_start", "period_end", "status")} == {
        "month": "2026-12",
        "period_start": "2026-12-01T00:00:00Z",
        "period_end": "2027-01-01T00:00:00Z",
        "status": "final",
    }
    assert (dec["generated_at"], dec["history_start"], dec["ratecards"]) == (
        "2027-01-05T09:30:00Z",
        "2026-10",
        ["vcsp-2026"],
    )


def test_no_license_declared_is_said(tmp_path: Path) -> None:
    doc = license_doc(tmp_path, "--history-start", "2026-11")
    dec = doc["license_usage"]["months"][1]["license"]
    assert (dec["declared"], dec["state"], dec["used_points"]) == (False, "undeclared", 35)
    text = rate(tmp_path, seven_plus_two(), "--history-start", "2026-11")
    assert "license: used 35 points; no license declared (--license FILE)" in text


def test_table_shows_the_license_section_after_the_tenant_usage(tmp_path: Path) -> None:
    lic = tmp_path / "license.json"
    lic.write_bytes(b'{"licensed_points": 100, "history_start": "2026-11"}')
    text = rate(tmp_path, seven_plus_two(), "--license", str(lic), now="2026-12-20T00:00:00Z")
    calendar, _, license = text.partition("\nLICENSE USAGE (vendor rules) 2026-11")
    assert calendar.startswith("TENANT USAGE (calendar month)\n\nMONTH ")
    assert "LICENSE" not in calendar
    assert license.startswith(" — final — window 2026-10-31T00:00:00Z..2026-12-01T00:00:00Z\n")
    assert (
        "LICENSE USAGE (vendor rules) 2026-12 — running — "
        "window 2026-12-01T00:00:00Z..2027-01-01T00:00:00Z" in license
    )
    dec = license.partition("2026-12 — running")[2]
    assert [ln.split() for ln in dec.splitlines() if ln.startswith(("vm ", "ALL TYPES"))] == [
        ["vm", "9", "2", "7", "35", "10"],
        ["ALL", "TYPES", "9", "2", "7", "35", "10"],
    ]
    assert (
        "license: used 35 of licensed 100 points; warning at 110; allowed 120 "
        "(incl. 0 new points of the month before); ok" in dec
    )
    assert "history start: 2026-11 (declared; no new workloads in it)\n" in dec
    assert "generated 2026-12-20T00:00:00Z; rate cards vcsp-2026" in dec
    # The TOTAL lines are the tenant usage's, one per month.
    assert [ln.split() for ln in text.splitlines() if "TOTAL" in ln] == [
        ["2026-11", "TOTAL", "7", "35"],
        ["2026-12", "TOTAL", "9", "45"],
    ]


# ------------------------------------------------------------------ nothing else changed

MID_MONTH = [
    line(tenant="acme", workload="vm-1", time="2026-11-10T08:00:00Z", id="m1"),
    line(tenant="acme", workload="vm-2", license="rental", time="2026-11-12T08:00:00Z", id="m2"),
    line(tenant="acme", workload="rep-1", wtype="replica", license="rental",
         time="2026-11-14T08:00:00Z", id="m3"),
    line(tenant="globex", workload="srv-1", wtype="server", license="perpetual",
         time="2026-11-15T08:00:00Z", id="m4"),
    line(tenant="globex", workload="srv-1", wtype="server", license="perpetual",
         result="failed", time="2026-11-16T08:00:00Z", id="m5"),
    b'{"not": "an event"}',
]  # fmt: skip

# What meter rate printed for MID_MONTH before the license view was added (commit 52b2e82).
OLD_TABLE = """\
MONTH    TENANT  WORKLOAD TYPE  WORKLOADS  POINTS
-------------------------------------------------
2026-11  acme    replica                1      10
2026-11  acme    vm                     2       5
2026-11  globex  server                 1       7
-------------------------------------------------
         TOTAL                          4      22

events: 6 read, 4 counted, 0 duplicate, 1 not counted, 1 rejected
  rejected line 6: specversion: missing
"""
OLD_CSV = """\
month,tenant_id,workload_type,workloads,points
2026-11,acme,replica,1,10
2026-11,acme,vm,2,5
2026-11,globex,server,1,7
"""
OLD_JSON = {
    "usage": [
        {"month": "2026-11", "tenant_id": "acme", "workload_type": "replica",
         "workloads": 1, "points": 10},
        {"month": "2026-11", "tenant_id": "acme", "workload_type": "vm",
         "workloads": 2, "points": 5},
        {"month": "2026-11", "tenant_id": "globex", "workload_type": "server",
         "workloads": 1, "points": 7},
    ],
    "events": {"read": 6, "counted": 4, "duplicate": 0, "not_counted": 1, "rejected": 1},
    "rejected": [{"line": 6, "reason": "specversion: missing"}],
    "rejected_not_listed": 0,
}  # fmt: skip


def test_tenant_usage_outputs_are_unchanged(tmp_path: Path) -> None:
    assert rate(tmp_path, MID_MONTH, "--format", "csv") == OLD_CSV
    doc = orjson.loads(rate(tmp_path, MID_MONTH, "--format", "json", now="2026-11-20T00:00:00Z"))
    assert list(doc) == [*OLD_JSON, "license_usage"]
    assert {k: doc[k] for k in OLD_JSON} == OLD_JSON
    text = rate(tmp_path, MID_MONTH, now="2026-11-20T00:00:00Z")
    assert text.startswith("TENANT USAGE (calendar month)\n\n" + OLD_TABLE + "\n")
    assert text.count("LICENSE USAGE (vendor rules)") == 1
    # In the middle of a month both views agree on the workloads and points.
    [nov] = doc["license_usage"]["months"]
    assert (nov["totals"]["workloads"], nov["totals"]["points"], nov["status"]) == (
        4,
        22,
        "running",
    )


# ------------------------------------------------------------------ the history start


def provider_months() -> list[bytes]:
    """Issue 18's case: 400 events of 60 VMs of one subscription tenant, 30 of them in
    October 2026 and all 60 in November."""
    lines = []
    for n in range(400):
        if n < 150:
            lines.append(vm(n % 30, f"2026-10-{1 + n % 28:02d}T10:{n % 60:02d}:00Z"))
        else:
            lines.append(vm(n % 60, f"2026-11-{1 + n % 28:02d}T10:{n % 60:02d}:00Z"))
    return lines


STRAY = vm(7, "2001-01-01T00:00:00Z")  # a tenant server whose clock was reset


def test_one_event_dated_2001_moves_no_bill(tmp_path: Path) -> None:
    lic = tmp_path / "license.json"
    lic.write_bytes(b'{"licensed_points": 500, "history_start": "2026-10"}')
    now = "2026-12-05T00:00:00Z"
    want = vspc(tmp_path, provider_months(), "--license", str(lic), now=now)
    assert totals(want)["2026-10"] == (30, 0, 0, 30, 150, 0)
    got = vspc(tmp_path, [*provider_months(), STRAY], "--license", str(lic), now=now)
    assert got == want  # 2001 has no license report, October still bills 30 VMs
    # The same with the flag instead of the license file; both: they must agree.
    flag = ("--history-start", "2026-10")
    assert vspc(tmp_path, [*provider_months(), STRAY], *flag, now=now) == want
    both = vspc(tmp_path, [*provider_months(), STRAY], *flag, "--license", str(lic), now=now)
    assert both == want
    # JSON counts what lies before the history start; tenant usage has it.
    doc = orjson.loads(rate(tmp_path, [*provider_months(), STRAY], "--format", "json", *flag))
    months = doc["license_usage"]["months"]
    assert [(m["month"], m["history_start"], m["before_history_start"]) for m in months] == [
        ("2026-10", "2026-10", 1),
        ("2026-11", "2026-10", 1),
    ]
    assert "2001-01" in {r["month"] for r in doc["usage"]}
    text = rate(tmp_path, [*provider_months(), STRAY], *flag)
    assert (
        "history start: 2026-10 (declared; no new workloads in it); 1 workload-months dated "
        "before it count in tenant usage only" in text
    )


def test_without_a_history_start_nothing_is_new_and_every_report_says_so(tmp_path: Path) -> None:
    rows = vspc(tmp_path, [*provider_months(), STRAY], now="2026-12-05T00:00:00Z")
    assert totals(rows) == {
        "2001-01": (1, 0, 0, 1, 5, 0),
        "2026-10": (30, 0, 0, 30, 150, 0),
        "2026-11": (60, 0, 0, 60, 300, 0),
    }
    assert {r["history_start"] for r in rows} == {"none"}
    doc = orjson.loads(rate(tmp_path, provider_months(), "--format", "json"))
    assert {m["history_start"] for m in doc["license_usage"]["months"]} == {None}
    assert "history start: none declared, so no workload is new: all are billed" in rate(
        tmp_path, provider_months()
    )


def test_the_history_start_is_declared_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(provider_months()) + b"\n")
    lic = tmp_path / "license.json"
    lic.write_bytes(b'{"licensed_points": 500, "history_start": "2026-10"}')
    code, out, err = run_meter(
        capsys, "rate", str(events), "--license", str(lic), "--history-start", "2026-09"
    )
    assert (code, out) == (2, "")
    assert "--history-start 2026-09 but" in err
    assert "declares history_start 2026-10" in err
    for bad in (b'"2026-13"', b'"oct"', b"202610", b'""'):
        lic.write_bytes(b'{"licensed_points": 500, "history_start": ' + bad + b"}")
        code, out, err = run_meter(capsys, "rate", str(events), "--license", str(lic))
        assert (code, out) == (2, ""), bad
        assert "history_start must be the month metering began, YYYY-MM" in err, err
