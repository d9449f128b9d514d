"""The streaming meter against a real broker: exact under redelivery, crashes, rebalances."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from jsonschema import Draft202012Validator, FormatChecker

from meter.kafka import KafkaSettings
from meter.sim.fleet import generate
from meter.stream.records import headers_dict
from tests.integration.harness import (
    Names,
    WorkerProcess,
    current_usage,
    expected_usage,
    read_all,
    revision_faults,
    send,
    wait_for_usage,
)

pytestmark = [pytest.mark.integration, pytest.mark.brokers("tansu", "kafka")]

TRICKY = Path(__file__).resolve().parents[1] / "cli" / "tricky.jsonl"
USAGE_SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "usage-record.v1.schema.json"


def shuffled_with_duplicates(lines: list[bytes], seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    out = lines + rnd.sample(lines, len(lines) // 5)
    rnd.shuffle(out)
    return out


def test_streaming_totals_equal_meter_rate(kafka_settings: KafkaSettings, unique: str) -> None:
    names = Names(unique)
    lines = list(generate(4000, seed=3, tenants=30, workloads=20))
    lines += [ln for ln in TRICKY.read_bytes().splitlines() if ln.strip()]
    stream = shuffled_with_duplicates(lines, seed=4)
    expected = expected_usage(lines)
    worker = WorkerProcess(kafka_settings.bootstrap, names, "a")
    try:
        send(kafka_settings, names.jobs, stream)
        wait_for_usage(kafka_settings, names.usage, expected, workers=[worker])
        # The user's command shows the same rows as `meter rate`.
        out = subprocess.run(
            [sys.executable, "-m", "meter", "report", "--broker", kafka_settings.bootstrap,
             "--topic", names.usage, "--format", "json"],
            capture_output=True, check=True, timeout=60,
        )  # fmt: skip
        rows = orjson.loads(out.stdout)["usage"]
        assert [(r["month"], r["tenant_id"], r["workload_type"], r["workloads"], r["points"])
                for r in rows] == [
            (u.month, u.tenant_id, u.workload_type, u.workloads, u.points) for u in expected
        ]  # fmt: skip
        # Every record on the usage topic follows the documented schema and adds up.
        validator = Draft202012Validator(
            orjson.loads(USAGE_SCHEMA.read_bytes()), format_checker=FormatChecker()
        )
        records = read_all(kafka_settings, names.usage)
        assert revision_faults(records) == []
        for rec in records:
            doc = orjson.loads(rec.value)  # type: ignore[attr-defined]
            validator.validate(doc)
            assert rec.key == f"{doc['tenant_id']}/{doc['month']}".encode()  # type: ignore[attr-defined]
            assert doc["workloads"] == sum(u["workloads"] for u in doc["usage"].values())
            assert doc["points"] == sum(u["points"] for u in doc["usage"].values())
            assert doc["revision"] >= doc["workloads"]  # every workload adds at least 1
    finally:
        assert worker.terminate() == 0, worker.log()
    log = worker.log()
    assert "worker stopped:" in log


def test_any_key_or_none_is_forwarded_home(kafka_settings: KafkaSettings, unique: str) -> None:
    """Events keyed by something else (or nothing) still meet their tenant on one worker."""
    import asyncio

    from aiokafka import AIOKafkaProducer

    names = Names(unique)
    lines = list(generate(1500, seed=5, tenants=12, workloads=10))
    expected = expected_usage(lines)

    async def produce() -> None:
        p = AIOKafkaProducer(bootstrap_servers=kafka_settings.bootstrap)
        await p.start()
        try:
            for i, line in enumerate(lines):
                key = None if i % 2 else f"job-{i}".encode()
                await p.send(names.jobs, line, key=key)
            await p.flush()
        finally:
            await p.stop()

    worker = WorkerProcess(kafka_settings.bootstrap, names, "a")
    try:
        worker.wait_for_log("took home partitions")
        asyncio.run(produce())
        wait_for_usage(kafka_settings, names.usage, expected, workers=[worker])
    finally:
        assert worker.terminate() == 0, worker.log()
    assert " forwarded" in worker.log()


def test_bad_input_lands_in_the_dead_letter_topic(
    kafka_settings: KafkaSettings, unique: str
) -> None:
    names = Names(unique)
    lines = [ln for ln in TRICKY.read_bytes().splitlines() if ln.strip()]
    bad = [ln for ln in lines if not hasattr(__import__("meter.domain").domain.parse(ln), "month")]
    assert len(bad) == 15
    worker = WorkerProcess(kafka_settings.bootstrap, names, "a")
    try:
        send(kafka_settings, names.jobs, lines)
        wait_for_usage(kafka_settings, names.usage, expected_usage(lines), workers=[worker])
        deadline = time.monotonic() + 30
        dead = read_all(kafka_settings, names.rejected)
        while len(dead) < len(bad) and time.monotonic() < deadline:
            time.sleep(0.5)
            dead = read_all(kafka_settings, names.rejected)
        assert sorted(r.value for r in dead) == sorted(bad)  # type: ignore[attr-defined]
        for rec in dead:
            h = headers_dict(rec.headers)  # type: ignore[attr-defined]
            assert h["meter.reason"]
            assert h["meter.code"] in {
                "invalid_json", "not_an_object", "missing_field", "wrong_type",
                "invalid_value", "invalid_time", "no_ratecard",
            }  # fmt: skip
            assert h["meter.source.topic"] == names.jobs
            assert int(h["meter.source.offset"]) >= 0
            assert int(h["meter.source.partition"]) in range(4)
        # The meter kept going: a good event after the bad ones is still counted.
        more = [*lines, *generate(50, seed=9, tenants=3, workloads=5)]
        send(kafka_settings, names.jobs, list(generate(50, seed=9, tenants=3, workloads=5)))
        wait_for_usage(kafka_settings, names.usage, expected_usage(more), workers=[worker])
    finally:
        assert worker.terminate() == 0, worker.log()


def test_sigkill_mid_stream_then_restart_is_exact(
    kafka_settings: KafkaSettings, unique: str
) -> None:
    names = Names(unique)
    lines = list(generate(30_000, seed=11, tenants=60, workloads=30))
    expected = expected_usage(lines)
    assert expected_usage(lines[:15_000]) != expected  # the second half changes the totals
    first = WorkerProcess(kafka_settings.bootstrap, names, "first")
    try:
        first.wait_for_log("took home partitions")
        send(kafka_settings, names.jobs, lines[:15_000])
        deadline = time.monotonic() + 60
        while not current_usage(kafka_settings, names.usage):
            assert time.monotonic() < deadline, first.log()
            time.sleep(0.05)
        # Frozen as its first totals go out (batches may be in flight), so the rest of the
        # stream is certainly unread when it dies: a fast worker on an idle machine and a
        # slow one on a busy machine are killed at the same point of the stream.
        first.pause()
        send(kafka_settings, names.jobs, lines[15_000:])
        first.kill()  # mid-stream, no goodbye
    finally:
        first.close()
    assert current_usage(kafka_settings, names.usage) != expected
    second = WorkerProcess(kafka_settings.bootstrap, names, "second")
    try:
        wait_for_usage(kafka_settings, names.usage, expected, workers=[second])
        assert "recovered" in second.log()
    finally:
        assert second.terminate() == 0, second.log()


def test_two_workers_one_leaving_mid_stream(kafka_settings: KafkaSettings, unique: str) -> None:
    names = Names(unique)
    lines = list(generate(20_000, seed=21, tenants=80, workloads=20))
    expected = expected_usage(lines)
    a = WorkerProcess(kafka_settings.bootstrap, names, "a")
    b = WorkerProcess(kafka_settings.bootstrap, names, "b")
    try:
        a.wait_for_log("took home partitions")
        b.wait_for_log("took home partitions")
        send(kafka_settings, names.jobs, lines[:10_000])
        time.sleep(0.5)
        assert b.terminate() == 0, b.log()  # leaves the group mid-stream
        send(kafka_settings, names.jobs, lines[10_000:])
        wait_for_usage(kafka_settings, names.usage, expected, workers=[a])
        assert "worker stopped:" in b.log()
        # The survivor took over the partitions the leaver had.
        assert a.log().count("took home partitions") >= 2, a.log()
    finally:
        a.terminate()
        b.close()
