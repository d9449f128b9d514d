"""The report over a long history, measured: is it linear in the months it reads?

Issue 19: ``meter report`` (no ``--month``) over 2,000 months took 17.8 s, over 4,000
months 88 s, over 20,400 months it did not finish.  This builds ``--months`` months of
records (``--tenants`` tenants a month, one workload type) in memory and times the pure
part of the report, no broker:

- ``report``: ``meter report --format FORMAT`` with the topic readers replaced by the
  records built here (usage, usage corrections, license, license corrections);
- ``rate``: the license part of ``meter rate`` (:class:`~meter.domain.license.LicenseLedger`
  with one workload per tenant-month, then what each month's report is
  (:func:`~meter.cli.rate.license_months`) and the table).

Run from the repository (a few seconds per size; quadratic code takes minutes)::

    python -m bench.bench_report --months 2000 --months 4000 --months 20000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from unittest import mock

from meter.cli import main
from meter.cli.rate import license_months
from meter.domain.license import LicenseLedger, next_month
from meter.report.license import license_table

CARD = "2026-01"


def months(n: int, first: str = "0101-01") -> Iterator[str]:
    m: str | None = first
    for _ in range(n):
        assert m is not None
        yield m
        m = next_month(m)


def topics(n: int, tenants: int) -> tuple[dict[str, dict[str, Any]], ...]:
    """Usage, usage corrections, license and license corrections of ``n`` months."""
    usage: dict[str, dict[str, Any]] = {}
    lic: dict[str, dict[str, Any]] = {}
    corr: dict[str, dict[str, Any]] = {}
    lcorr: dict[str, dict[str, Any]] = {}
    ms = list(months(n))
    for m in ms:
        for t in range(tenants):
            tenant = f"t{t}"
            usage[f"{tenant}/{m}"] = {
                "tenant_id": tenant,
                "month": m,
                "revision": 3,
                "final": True,
                "closed_at": f"{m}-01T00:00:00Z",
                "ratecards": [CARD],
                "usage": {"vm": {"workloads": 3, "points": 30, "rental_workloads": 0}},
            }
            lic[f"{tenant}/{m}"] = {
                "view": "license",
                "tenant_id": tenant,
                "month": m,
                "status": "final",
                "history_start": ms[0],
                "revision": 3,
                "usage": {
                    "vm": {"workloads": 3, "new_workloads": 1, "rental_workloads": 0,
                           "points": 20, "new_points": 10}
                },
            }  # fmt: skip
    # A correction in every 100th month, of both views.
    for m in ms[::100]:
        corr[f"t0/{m}/vm/late"] = {"tenant_id": "t0", "month": m, "workload_type": "vm",
                                   "workload_id": "late", "workloads_added": 1,
                                   "points_added": 10}  # fmt: skip
        lcorr[f"t0/{m}/vm/late"] = {"tenant_id": "t0", "month": m, "workload_type": "vm",
                                    "workload_id": "late", "workloads_added": 1,
                                    "new_added": 0, "rental_added": 0, "points_added": 10,
                                    "new_points_added": 0}  # fmt: skip
    return usage, corr, lic, lcorr


def time_report(n: int, tenants: int, fmt: str) -> tuple[float, int]:
    usage, corr, lic, lcorr = topics(n, tenants)

    def reader(value: dict[str, dict[str, Any]]) -> Any:
        async def read(*_: object) -> dict[str, dict[str, Any]]:
            await asyncio.sleep(0)
            return value

        return read

    out = io.StringIO()
    with (
        mock.patch("meter.cli.stream.read_usage", reader(usage)),
        mock.patch("meter.cli.stream.read_corrections", reader(corr)),
        mock.patch("meter.cli.stream.read_license", reader(lic)),
        mock.patch("meter.cli.stream.read_license_corrections", reader(lcorr)),
        contextlib.redirect_stdout(out),
    ):
        started = time.perf_counter()
        rc = main(["--log-level", "ERROR", "report", "--format", fmt])
        took = time.perf_counter() - started
    assert rc == 0, rc
    return took, len(out.getvalue())


def time_rate(n: int, tenants: int) -> tuple[float, int]:
    ms = list(months(n))
    view = LicenseLedger(history_start=ms[0])
    for m in ms:
        for t in range(tenants):
            view.add(f"t{t}", m, "vm", f"w{t}", (10, CARD, "vm"))
    now = datetime.now(UTC)
    started = time.perf_counter()
    rows = view.rows()
    infos = license_months(view, argparse.Namespace(month=None, tenant=None), now, None, rows)
    text = license_table(rows, infos)
    return time.perf_counter() - started, len(text)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--months", type=int, action="append", help="months of history (repeat)")
    p.add_argument("--tenants", type=int, default=2, help="tenants a month [2]")
    p.add_argument("--format", default="table", help="meter report --format [table]")
    p.add_argument(
        "--what", choices=("report", "rate", "both"), default="both", help="what to time [both]"
    )
    args = p.parse_args()
    for n in args.months or [2000, 4000, 20000]:
        if args.what in ("report", "both"):
            took, size = time_report(n, args.tenants, args.format)
            print(f"meter report --format {args.format}: {n:6d} months  {took:8.2f} s  "
                  f"({size} bytes)", flush=True)  # fmt: skip
        if args.what in ("rate", "both"):
            took, size = time_rate(n, args.tenants)
            print(f"meter rate (license view):  {n:6d} months  {took:8.2f} s  ({size} bytes)",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    cli()
