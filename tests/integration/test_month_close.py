"""Month close with a controllable clock: finals never move, corrections add up, audit agrees."""

from __future__ import annotations

import asyncio
import csv
import io
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from jsonschema import Draft202012Validator, FormatChecker

from meter.domain import Rater, load_ratecards
from meter.kafka import KafkaSettings
from meter.kafka.topics import read_to_end
from meter.sim.fleet import generate
from meter.stream.usage import read_usage
from tests.domain.events import line
from tests.integration.harness import (
    Names,
    WorkerProcess,
    audit_args,
    audit_clean,
    expected_usage,
    read_all,
    send,
    wait_for_usage,
)

pytestmark = [pytest.mark.integration, pytest.mark.brokers("tansu", "kafka")]


def finals(settings: KafkaSettings, topic: str, month: str) -> dict[str, dict[str, Any]]:
    records = asyncio.run(read_usage(settings, topic))
    return {
        k: {key: v for key, v in r.items() if key != "updated_at"}
        for k, r in records.items()
        if r.get("month") == month and r.get("final")
    }


def reports(settings: KafkaSettings, topic: str) -> dict[str, Any]:
    latest: dict[str, Any] = {}
    try:
        for rec in read_all(settings, topic):
            latest[rec.key.decode()] = orjson.loads(rec.value)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not created yet
        return {}
    return latest


def wait_until(check: Any, what: str, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def meter(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "meter", *args], capture_output=True, timeout=120, check=False
    )


