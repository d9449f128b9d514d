"""A worker whose input topic the broker no longer knows (Apache Kafka on a fresh disk, or
the topic deleted) halts as for any data loss, also after a rebalance took its partitions;
a topic unknown for less than ``TOPIC_GONE_S``, or one it never read from, does not.  A
halted worker's readers outside the group give up their partitions."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.structs import TopicPartition

from meter.domain import load_ratecards
from meter.kafka import KafkaSettings
from meter.stream.config import StreamConfig
from meter.stream.partition import DataLostError
from meter.stream.worker import TOPIC_GONE_S, Worker

CONFIG = StreamConfig()
JOBS, BY_TENANT = CONFIG.topics.jobs, CONFIG.topics.by_tenant


class Consumer:
    """What the broker's last metadata answer said: the topics it knows."""

    def __init__(self) -> None:
        self.known = {JOBS, BY_TENANT}
        self.assigned = {TopicPartition(JOBS, 0), TopicPartition(BY_TENANT, 0)}

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    def highwater(self, tp: TopicPartition) -> int | None:
        return None

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return {0} if topic in self.known else None


def _worker() -> tuple[Worker, Consumer]:
    w = Worker(KafkaSettings(bootstrap="127.0.0.1:1"), CONFIG, load_ratecards())
    consumer = Consumer()
    w._consumer = consumer  # type: ignore[assignment]
    return w, consumer


def _age(w: Worker, topic: str) -> None:
    """As if ``topic`` had been unknown since ``TOPIC_GONE_S`` ago."""
    w._topics_missing[topic] -= TOPIC_GONE_S


def test_an_input_topic_unknown_for_a_while_is_data_lost_even_after_a_rebalance() -> None:
    w, consumer = _worker()
    w._positions[(JOBS, 0)] = 1217
    w._check_input_log()  # read, and known
    # The broker lost its disk: the rebalance that follows takes every partition.
    consumer.known, consumer.assigned = set(), set()
    w._positions.clear()
    w._check_input_log()  # unknown just now: not yet
    _age(w, JOBS)
    with pytest.raises(DataLostError, match=rf"topic {JOBS} no longer exists .* offset 1217"):
        w._check_input_log()


def test_a_topic_back_within_the_bound_or_never_read_is_no_loss() -> None:
    w, consumer = _worker()
    w._positions[(JOBS, 0)] = 5
    w._positions[(BY_TENANT, 0)] = 0  # taken, nothing read from it yet
    consumer.known = {JOBS}
    w._check_input_log()
    consumer.known = set()
    w._check_input_log()
    consumer.known = {JOBS}  # a metadata answer that lists it again
    w._check_input_log()
    assert w._topics_missing == {}
    consumer.known = set()
    w._check_input_log()
    assert set(w._topics_missing) == {JOBS}  # by-tenant was never read: not watched


class Reader:
    def __init__(self) -> None:
        self.assigned = True

    def unsubscribe(self) -> None:
        self.assigned = False


def test_a_halted_worker_stops_its_clock_watch_and_its_readers_give_up_their_partitions() -> None:
    async def run() -> None:
        w, _ = _worker()
        clock, restore = Reader(), Reader()
        w._clock_reader, w._restore = clock, restore  # type: ignore[assignment]
        w._clock_task = asyncio.create_task(asyncio.sleep(3600))
        w._data_lost(DataLostError("topic jobs no longer exists on the broker"))
        assert w.halted.startswith("the broker lost data")
        assert not clock.assigned and not restore.assigned
        with pytest.raises(asyncio.CancelledError):
            await w._clock_task

    asyncio.run(run())
