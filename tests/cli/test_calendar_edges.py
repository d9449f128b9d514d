"""Events in the first and the last month of the calendar rate, close and report.

A valid event dated 9999-12 made the month close compute the next month and
raise; 9999-12 is now never due (see :mod:`meter.domain.close`).
"""

from __future__ import annotations

import contextlib
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from meter.cli import main
from meter.domain import Rater, load_ratecards
from meter.domain.close import NEVER, closes_at, correction_for, months_to_close
from meter.report import FORMATS, UsageReport, render
from meter.report.vspc import render_vspc
from meter.stream.closing import (
    HomeClose,
    encode_closed_marker,
    iso,
    partition_summary,
    provider_summary,
    tenant_report,
)
from tests.domain.events import line

CARDS = load_ratecards()  # effective from 0001-01-01
TIMES = {
    "0001-01-01T00:00:00Z": "0001-01",
    "0001-01-01T01:00:00+01:00": "0001-01",
    "9999-12-15T00:00:00+05:00": "9999-12",
    "9999-12-31T23:59:60Z": "9999-12",
    "9999-12-31T22:00:00-01:59": "9999-12",
    "0001-01-01T00:00:00+01:00": None,  # year 0 in UTC: no rate card
    "9999-12-31T23:00:00-01:00": None,  # year 10000 in UTC: no rate card
}


def edge_lines() -> list[bytes]:
    return [line(time=t, id=f"e-{i}", workload=f"vm-{i}") for i, t in enumerate(TIMES)]


def rated() -> Rater:
    rater = Rater(CARDS)
    for raw in edge_lines():
        rater.feed(raw)
    return rater


def test_meter_rate_reports_the_first_and_last_months(tmp_path: Path) -> None:
    path = tmp_path / "edges.jsonl"
    path.write_bytes(b"\n".join(edge_lines()) + b"\n")
    for fmt in FORMATS:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            # --clock-skew off: 9999-12 is far ahead of any clock (and that rule is not the
            # calendar's; tests/cli/test_rate_clock.py has it).
            assert main(["rate", str(path), "--format", fmt, "--clock-skew", "off"]) == 0
        if fmt == "json":
            doc = orjson.loads(out.getvalue())
            assert [(u["month"], u["workloads"]) for u in doc["usage"]] == [
                ("0001-01", 2),
                ("9999-12", 3),
            ]
            assert doc["events"]["rejected"] == 2
            assert all("outside the years 0001 to 9999" in r["reason"] for r in doc["rejected"])


def test_the_last_month_never_closes_and_the_first_closes_on_time() -> None:
    rater = rated()
    months = {tm.month for tm in rater.ledger.tenant_months()}
    assert months == {"0001-01", "9999-12"}
    for now in (datetime(2026, 11, 3, tzinfo=UTC), datetime(9999, 12, 31, tzinfo=UTC), NEVER):
        assert months_to_close(months, set(), now) == ["0001-01"]
    assert iso(closes_at("0001-01")) == "0001-02-03T00:00:00Z"
    assert iso(closes_at("9999-12")) == "9999-12-31T23:59:59Z"


@pytest.mark.parametrize("month", ["0001-01", "9999-12"])
def test_close_records_and_reports_render(month: str) -> None:
    rater = rated()
    grace = timedelta(days=2)
    hc = HomeClose()
    snap = hc.snapshot(rater.ledger, month)
    hc.finals[month] = snap
    tms = [hc.final_tenant_month(tenant, month) for tenant in sorted(snap)]
    reports = [tenant_report(tm, grace) for tm in tms]
    part = partition_summary(month, 0, 1, tms, grace)
    prov = provider_summary(month, [part], grace)
    closed_at = iso(closes_at(month, grace))
    assert {r["closed_at"] for r in [*reports, part, prov]} == {closed_at}
    assert orjson.loads(encode_closed_marker(month, closes_at(month, grace)))["closed"] == month
    assert hc.corrections(rater.ledger, month) == []
    rate = next(iter(snap["acme"].values()))
    assert list(correction_for("acme", month, "vm", "new", rate, None))

    rows = rater.ledger.usage(month=month)
    extra = {"final": True, "month": month, "closed_at": closed_at}
    for fmt in FORMATS:
        assert month in render(UsageReport(rows, rater.tally, extra=extra), fmt)
    vspc = render_vspc(rows, CARDS).splitlines()
    assert vspc[1].startswith(f"{month},acme,CC_VM_Backup,")
    assert vspc[-1].startswith(f"{month},*,TOTAL,")