def test_close_late_events_restart_two_workers_and_audit(
    kafka_settings: KafkaSettings, unique: str, tmp_path: Path
) -> None:
    clock = tmp_path / "clock"
    clock.write_text("2026-10-20T00:00:00Z")
    names = Names(unique)
    # The license view's first month of history, fixed: the generator's zone offsets put
    # some October sessions on 30 September in UTC.
    names.extra = ["--clock", str(clock), "--history-start", "2026-09"]
    bootstrap = kafka_settings.bootstrap
    on_time = [
        *generate(3000, seed=61, month="2026-10", tenants=16, workloads=12),
        line(tenant="upgrade-co", workload="vm-up", license="rental",
             time="2026-10-10T10:00:00Z", id="on-time-rental"),
    ]  # fmt: skip
    late = [
        *generate(400, seed=62, month="2026-10", tenants=20, workloads=14),
        # the same workload, now charged higher: rental -> subscription
        line(tenant="upgrade-co", workload="vm-up", license="subscription",
             time="2026-10-15T10:00:00Z", id="late-upgrade"),
    ]  # fmt: skip
    a = WorkerProcess(bootstrap, names, "a")
    b = WorkerProcess(bootstrap, names, "b")
    try:
        a.wait_for_log("took home partitions")
        b.wait_for_log("took home partitions")
        send(kafka_settings, names.jobs, on_time)
        wait_for_usage(kafka_settings, names.usage, expected_usage(on_time), workers=[a, b])
        assert not finals(kafka_settings, names.usage, "2026-10")

        # The clock passes the 3rd of November: October closes on both workers.
        clock.write_text("2026-11-03T00:00:01Z")
        provider = wait_until(
            lambda: reports(kafka_settings, names.reports).get("provider/2026-10"),
            "the provider summary",
        )
        closed = finals(kafka_settings, names.usage, "2026-10")
        october = [r for r in expected_usage(on_time) if r.month == "2026-10"]
        assert sum(r["points"] for r in closed.values()) == sum(r.points for r in october)
        assert provider["points"] == sum(r.points for r in october)
        assert provider["workloads"] == sum(r.workloads for r in october)
        assert provider["tenants"] == len({r.tenant_id for r in october})
        assert all(r["closed_at"] == "2026-11-03T00:00:00Z" for r in closed.values())

        # Restart around the close: SIGKILL one worker, start it again.
        b.kill()
        b.close()
        b = WorkerProcess(bootstrap, names, "b2")
        b.wait_for_log("took home partitions", timeout=60)
        time.sleep(2)
        assert finals(kafka_settings, names.usage, "2026-10") == closed
        assert reports(kafka_settings, names.reports)["provider/2026-10"] == provider

        # Late events: the final records never move; corrections make up the difference.
        send(kafka_settings, names.jobs, late)
        everything = on_time + late
        wait_for_usage(kafka_settings, names.usage, expected_usage(everything), workers=[a, b])
        assert finals(kafka_settings, names.usage, "2026-10") == closed
        corrections = [
            orjson.loads(r.value)  # type: ignore[attr-defined]
            for r in read_all(kafka_settings, f"{names.usage}.corrections")
        ]
        assert corrections
        assert all(c["reason"] == "late" and c["event_id"] for c in corrections)
        # What the close published follows the documented schemas.
        schemas = Path(__file__).resolve().parents[2] / "schemas"
        for name, docs in [
            ("usage-correction.v1.schema.json", corrections),
            ("report.v1.schema.json", list(reports(kafka_settings, names.reports).values())),
            ("usage-record.v1.schema.json", list(closed.values())),
        ]:
            validator = Draft202012Validator(
                orjson.loads((schemas / name).read_bytes()), format_checker=FormatChecker()
            )
            for doc in docs:
                validator.validate({**doc, "updated_at": "2026-11-03T00:00:00Z"}
                                   if name.startswith("usage-record") else doc)  # fmt: skip
        assert any(c["event_id"] == "late-upgrade" and c["workloads_added"] == 0
                   and c["points_added"] == 5 for c in corrections)  # fmt: skip

        # The user's view: the final report, then with its corrections.
        out = meter("report", "--broker", bootstrap, "--topic", names.usage,
                    "--month", "2026-10", "--format", "json", "--with-corrections")  # fmt: skip
        assert out.returncode == 0, out.stderr
        doc = orjson.loads(out.stdout)
        assert doc["final"] is True
        assert sum(r["points"] for r in doc["usage"]) == sum(r.points for r in october)
        want = [r for r in expected_usage(everything) if r.month == "2026-10"]
        assert [(r["tenant_id"], r["workload_type"], r["workloads"], r["points"])
                for r in doc["corrected_usage"]] == [
            (r.tenant_id, r.workload_type, r.workloads, r.points) for r in want
        ]  # fmt: skip
        # Without --with-corrections: the final totals, and a line that corrections exist.
        out = meter("report", "--broker", bootstrap, "--topic", names.usage,
                    "--month", "2026-10")  # fmt: skip
        assert out.returncode == 0, out.stderr
        text = out.stdout.decode()
        assert text.startswith("TENANT USAGE (calendar month)\nFINAL report for 2026-10"), text
        assert (
            f"{len({(c['tenant_id'], c['workload_type'], c['workload_id']) for c in corrections})}"
            " correction(s) since the "
            f"close (late events): {sum(r.points for r in want)} points with them; see them "
            "with meter report --month 2026-10 --with-corrections"
        ) in text
        vspc = meter("report", "--broker", bootstrap, "--topic", names.usage,
                     "--license-topic", names.license,
                     "--month", "2026-10", "--format", "vspc-csv")  # fmt: skip
        assert vspc.returncode == 0, vspc.stderr
        [total] = [r for r in csv.DictReader(io.StringIO(vspc.stdout.decode()))
                   if r["workload"] == "TOTAL"]  # fmt: skip
        assert (total["month"], total["tenant_id"], total["status"]) == ("2026-10", "*", "final")
        # As closed: the license view of what had arrived by the close, as meter rate sees it.
        rater = Rater(load_ratecards())
        for raw in on_time:
            rater.feed(raw)
        closed_view = [r for r in rater.license_view("2026-09").rows() if r.month == "2026-10"]
        assert int(total["new_count"]) == sum(r.new for r in closed_view) > 0
        assert int(total["count"]) == sum(r.workloads for r in closed_view)
        assert int(total["points"]) == sum(r.points for r in closed_view)

        # The audit recomputes October from the raw topic, in both views: no difference.
        audit = meter("audit", "--broker", bootstrap, "--month", "2026-10", *audit_args(names))
        assert audit.returncode == 0, audit.stdout.decode() + audit.stderr.decode()
        assert audit_clean(audit.stdout, names), audit.stdout.decode()
        assert b"license view with history start 2026-09" in audit.stdout

        # Corrupt one usage record by hand: the audit finds it.
        victim = next(iter(closed.values()))
        forged = {**victim, "revision": victim["revision"] + 1000, "points": 0,
                  "usage": {w: {**u, "points": u["points"] + 7}
                            for w, u in victim["usage"].items()}}  # fmt: skip

        async def corrupt() -> None:
            p = AIOKafkaProducer(bootstrap_servers=bootstrap)
            await p.start()
            try:
                key = f"{victim['tenant_id']}/2026-10".encode()
                await p.send_and_wait(names.usage, orjson.dumps(forged), key=key)
            finally:
                await p.stop()

        asyncio.run(corrupt())
        audit = meter("audit", "--broker", bootstrap, "--month", "2026-10", *audit_args(names))
        assert audit.returncode == 1
        assert f"DIFFERENCE 2026-10 {victim['tenant_id']} ".encode() in audit.stdout
        assert b"DIFFERENCE license" not in audit.stdout

        # Forge one license record (points a tenant never used) and lose another (a record of
        # zeros for a tenant-month with usage, newer than the final one): the audit finds both.
        lic = asyncio.run(read_to_end(kafka_settings, names.license))
        finals_lic = {r.key: orjson.loads(r.value) for r in lic
                      if orjson.loads(r.value).get("month") == "2026-10"}  # fmt: skip
        (k1, forged_lic), (k2, lost) = sorted(finals_lic.items())[:2]
        forged_lic = {**forged_lic, "revision": forged_lic["revision"] + 1000,
                      "usage": {w: {**u, "points": u["points"] + 5}
                                for w, u in forged_lic["usage"].items()}}  # fmt: skip
        lost = {**lost, "revision": lost["revision"] + 1000,
                "usage": {w: dict.fromkeys(u, 0) for w, u in lost["usage"].items()}}  # fmt: skip

        async def corrupt_license() -> None:
            p = AIOKafkaProducer(bootstrap_servers=bootstrap)
            await p.start()
            try:
                await p.send_and_wait(names.license, orjson.dumps(forged_lic), key=k1)
                await p.send_and_wait(names.license, orjson.dumps(lost), key=k2)
            finally:
                await p.stop()

        asyncio.run(corrupt_license())
        audit = meter("audit", "--broker", bootstrap, "--month", "2026-10", *audit_args(names))
        assert audit.returncode == 1
        out = audit.stdout.decode()
        for record in (forged_lic, lost):
            assert f"DIFFERENCE license 2026-10 {record['tenant_id']} " in out, out
        changed = len(forged_lic["usage"]) + len(lost["usage"])  # every type of both
        assert out.count("DIFFERENCE license ") == changed, out
        assert f"{changed} difference(s) between the raw events and {names.license}" in out
    finally:
        for w in (a, b):
            w.terminate()
            w.close()


