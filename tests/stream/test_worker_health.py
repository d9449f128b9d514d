"""What /healthz says, read from a worker's state (no broker needed)."""

from __future__ import annotations

import time

from meter.domain import load_ratecards
from meter.kafka import KafkaSettings
from meter.stream.config import StreamConfig
from meter.stream.partition import HomePartition
from meter.stream.worker import WRITES_FAILING_S, Worker


def healthy() -> Worker:
    w = Worker(KafkaSettings(bootstrap="127.0.0.1:1"), StreamConfig(), load_ratecards())
    w.connecting = ""
    w.ready.set()
    w.lease.granted(1)
    for n in (0, 1):
        hp = w.homes[n] = HomePartition(n, w.cards.height)
        hp.begin_recovery()
        hp.recovered(0)
    return w


def test_a_worker_that_owns_its_partitions_is_healthy() -> None:
    assert healthy().health() == (True, "ok")


def test_every_reason_to_be_not_ready_is_one_line() -> None:
    w = Worker(KafkaSettings(bootstrap="127.0.0.1:1"), StreamConfig(), load_ratecards())
    assert w.health() == (False, "connecting to the broker")
    w.connecting = ""
    assert w.health() == (False, "waiting for partitions from the consumer group")

    w = healthy()
    w.homes[1].fence("another writer added changelog records at offsets 4..6")
    ok, reason = w.health()
    assert not ok
    assert reason.startswith("fenced home partitions [1]: another writer")
    assert w.problems()["fenced"]

    w = healthy()
    w.homes[2] = HomePartition(2)
    assert w.health() == (False, "recovering home partitions [2] from the changelog")

    w = healthy()
    w.lease.lapse()
    ok, reason = w.health()
    assert not ok
    assert reason.startswith("group membership not confirmed")

    w = healthy()
    w._writes_failing_since = time.monotonic() - WRITES_FAILING_S - 1
    w._write_error = "KafkaConnectionError: Connection at 127.0.0.1:9092 closed"
    ok, reason = w.health()
    assert not ok
    assert reason.startswith("writes to the broker have failed for 16s (last: KafkaConnection")
    assert w.problems()["writes_failing"]

    w = healthy()
    w._halt("the broker lost data meter had read or written (meter.jobs[0] ends at 3)")
    ok, reason = w.health()
    assert not ok
    assert reason.startswith("the broker lost data")
    assert w.problems()["data_lost"]
    assert "\n" not in reason
