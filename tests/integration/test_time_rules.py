"""The time rules on a real broker: an event dated after its Kafka record's hour plus the
clock-skew tolerance is dead-lettered as ``future_time`` and counts nowhere; one forwarded
to its home partition keeps its record's timestamp, so it is judged there as it was at
first."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from meter.kafka import KafkaSettings
from meter.kafka.topics import read_to_end
from meter.sim.fleet import generate
from meter.stream.records import headers_dict
from tests.domain.events import line
from tests.integration.harness import Names, WorkerProcess, expected_usage, send, wait_for_usage

pytestmark = [pytest.mark.integration, pytest.mark.brokers("tansu", "kafka")]


def at(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def produce(
    settings: KafkaSettings, topic: str, partition: int, value: bytes, timestamp_ms: int
) -> None:
    producer = AIOKafkaProducer(**settings.client_kwargs())
    await producer.start()
    try:
        await producer.send_and_wait(
            topic, value, key=b"not-its-home", partition=partition, timestamp_ms=timestamp_ms
        )
    finally:
        await producer.stop()


def test_future_dated_events_are_dead_lettered_and_counted_nowhere(
    kafka_settings: KafkaSettings, unique: str
) -> None:
    names = Names(unique)
    good = list(generate(300, seed=5, tenants=4, workloads=6, bad_share=0))
    now = datetime.now(UTC)  # the records' timestamps are the producer's clock
    # A broken clock (2099), one three hours ahead, and one 30 minutes ahead (kept: the
    # tolerance is the end of the hour of the record's timestamp plus 1 h).
    ahead = [
        line(tenant="tenant-0001", workload="vm-2099", time="2099-01-01T00:00:00Z", id="f1"),
        line(tenant="tenant-0001", workload="vm-3h", time=at(now + timedelta(hours=3)), id="f2"),
    ]
    soon = line(tenant="tenant-0002", workload="vm-30m", time=at(now + timedelta(minutes=30)))
    worker = WorkerProcess(kafka_settings.bootstrap, names, "a")
    try:
        worker.wait_for_log("took home partitions")
        send(kafka_settings, names.jobs, [*good, *ahead, soon])
        wait_for_usage(kafka_settings, names.usage, expected_usage([*good, soon]), workers=[worker])
        deadline = time.monotonic() + 30
        dead = asyncio.run(read_to_end(kafka_settings, names.rejected))
        while len(dead) < len(ahead) and time.monotonic() < deadline:
            time.sleep(0.5)
            dead = asyncio.run(read_to_end(kafka_settings, names.rejected))
        assert sorted(r.value for r in dead) == sorted(ahead)
        for rec in dead:
            h = headers_dict(rec.headers)
            assert h["meter.code"] == "future_time"
            assert (
                "the end of the hour of the record's timestamp plus the clock-skew"
                in (h["meter.reason"])
            )
        assert worker.metric('meter_events_rejected_total{reason="future_time"}') == 2
    finally:
        assert worker.terminate() == 0, worker.log()


def test_a_forwarded_event_keeps_its_records_timestamp(
    kafka_settings: KafkaSettings, unique: str
) -> None:
    """Produced to a partition that is not its tenant's home, with a timestamp of its own:
    the copy on .by-tenant carries that timestamp, and both events are judged by it."""
    names = Names(unique)
    sent_at = datetime(2026, 11, 20, 10, 15, tzinfo=UTC)
    stamp = int(sent_at.timestamp() * 1000)
    kept = line(tenant="tenant-0003", workload="vm-k", time="2026-11-20T11:59:59Z", id="k")
    held = line(tenant="tenant-0003", workload="vm-h", time="2026-11-20T12:00:00Z", id="h")
    worker = WorkerProcess(kafka_settings.bootstrap, names, "a")
    try:
        worker.wait_for_log("took home partitions")
        home = (murmur2(b"tenant-0003") & 0x7FFFFFFF) % 4  # as the worker homes it
        other = (home + 1) % 4
        for value in (kept, held):
            asyncio.run(produce(kafka_settings, names.jobs, other, value, stamp))
        wait_for_usage(kafka_settings, names.usage, expected_usage([kept]), workers=[worker])
        forwarded = asyncio.run(read_to_end(kafka_settings, f"{names.jobs}.by-tenant"))
        assert [(r.value, r.timestamp, r.partition) for r in forwarded] == [(kept, stamp, home)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            dead = asyncio.run(read_to_end(kafka_settings, names.rejected))
            if dead:
                break
            time.sleep(0.5)
        assert [(r.value, headers_dict(r.headers)["meter.code"]) for r in dead] == [
            (held, "future_time")
        ]
    finally:
        assert worker.terminate() == 0, worker.log()
