"""Reports are linear in what they read (issue 19): ``meter report`` over 4,000 months took
88 s and over 20,400 months did not finish, because every month scanned every record.

Not timed: each test counts the scans of the records, rows and ledger maps a report makes,
and checks that they do not grow with the number of months (``bench/bench_report.py``
measures the time).  A return to one scan per month fails here at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any
from unittest import mock

import pytest

from bench.bench_report import months, topics
from meter.cli import main
from meter.cli.rate import license_months
from meter.domain import load_ratecards
from meter.domain.license import LicenseLedger, LicenseStatus, ProviderLicense, previous_month
from meter.report import UsageReport, render
from meter.report.license import license_section, license_table, render_license_csv
from meter.stream.usage import (
    fold_license,
    license_month_state,
    license_rows,
    record_month_infos,
)

NOW = datetime(2026, 11, 28, 11, 20, tzinfo=UTC)


class Counted(dict[str, Any]):
    """A dict that counts the scans of it (``values``, ``items``, ``keys``, iteration)."""

    scans = 0

    def values(self) -> Any:
        Counted.scans += 1
        return super().values()

    def items(self) -> Any:
        Counted.scans += 1
        return super().items()

    def keys(self) -> Any:
        Counted.scans += 1
        return super().keys()

    def __iter__(self) -> Iterator[str]:
        Counted.scans += 1
        return super().__iter__()


class CountedList(list[Any]):
    scans = 0

    def __iter__(self) -> Iterator[Any]:
        CountedList.scans += 1
        return super().__iter__()


def work(fn: Callable[[], object]) -> int:
    """The calls (Python and C: ``dict.get``, ``isinstance``, ...) ``fn()`` makes: a count
    of the work done, deterministic, unlike a time.  A scan of every record per month shows
    as a count that grows with the square of the months."""
    calls = 0

    def profile(_frame: object, event: str, _arg: object) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def counted_topics(n: int) -> tuple[Counted, ...]:
    return tuple(Counted(t) for t in topics(n, tenants=2))


def report_scans(n: int, *args: str, count: str = "scans") -> int:
    """Scans of the four topics' records by ``meter report ARGS`` over ``n`` months (or,
    with ``count="calls"``, the calls it makes: :func:`work`)."""
    usage, corr, lic, lcorr = counted_topics(n)

    def reader(value: Counted) -> Any:
        async def read(*_: object) -> Counted:
            await asyncio.sleep(0)
            return value

        return read

    Counted.scans = 0
    with (
        mock.patch("meter.cli.stream.read_usage", reader(usage)),
        mock.patch("meter.cli.stream.read_corrections", reader(corr)),
        mock.patch("meter.cli.stream.read_license", reader(lic)),
        mock.patch("meter.cli.stream.read_license_corrections", reader(lcorr)),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        calls = work(lambda: main(["report", *args]))
    return Counted.scans if count == "scans" else calls


@pytest.mark.parametrize(
    "args",
    [
        ("--format", "table"),
        ("--format", "json"),
        ("--format", "vspc-csv"),
        ("--format", "csv"),
        ("--format", "table", "--tenant", "t1"),
        ("--format", "json", "--month", "0101-05"),
        ("--format", "table", "--month", "0101-05", "--with-corrections"),
    ],
)
def test_meter_report_scans_the_records_a_fixed_number_of_times(args: tuple[str, ...]) -> None:
    few, many = report_scans(12, *args), report_scans(120, *args)
    assert few == many, f"{few} scans over 12 months, {many} over 120: a scan per month"
    assert many < 40
    # Nor are the records derived from them (corrections folded in): the work each month
    # adds is the same over 40 months as over 400 (a scan per month: it grows with them).
    calls = [report_scans(n, *args, count="calls") for n in (40, 120, 400)]
    small, big = (calls[1] - calls[0]) / 80, (calls[2] - calls[1]) / 280
    assert big < 1.25 * small, f"calls per month: {small:.0f} at 40-120, {big:.0f} at 120-400"


def test_record_month_infos_agrees_with_the_per_month_definition() -> None:
    """The one-pass month infos equal what the report computed month by month before."""
    usage, _, lic, lcorr = topics(30, tenants=3)
    lic["t2/0101-03"]["status"] = "running"  # one month still running
    lic["t1/0101-04"]["history_start"] = "0100-12"  # the earliest declared wins
    usage["t1/0101-06"]["ratecards"] = ["2025-01", "2026-01", 7]  # not a string: ignored
    now = fold_license(lic, lcorr)
    license_ = ProviderLicense(100, None)
    ms = [*sorted({r["month"] for r in lic.values()}), "0200-01"]  # one month with no rows
    for tenant in (None, "t1"):
        # As meter report shows it without --month: every correction folded in.
        got = record_month_infos(
            usage, now, now, ms, generated_at=NOW, license=license_, tenant_id=tenant
        )
        rows = license_rows(now)
        for info, m in zip(got, ms, strict=True):
            cards = sorted(
                {
                    c
                    for r in usage.values()
                    if r["month"] == m and tenant in (None, r["tenant_id"])
                    for c in r["ratecards"]
                    if isinstance(c, str)
                }
            )
            starts = [r["history_start"] for r in lic.values() if r["month"] == m]
            prev = previous_month(m)
            assert info.month == m
            assert info.status == license_month_state(now, m)
            assert list(info.ratecards) == cards
            assert info.history_start == (min(starts) if starts else None)
            assert info.tenant_id == tenant
            assert info.license == LicenseStatus(
                month=m,
                used_points=sum(r.points for r in rows if r.month == m),
                new_points=sum(r.new_points for r in rows if r.month == m),
                previous_new_points=sum(r.new_points for r in rows if r.month == prev),
                license=license_,
                today=NOW.date(),
            )
    assert got[2].status == "running"
    assert got[0].status == "final+corrections"  # a correction every 100th month, from the first


def ledger(n: int) -> LicenseLedger:
    ms = list(months(n))
    view = LicenseLedger(history_start=ms[1])
    for m in ms:
        for t in ("t0", "t1"):
            view.add(t, m, "vm", f"w-{t}", (10, "2026-01", "vm"))
            view.add_tail(t, m, "vm", f"tail-{t}", (20, "2025-01", "vm"))
    return view


def ledger_scans(n: int, tenant: str | None) -> int:
    view = ledger(n)
    # Every map a report could scan, counted.
    view.months = Counted(view.months)
    view.tails = Counted(view.tails)
    view.first = Counted(view.first)
    cal = view.calendar
    cal._months = Counted(cal._months)  # type: ignore[attr-defined]
    cal.cells = Counted(cal.cells)
    rows = view.rows(tenant_id=tenant)
    Counted.scans = 0
    args = argparse.Namespace(month=None, tenant=tenant)
    infos = license_months(view, args, NOW, ProviderLicense(50, None), rows)
    assert len(infos) == n - 1  # none before the history start
    return Counted.scans


@pytest.mark.parametrize("tenant", [None, "t1"])
def test_meter_rate_license_months_scan_the_ledger_a_fixed_number_of_times(
    tenant: str | None,
) -> None:
    few, many = ledger_scans(12, tenant), ledger_scans(120, tenant)
    assert few == many, f"{few} scans over 12 months, {many} over 120: a scan per month"


def test_license_months_agree_with_month_by_month() -> None:
    view = ledger(14)
    rows = view.rows()
    infos = license_months(view, argparse.Namespace(month=None, tenant=None), NOW, None, rows)
    for info in infos:
        one = license_months(view, argparse.Namespace(month=info.month, tenant=None), NOW, None, [])
        assert one == [info]
        assert info.license is not None
        assert info.license.used_points == view.points(info.month)
        assert set(info.ratecards) == {c[0][1] for _, _, _, c in view.workloads(info.month)}
        assert set(info.ratecards) == {"2025-01", "2026-01"}  # the tails' card too


@pytest.mark.parametrize("fmt", ["table", "json", "csv"])
def test_rendering_reads_the_rows_a_fixed_number_of_times(fmt: str) -> None:
    def scans(n: int) -> int:
        usage, _, lic, _ = topics(n, tenants=2)
        from meter.stream.usage import usage_rows

        report = UsageReport(usage=CountedList(usage_rows(usage)))
        lrows = CountedList(license_rows(lic))
        ms = sorted({r.month for r in lrows})
        infos = record_month_infos(usage, lic, lic, ms, generated_at=NOW)
        CountedList.scans = 0
        render(report, fmt)
        license_table(lrows, infos)
        license_section(lrows, infos)
        render_license_csv(lrows, infos, load_ratecards(None))
        return CountedList.scans

    assert scans(12) == scans(120)
