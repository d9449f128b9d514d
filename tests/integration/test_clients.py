"""Kafka clients nobody here wrote: confluent-kafka (librdkafka from its wheel) as a job
system's producer and as a consumer of ``meter.usage``, against the same broker as the
rest of the integration tests.

A tenant's home partition is Java's murmur2 of its key.  librdkafka's default partitioner
(``consistent_random``) hashes keys with CRC32 instead, so most of its events land on
another partition and the worker forwards them home (exact, but a second write);
``partitioner=murmur2_random`` lands every keyed event home.  These tests measure both.

Nothing here is skipped: confluent-kafka is a test dependency, and a librdkafka that
cannot talk to the broker fails the test with the client's own error.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial

import orjson
import pytest
from aiokafka.partitioner import murmur2
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka import libversion as librdkafka_version

from meter.domain import Event, Rater, Rejected, load_ratecards, parse
from meter.kafka import KafkaSettings
from meter.sim.fleet import generate
from meter.stream.send import tenant_key
from tests.integration.conftest import BrokerHandle
from tests.integration.harness import TEST_NOW, Names, WorkerProcess, send, wait_for_usage

pytestmark = [pytest.mark.integration, pytest.mark.brokers("tansu", "kafka")]

#: librdkafka's default session timeout is 45 s, and the embedded broker holds a group
#: join for half the session timeout: the worker's 6 s keeps the join at 3 s.
SESSION_TIMEOUT_MS = 6000


def this_month_fleet(n: int, seed: int) -> list[bytes]:
    """A simulated fleet's events of the worker's month (its pinned clock, which is in the
    past: no event is dated after its record), and its broken lines.

    The fleet's time zones put a few events into the previous month, which the worker may
    already have closed (its late events become corrections, which a plain reader of
    ``meter.usage`` does not see); they are left out.
    """
    month = TEST_NOW[:7]
    lines = []
    for line in generate(n, seed=seed, month=month, tenants=30, workloads=20):
        event = parse(line)
        if event.__class__ is Rejected or (isinstance(event, Event) and event.month == month):
            lines.append(line)
    return lines


def home(key: bytes, partitions: int) -> int:
    """The tenant's home partition: Java's (and aiokafka's) default for a keyed record."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


@pytest.fixture
def names(unique: str) -> Names:
    return Names(unique)


@pytest.fixture
def worker(broker: BrokerHandle, names: Names) -> Iterator[WorkerProcess]:
    w = WorkerProcess(broker.bootstrap, names, "clients")
    try:
        w.wait_for_log("took home partitions")  # the worker has created every topic
        yield w
    finally:
        w.terminate()
        w.close()


def librdkafka_produce(
    bootstrap: str, topic: str, lines: list[bytes], partitioner: str | None
) -> tuple[list[tuple[bytes | None, int]], int]:
    """Produce every line keyed by tenant as ``meter send`` does, with librdkafka.

    Returns ``(key, partition)`` of every message as delivered, and the topic's
    partition count.  Any delivery error fails the test.
    """
    config: dict[str, str | int] = {"bootstrap.servers": bootstrap, "acks": "all"}
    if partitioner is not None:
        config["partitioner"] = partitioner
    producer = Producer(config)
    try:
        metadata = producer.list_topics(topic, timeout=30)
    except KafkaException as exc:
        raise AssertionError(
            f"librdkafka {librdkafka_version()[0]} cannot talk to {bootstrap}: {exc} "
            "(see the README's broker-gaps table)"
        ) from exc
    partitions = len(metadata.topics[topic].partitions)
    delivered: dict[int, tuple[bytes | None, int]] = {}  # reports come in delivery order
    errors: list[str] = []

    def report(i: int, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            delivered[i] = (msg.key(), msg.partition())

    for i, line in enumerate(lines):
        producer.produce(topic, line, key=tenant_key(line), on_delivery=partial(report, i))
        producer.poll(0)
    left = producer.flush(60)
    assert left == 0, f"{left} messages not delivered within 60 s"
    assert errors == [], errors[:5]
    assert sorted(delivered) == list(range(len(lines)))
    return [delivered[i] for i in range(len(lines))], partitions


@pytest.mark.timeout(240)
@pytest.mark.parametrize("partitioner", [None, "murmur2_random"], ids=["default", "murmur2"])
def test_a_librdkafka_producer_is_metered_exactly_and_murmur2_lands_every_event_home(
    broker: BrokerHandle, names: Names, worker: WorkerProcess, partitioner: str | None
) -> None:
    settings = KafkaSettings(bootstrap=broker.bootstrap)
    lines = this_month_fleet(2000, seed=21)
    delivered, partitions = librdkafka_produce(broker.bootstrap, names.jobs, lines, partitioner)

    # What the worker must forward: every event it applies (counted or duplicate: both
    # are forwarded before the ledger sees them) that arrived off its home partition.
    rater = Rater(load_ratecards())
    applied = off_home = 0
    for line, (key, partition) in zip(lines, delivered, strict=True):
        before = rater.tally.counted + rater.tally.duplicate
        rater.feed(line)
        if rater.tally.counted + rater.tally.duplicate > before:
            assert key is not None
            applied += 1
            off_home += partition != home(key, partitions)

    # The totals are exact either way: the same rows as `meter rate`.
    wait_for_usage(settings, names.usage, rater.ledger.usage(), workers=[worker])
    forwarded = worker.metric("meter_events_forwarded_total")
    assert forwarded is not None, worker.log()[-3000:]
    print(  # the measured share, for the README (pytest -s)
        f"\nlibrdkafka {librdkafka_version()[0]}, partitioner={partitioner or 'default'}: "
        f"{forwarded:.0f} of {applied} events forwarded ({forwarded / applied:.0%})"
    )
    assert forwarded == off_home
    if partitioner == "murmur2_random":
        # librdkafka's murmur2 is Java's: every keyed record is on its tenant's home.
        assert [p for k, p in delivered if k is not None and p != home(k, partitions)] == []
        assert forwarded == 0
    else:  # consistent_random: CRC32 of the key, so most events take the second write
        assert forwarded > applied / 2, (forwarded, applied)


def read_usage_with_librdkafka(bootstrap: str, topic: str, group: str) -> list[tuple[object, ...]]:
    """A consumer group reads ``topic`` from the beginning to its end and keeps, per key,
    the record with the highest revision (of equal revisions the later one): the rows of
    what it holds, as ``meter report`` prints them."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "session.timeout.ms": SESSION_TIMEOUT_MS,
        }
    )
    latest: dict[bytes, dict[str, object]] = {}
    at_end: set[int] = set()
    deadline = time.monotonic() + 60
    try:
        partitions = len(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
        consumer.subscribe([topic])
        while len(at_end) < partitions or len(consumer.assignment()) < partitions:
            assert time.monotonic() < deadline, f"end of {topic} not reached: {sorted(at_end)}"
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(err)
                at_end.add(msg.partition())
                continue
            at_end.discard(msg.partition())
            key, record = msg.key(), orjson.loads(msg.value())
            held = latest.get(key)
            if held is None or record["revision"] >= held["revision"]:
                latest[key] = record
    finally:
        consumer.close()
    return sorted(
        (r["month"], r["tenant_id"], wtype, u["workloads"], u["points"])
        for r in latest.values()
        for wtype, u in r["usage"].items()  # type: ignore[attr-defined]
        if u["workloads"] > 0
    )


@pytest.mark.timeout(240)
def test_a_librdkafka_consumer_group_reads_the_same_rows_as_meter_report(
    broker: BrokerHandle, names: Names, worker: WorkerProcess
) -> None:
    settings = KafkaSettings(bootstrap=broker.bootstrap)
    lines = this_month_fleet(1500, seed=22)
    rater = Rater(load_ratecards())
    for line in lines:
        rater.feed(line)
    send(settings, names.jobs, lines)
    wait_for_usage(settings, names.usage, rater.ledger.usage(), workers=[worker])

    rows = read_usage_with_librdkafka(broker.bootstrap, names.usage, f"reader-{names.suffix}")
    report = subprocess.run(
        [sys.executable, "-m", "meter", "report", "--broker", broker.bootstrap,
         "--topic", names.usage, "--format", "json"],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    want = sorted(
        (r["month"], r["tenant_id"], r["workload_type"], r["workloads"], r["points"])
        for r in orjson.loads(report.stdout)["usage"]
    )
    assert want
    assert rows == want
