"""No host clock decides a month alone (issue 19, item 3): a worker whose clock runs months
ahead, in one group with a worker whose clock is right, finalises nothing until its clock
is fixed; then the month that is due closes everywhere, and the running month stays open.

On the embedded broker (no LogAppendTime: it keeps the producer's timestamps) each worker
checks its clock against the other's heartbeats; on Apache Kafka against the broker's time.
The same test runs on both, on any date: the months are the real current one and the one
before."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.partitioner import murmur2

from meter.domain.license import previous_month
from meter.kafka import KafkaSettings
from meter.sim.fleet import generate
from meter.stream.closing import iso
from tests.domain.events import line
from tests.integration.harness import (
    Names,
    WorkerProcess,
    expected_usage,
    read_all,
    send,
    wait_for_usage,
)
from tests.integration.test_month_close import finals, reports, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.brokers("tansu", "kafka")]

PARTITIONS = 4


def license_statuses(settings: KafkaSettings, topic: str) -> dict[str, str]:
    """``tenant/month`` -> the status of its latest record on the license topic."""
    out: dict[str, str] = {}
    for rec in read_all(settings, topic):
        doc: dict[str, Any] = orjson.loads(rec.value)  # type: ignore[attr-defined]
        out[f"{doc['tenant_id']}/{doc['month']}"] = doc["status"]
    return out


def home(tenant: str) -> int:
    return (murmur2(tenant.encode()) & 0x7FFFFFFF) % PARTITIONS


def set_clock(path: Path, at: datetime) -> None:
    part = path.with_name(path.name + ".part")  # atomic: the worker reads it every second
    part.write_text(iso(at))
    part.replace(path)


def test_a_worker_months_ahead_finalises_nothing_until_its_clock_is_fixed(
    kafka_settings: KafkaSettings, unique: str, tmp_path: Path
) -> None:
    real = datetime.now(UTC)
    this_month = f"{real.year:04d}-{real.month:02d}"
    last_month = previous_month(this_month)
    assert last_month is not None
    # The right clock starts in the middle of last month (nothing due yet); the skewed one
    # is five months ahead of the real time: by it, both months are due (grace 0).
    right, skewed = tmp_path / "right-clock", tmp_path / "skewed-clock"
    set_clock(right, datetime.fromisoformat(f"{last_month}-15T12:00:00+00:00"))
    set_clock(skewed, real + timedelta(days=150))
    names = Names(unique)
    names.extra = [
        "--partitions", str(PARTITIONS), "--close-grace", "0", "--clock-tolerance", "5m",
        "--history-start", last_month,
    ]  # fmt: skip
    lines = [
        *generate(600, seed=19, month=last_month, tenants=12, workloads=6, bad_share=0),
        *(
            line(tenant=f"now-{i}", workload=f"vm-{i}", time=iso(real.replace(day=1, hour=0,
                 minute=0, second=0, microsecond=0)), id=f"now-{i}")
            for i in range(8)
        ),
    ]  # fmt: skip
    expected = expected_usage(lines)
    last_points = sum(r.points for r in expected if r.month == last_month)
    assert last_points > 0 and any(r.month == this_month for r in expected)

    a = WorkerProcess(kafka_settings.bootstrap, names, "right", extra=["--clock", str(right)])
    b = WorkerProcess(kafka_settings.bootstrap, names, "skewed", extra=["--clock", str(skewed)])
    try:
        a.wait_for_log("took home partitions")
        b.wait_for_log("took home partitions")
        send(kafka_settings, names.jobs, lines)
        wait_for_usage(kafka_settings, names.usage, expected, workers=[a, b])

        # The skewed worker: both months due by its clock, neither closed; it says why.
        b.wait_for_log(f"not closing {this_month} on home partition")
        assert "month close held: this host's clock is 1" in b.log()  # 150+ days ahead
        assert "d 1" in b.log() or "h ahead of " in b.log()
        skew = b.metric("meter_clock_skew_seconds")
        assert skew is not None and skew > 149 * 86400, skew
        assert b.metric("meter_month_close_held") == 1
        assert (b.metric("meter_month_closes_refused_total") or 0) >= 2
        status, body = b.health()
        assert status == 200 and body["ready"] is True  # usage still counts
        assert str(body["month_close"]).startswith("month close held"), body
        # The right worker is behind the skewed one, which never holds it.
        assert a.metric("meter_month_close_held") == 0
        time.sleep(5)  # room to misbehave
        assert not finals(kafka_settings, names.usage, this_month)
        assert not finals(kafka_settings, names.usage, last_month)
        # (Some of the generated sessions fall in the month before last in UTC: due by the
        # right clock too, and closed by the right worker; not this test's concern.)
        statuses = license_statuses(kafka_settings, names.license)
        assert all(s == "running" for k, s in statuses.items() if k.endswith((this_month,
                   last_month)))  # fmt: skip

        # The right clock reaches now: last month closes on the right worker's partitions
        # only; the skewed worker still holds, so there is no provider summary.
        set_clock(right, datetime.now(UTC))
        a.wait_for_log(f"closed {last_month} on home partition")
        summaries = wait_until(
            lambda: [
                r for k, r in reports(kafka_settings, names.reports).items()
                if k.startswith(f"partition/{last_month}/")
            ] if a.log().count(f"closed {last_month} on home partition") >= 2 else None,
            "the right worker's partition summaries",
        )  # fmt: skip
        held_by_right = {r["partition"] for r in summaries}
        assert len(held_by_right) == PARTITIONS // 2, summaries
        closed = finals(kafka_settings, names.usage, last_month)
        assert closed and all(home(r["tenant_id"]) in held_by_right for r in closed.values())
        assert f"provider/{last_month}" not in reports(kafka_settings, names.reports)
        assert f"closed {last_month}" not in b.log()
        assert not finals(kafka_settings, names.usage, this_month)

        # The skewed worker's clock is fixed: it closes last month, this month stays open.
        set_clock(skewed, datetime.now(UTC))
        provider = wait_until(
            lambda: reports(kafka_settings, names.reports).get(f"provider/{last_month}"),
            "the provider summary once the skewed clock is fixed",
        )
        assert provider["points"] == last_points
        assert b.metric("meter_month_close_held") == 0
        skew = b.metric("meter_clock_skew_seconds")
        assert skew is not None and abs(skew) < 300, skew
        assert sum(r["points"] for r in finals(kafka_settings, names.usage, last_month).values()
                   ) == last_points  # fmt: skip
        assert not finals(kafka_settings, names.usage, this_month)
        statuses = license_statuses(kafka_settings, names.license)
        assert all(s == "running" for k, s in statuses.items() if k.endswith(this_month))
        assert any(s == "final" for k, s in statuses.items() if k.endswith(last_month))
    finally:
        for w in (a, b):
            w.terminate()
