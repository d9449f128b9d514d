"""The license view on the embedded broker: two consecutive months closed, the submitted
report (``meter report --format vspc-csv``), the new-workload counts and the license gauges,
all against ``meter rate`` over the same events; then a late event that turns a new
workload into an existing one becomes a correction."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import orjson
import pytest

from meter.domain import Rater, load_ratecards
from meter.kafka import KafkaSettings
from meter.sim.fleet import generate
from tests.domain.events import line
from tests.integration.harness import Names, WorkerProcess, send
from tests.integration.test_month_close import meter, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.brokers("tansu", "kafka")]

LICENSED = 400


def october_and_november() -> list[bytes]:
    """A fleet over October and November, with the edges the rules care about."""
    october = list(generate(1500, seed=91, month="2026-10", tenants=12, workloads=10))
    # November: the same fleet (existing workloads) and more tenants (new workloads).
    november = list(generate(1500, seed=91, month="2026-11", tenants=16, workloads=10))
    edges = [
        # Seen only on 31 October: November (30 days) reaches back to it: counted in
        # November, and not new there.
        line(tenant="edge-co", workload="vm-oct31", time="2026-10-31T12:00:00Z", id="e1"),
        # Seen on 30 October only: not in November's window.
        line(tenant="edge-co", workload="vm-oct30", time="2026-10-30T12:00:00Z", id="e2"),
        # New in November, a replica of a rental tenant: charged (replicas always are),
        # but free in November because it is new.
        line(tenant="edge-co", workload="rep-nov", wtype="replica", license="rental",
             time="2026-11-05T12:00:00Z", id="e3"),
        # Both months: existing in November.
        line(tenant="edge-co", workload="vm-both", time="2026-10-05T12:00:00Z", id="e4"),
        line(tenant="edge-co", workload="vm-both", time="2026-11-05T12:00:00Z", id="e5"),
    ]  # fmt: skip
    return [*october, *november, *edges]


def rate_view(lines: list[bytes]) -> Rater:
    rater = Rater(load_ratecards())
    for raw in lines:
        rater.feed(raw)
    return rater


def vspc(bootstrap: str, names: Names, *extra: str) -> list[dict[str, str]]:
    out = meter(
        "report", "--broker", bootstrap, "--topic", names.usage,
        "--license-topic", names.license, "--format", "vspc-csv", *extra,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr.decode()
    return list(csv.DictReader(io.StringIO(out.stdout.decode())))


def key_rows(rows: list[dict[str, str]], month: str) -> list[tuple[str, ...]]:
    """What the vendor is billed on, without the columns that say when it was made."""
    return sorted(
        (r["tenant_id"], r["workload"], r["count"], r["new_count"], r["rental_count"],
         r["billable_count"], r["points"], r["new_points"])
        for r in rows if r["month"] == month
    )  # fmt: skip


def rate_rows(lines: list[bytes], month: str, tmp: Path, clock: str) -> list[dict[str, str]]:
    path = tmp / f"events-{len(lines)}.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    (tmp / "rate-clock").write_text(clock)
    # --clock-skew off: the clock says which months are final; the events are judged by
    # their records' timestamps (the worker's rule), all of them in the past.
    out = meter("rate", str(path), "--format", "vspc-csv", "--history-start", "2026-10",
                "--clock", str(tmp / "rate-clock"), "--clock-skew", "off")  # fmt: skip
    assert out.returncode == 0, out.stderr.decode()
    rows = list(csv.DictReader(io.StringIO(out.stdout.decode())))
    return [r for r in rows if r["month"] == month]


def test_two_months_close_by_the_vendor_rules_as_meter_rate_counts_them(
    kafka_settings: KafkaSettings, unique: str, tmp_path: Path
) -> None:
    clock = tmp_path / "clock"
    # October closes on 3 November: everything is sent while both months are open.
    clock.write_text("2026-11-02T00:00:00Z")
    license_file = tmp_path / "license.json"
    license_file.write_bytes(orjson.dumps({"licensed_points": LICENSED, "expires": "2026-12-20"}))
    names = Names(unique)
    names.extra = [
        "--clock", str(clock), "--history-start", "2026-10", "--license", str(license_file),
    ]  # fmt: skip
    bootstrap = kafka_settings.bootstrap
    lines = october_and_november()
    rater = rate_view(lines)
    view = rater.license_view("2026-10")
    nov_rows = [r for r in view.rows() if r.month == "2026-11"]
    new_in_nov = sum(r.new for r in nov_rows)
    assert new_in_nov > 0 and sum(r.new for r in view.rows() if r.month == "2026-10") == 0
    edge = {(r.workload_type, r.workloads, r.new) for r in nov_rows if r.tenant_id == "edge-co"}
    assert edge == {("vm", 2, 0), ("replica", 1, 1)}  # vm-oct31 and vm-both; rep-nov new

    a = WorkerProcess(bootstrap, names, "a")
    b = WorkerProcess(bootstrap, names, "b")
    try:
        a.wait_for_log("took home partitions")
        b.wait_for_log("took home partitions")
        send(kafka_settings, names.jobs, lines)

        # Running: November's license report while the month is open.
        def running() -> list[dict[str, str]] | None:
            rows = vspc(bootstrap, names, "--month", "2026-11")
            want = rate_rows(lines, "2026-11", tmp_path, "2026-11-02T00:00:00Z")
            return rows if key_rows(rows, "2026-11") == key_rows(want, "2026-11") else None

        rows = wait_until(running, "November's running license report to match meter rate")
        assert {r["status"] for r in rows} == {"running"}
        assert {(r["period_start"], r["period_end"]) for r in rows} == {
            ("2026-10-31T00:00:00Z", "2026-12-01T00:00:00Z")
        }

        # The license gauges (both workers' shares summed) against meter rate.
        def gauge(name: str, month: str) -> float:
            return sum(w.metric(f'meter_license_{name}{{month="{month}"}}') or 0.0 for w in (a, b))

        wait_until(
            lambda: gauge("used_points", "2026-11") == view.points("2026-11"),
            "the used-points gauges to add up to meter rate's",
        )
        assert gauge("new_points", "2026-11") == view.new_points("2026-11") > 0
        assert gauge("new_workloads", "2026-11") == new_in_nov
        assert a.metric("meter_license_licensed_points") == LICENSED
        assert a.metric("meter_license_expiry_days") == 48  # 2026-11-02 to 2026-12-20

        # The clock passes 3 December: October and November both close.
        clock.write_text("2026-12-03T00:00:01Z")
        for month in ("2026-10", "2026-11"):
            want = rate_rows(lines, month, tmp_path, "2026-12-03T00:00:01Z")
            got = wait_until(
                lambda m=month: (
                    (r := vspc(bootstrap, names, "--month", m))
                    and {x["status"] for x in r} == {"final"}
                    and r
                ),
                f"{month}'s final license report",
            )
            assert key_rows(got, month) == key_rows(want, month)
            total = next(r for r in got if r["workload"] == "TOTAL")
            assert int(total["new_count"]) == (new_in_nov if month == "2026-11" else 0)
            # Filtered to one tenant: its own rows, and sums labelled with it, not "*".
            tenant = sorted({r["tenant_id"] for r in got} - {"*"})[0]
            mine = vspc(bootstrap, names, "--month", month, "--tenant", tenant)
            assert {r["tenant_id"] for r in mine} == {tenant}
            theirs = [r for r in key_rows(got, month) if r[0] == tenant]
            assert {r for r in key_rows(mine, month) if r[1] != "TOTAL"} == set(theirs)
            (mine_total,) = [r for r in mine if r["workload"] == "TOTAL"]
            assert int(mine_total["points"]) == sum(int(r[6]) for r in theirs)
        # December's allowance: licensed + max(20, 20%) + November's new points.
        wait_until(
            lambda: gauge("previous_new_points", "2026-12") == view.new_points("2026-11"),
            "December's previous-new-points gauge",
        )
        assert a.metric("meter_license_expiry_days") == 17

        # A late October session of a workload that was new in November: it is no
        # longer new; November's final report stays, a correction says the difference.
        new_one = next(
            (t, w, i) for t, w, i, (_, new) in view.workloads("2026-11") if new and w == "vm"
        )
        late = line(tenant=new_one[0], workload=new_one[2], wtype=new_one[1],
                    time="2026-10-15T09:00:00Z", id="late-oct")  # fmt: skip
        send(kafka_settings, names.jobs, [late])
        everything = [*lines, late]
        corrected = rate_rows(everything, "2026-11", tmp_path, "2026-12-03T00:00:01Z")

        def folded() -> list[dict[str, str]] | None:
            rows = vspc(bootstrap, names)
            nov = [r for r in rows if r["month"] == "2026-11"]
            ok = key_rows(nov, "2026-11") == key_rows(corrected, "2026-11")
            return nov if ok else None

        nov_now = wait_until(folded, "November with the correction folded in")
        assert {r["status"] for r in nov_now} == {"final+corrections"}
        as_closed = vspc(bootstrap, names, "--month", "2026-11")
        assert {r["status"] for r in as_closed} == {"final"}
        assert key_rows(as_closed, "2026-11") == key_rows(
            rate_rows(lines, "2026-11", tmp_path, "2026-12-03T00:00:01Z"), "2026-11"
        )
        with_fix = vspc(bootstrap, names, "--month", "2026-11", "--with-corrections")
        assert key_rows(with_fix, "2026-11") == key_rows(corrected, "2026-11")
        assert {r["status"] for r in with_fix} == {"final+corrections"}
    finally:
        for w in (a, b):
            w.terminate()
            w.close()