def test_a_worker_restarted_before_the_close_closes_with_nothing_new_to_read(
    kafka_settings: KafkaSettings, unique: str, tmp_path: Path
) -> None:
    clock = tmp_path / "clock"
    clock.write_text("2026-10-20T00:00:00Z")
    names = Names(unique)
    names.extra = ["--clock", str(clock)]
    lines = list(generate(1500, seed=71, month="2026-10", tenants=10, workloads=10))
    first = WorkerProcess(kafka_settings.bootstrap, names, "before")
    try:
        send(kafka_settings, names.jobs, lines)
        wait_for_usage(kafka_settings, names.usage, expected_usage(lines), workers=[first])
        assert first.terminate() == 0, first.log()
    finally:
        first.close()
    # Down across the close moment; back up with every offset already committed.
    clock.write_text("2026-11-05T12:00:00Z")
    second = WorkerProcess(kafka_settings.bootstrap, names, "after")
    try:
        provider = wait_until(
            lambda: reports(kafka_settings, names.reports).get("provider/2026-10"),
            "the provider summary after the restart",
        )
        october = [r for r in expected_usage(lines) if r.month == "2026-10"]
        assert provider["points"] == sum(r.points for r in october)
        closed = finals(kafka_settings, names.usage, "2026-10")
        assert sum(r["workloads"] for r in closed.values()) == sum(r.workloads for r in october)
    finally:
        second.terminate()
        second.close()


def copies(settings: KafkaSettings, topic: str) -> Counter[str]:
    """How many records each key has on ``topic`` (the embedded broker never compacts)."""
    return Counter(rec.key.decode() for rec in read_all(settings, topic))  # type: ignore[attr-defined]


def final_records(settings: KafkaSettings, topic: str) -> int:
    return sum(
        1
        for rec in read_all(settings, topic)
        if orjson.loads(rec.value).get("final")  # type: ignore[attr-defined]
    )


def test_a_restart_after_the_close_publishes_and_logs_nothing_again(
    kafka_settings: KafkaSettings, unique: str, tmp_path: Path
) -> None:
    clock = tmp_path / "clock"
    clock.write_text("2026-10-02T00:00:00Z")  # September (zones reach into it) not due yet
    names = Names(unique)
    names.extra = ["--clock", str(clock)]
    lines = list(generate(800, seed=81, month="2026-10", tenants=12, workloads=6))
    expected = expected_usage(lines)
    months = sorted({r.month for r in expected})
    first = WorkerProcess(kafka_settings.bootstrap, names, "first")
    try:
        first.wait_for_log("took home partitions")
        send(kafka_settings, names.jobs, lines)
        wait_for_usage(kafka_settings, names.usage, expected, workers=[first])
        clock.write_text("2026-11-03T00:00:01Z")
        wait_until(
            lambda: all(f"provider/{m}" in reports(kafka_settings, names.reports) for m in months),
            "the provider summaries",
        )
        time.sleep(1)
        assert first.terminate() == 0, first.log()
    finally:
        first.close()
    before = copies(kafka_settings, names.reports)
    finals = final_records(kafka_settings, names.usage)
    # Once per change: one provider summary a month, one summary per partition and month,
    # one final record per tenant-month, one line in the log.
    summaries = {k: n for k, n in before.items() if k.startswith(("provider/", "partition/"))}
    assert summaries == {
        **{f"provider/{m}": 1 for m in months},
        **{f"partition/{m}/{p}": 1 for m in months for p in range(4)},
    }
    assert finals == len({(r.tenant_id, r.month) for r in expected})
    assert first.log().count("closed on every partition") == len(months)

    second = WorkerProcess(kafka_settings.bootstrap, names, "second")
    try:
        # Recovery, and any republishing, is done before this line is logged.
        second.wait_for_log("took home partitions")
        time.sleep(2)
        assert copies(kafka_settings, names.reports) == before
        assert final_records(kafka_settings, names.usage) == finals
        assert "closed on every partition" not in second.log()
    finally:
        second.terminate()
        second.close()
