"""The worker's pipeline without a broker: a batch's writes are acknowledged, and its
offsets committed, while the next batch is applied; nothing is published or committed
before its own acknowledgement, and a write that fails takes every batch after it down
with it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, RecordTooLargeError
from aiokafka.partitioner import murmur2
from aiokafka.structs import ConsumerRecord, RecordMetadata, TopicPartition

from meter.domain import load_ratecards
from meter.kafka import KafkaSettings
from meter.stream.config import StreamConfig
from meter.stream.partition import HomePartition, Phase
from meter.stream.worker import Worker
from tests.domain.events import line

CONFIG = StreamConfig(close_grace=None, partitions=4)
JOBS = CONFIG.topics.jobs


def home_of(tenant: str) -> int:
    return (murmur2(tenant.encode()) & 0x7FFFFFFF) % CONFIG.partitions


class Producer:
    """Sends are held until the test acknowledges (or fails) them."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int | None, asyncio.Future[Any]]] = []
        self.ends: dict[tuple[str, int], int] = {}

    async def send(self, topic: str, value: bytes, **kw: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.sent.append((topic, kw.get("partition"), fut))
        return fut

    def ack(self, fut: asyncio.Future[Any], topic: str, partition: int) -> None:
        offset = self.ends.get((topic, partition), 0)
        self.ends[(topic, partition)] = offset + 1
        fut.set_result(RecordMetadata(topic, partition, None, offset, -1, 0, 0))

    def pending(self, topic: str) -> list[tuple[int | None, asyncio.Future[Any]]]:
        return [(p, f) for t, p, f in self.sent if t == topic and not f.done()]


class Consumer:
    def __init__(self) -> None:
        self.commits: list[dict[TopicPartition, int]] = []
        self.behind = True

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(JOBS, n) for n in range(CONFIG.partitions)}

    def highwater(self, tp: TopicPartition) -> int:
        return 1_000_000 if self.behind else 0

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))

    def seek(self, tp: TopicPartition, offset: int) -> None:
        raise AssertionError("every partition here is active")


def worker() -> tuple[Worker, Producer, Consumer]:
    w = Worker(KafkaSettings(bootstrap="127.0.0.1:1"), CONFIG, load_ratecards())
    w.lease.granted(1)
    for n in range(CONFIG.partitions):
        hp = w.homes[n] = HomePartition(n, w.cards.height)
        hp.begin_recovery()
        hp.recovered(0)
    producer, consumer = Producer(), Consumer()
    w._producer = producer  # type: ignore[assignment]
    w._consumer = consumer  # type: ignore[assignment]
    return w, producer, consumer


#: The records' timestamp: after the events' time (an event dated after its record's hour
#: plus the clock skew is rejected as future_time).
APPENDED = 1_795_000_000_000  # 2026-11-18T09:46:40Z


def batch(tenant: str, offset: int, *workloads: str) -> dict[TopicPartition, list[Any]]:
    p = home_of(tenant)
    records = [
        ConsumerRecord(JOBS, p, offset + k, APPENDED, 0, tenant.encode(),
                       line(tenant=tenant, workload=wid, id=f"{tenant}-{wid}"), None, 0, 0, ())
        for k, wid in enumerate(workloads)
    ]  # fmt: skip
    return {TopicPartition(JOBS, p): records}


def test_the_next_batch_is_applied_while_the_one_before_waits_for_its_acknowledgement() -> None:
    async def run() -> None:
        w, producer, consumer = worker()
        stop = asyncio.Event()
        a, b = "tenant-a", "tenant-b"
        await w._process(batch(a, 0, "vm-1", "vm-2"), stop)
        [(pa, first)] = producer.pending(CONFIG.topics.changelog)
        assert pa == home_of(a)
        assert consumer.commits == []  # nothing committed before the acknowledgement

        second = asyncio.ensure_future(w._process(batch(b, 0, "vm-3"), stop))
        await asyncio.sleep(0)
        # The second batch is applied and its write sent; it now waits for the first.
        assert len(producer.pending(CONFIG.topics.changelog)) == 2
        assert not second.done()
        assert consumer.commits == []
        producer.ack(first, CONFIG.topics.changelog, pa)
        await second
        await w._committed_all()
        assert consumer.commits == [{TopicPartition(JOBS, home_of(a)): 2}]
        # Only the acknowledged batch's tenant-month is publishable.
        assert w.homes[home_of(a)].dirty.keys() == {(a, "2026-11")}
        assert not w.homes[home_of(b)].dirty

        consumer.behind = False  # caught up: the batch in flight is settled at once
        [(pb, last)] = producer.pending(CONFIG.topics.changelog)
        producer.ack(last, CONFIG.topics.changelog, pb)  # type: ignore[arg-type]
        await w._drain(stop)
        assert consumer.commits[-1] == {TopicPartition(JOBS, home_of(b)): 1}
        assert w.homes[home_of(b)].dirty.keys() == {(b, "2026-11")}

    asyncio.run(run())


def test_a_blocked_write_rebuilds_every_batch_after_it_and_commits_nothing() -> None:
    async def run() -> None:
        w, producer, consumer = worker()
        stop = asyncio.Event()
        a, b = "tenant-a", "tenant-b"
        assert home_of(a) != home_of(b)
        await w._process(batch(a, 0, "vm-1"), stop)
        [(_, first)] = producer.pending(CONFIG.topics.changelog)
        second = asyncio.ensure_future(w._process(batch(b, 0, "vm-2"), stop))
        await asyncio.sleep(0)
        first.set_exception(RecordTooLargeError("too large"))
        with pytest.raises(Exception, match="a write can never succeed"):
            await second
        assert consumer.commits == []
        for tenant in (a, b):  # both batches' partitions are rebuilt before use
            hp = w.homes[home_of(tenant)]
            assert hp.phase is Phase.FENCED
            assert hp.needs_rebuild
            assert not hp.dirty

    asyncio.run(run())


def test_a_failed_write_is_sent_again_and_its_batch_committed_once_acknowledged() -> None:
    async def run() -> None:
        w, producer, consumer = worker()
        stop = asyncio.Event()
        consumer.behind = False
        a = "tenant-a"
        task = asyncio.ensure_future(w._process(batch(a, 0, "vm-1"), stop))
        await asyncio.sleep(0)
        [(p, first)] = producer.pending(CONFIG.topics.changelog)
        first.set_exception(KafkaConnectionError("broker went away"))
        for _ in range(100):  # the retry sends it again after its back-off
            await asyncio.sleep(0.05)
            if producer.pending(CONFIG.topics.changelog):
                break
        [(p, again)] = producer.pending(CONFIG.topics.changelog)
        assert consumer.commits == []
        producer.ack(again, CONFIG.topics.changelog, p)  # type: ignore[arg-type]
        await task
        await w._committed_all()
        assert consumer.commits == [{TopicPartition(JOBS, home_of(a)): 1}]
        assert w.stats.write_retries == 1
        assert w.homes[home_of(a)].phase is Phase.ACTIVE

    asyncio.run(run())
