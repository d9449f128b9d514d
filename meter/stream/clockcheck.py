"""Measuring this host's clock against the broker's time, for the month-close check.

Every worker writes a small heartbeat to the clock topic (``meter.jobs.clock``: one
partition, created with ``message.timestamp.type=LogAppendTime``) every few seconds:
its member id and the time its close clock says (``--clock`` or the system clock).

- **Broker time.** Where the broker honours LogAppendTime (Apache Kafka), the produce
  answer carries the time the broker stamped on the heartbeat; this host's offset is its
  clock at the midpoint of send and acknowledgement minus that time.
- **Other workers' clocks.** Where the broker keeps the producer's timestamp (the
  embedded Tansu broker does, measured: it answers ``log_append_time = -1`` and stores
  the CreateTime on a LogAppendTime topic), there is no broker time.  Each worker then
  reads the others' heartbeats (from the topic's end when it starts: only fresh ones)
  and its offset from each is its clock at reading minus theirs.  A worker alone has no
  reference and holds its closes.

The verdict is :func:`meter.domain.clock.close_clock`'s; this module only measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from meter.domain.clock import ClockVerdict, broker_offset, close_clock, peer_offset

log = logging.getLogger(__name__)

#: How often a worker writes its heartbeat to the clock topic.
HEARTBEAT_S: Final = 2.0
#: A broker measurement counts this long; the heartbeats renew it.
BROKER_FRESH_S: Final = 60.0
#: Another worker's clock counts this long after its last heartbeat (a worker that left
#: is no reference).
PEER_FRESH_S: Final = 20.0
#: A heartbeat whose acknowledgement took longer than this measures nothing.
MAX_RTT_S: Final = 10.0
#: LogAppendTime in a produce answer (aiokafka's ``RecordMetadata.timestamp_type``).
LOG_APPEND_TIME: Final = 1


def member_id() -> str:
    """Who this worker is in its heartbeats: host, process, and a random part."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


class ClockReference:
    """What this worker has measured of the time outside its host."""

    def __init__(self, member: str, mono: Callable[[], float] = time.monotonic) -> None:
        self.member = member
        self._mono = mono
        #: (when measured, monotonic; offset) of the newest broker measurement
        self._broker: tuple[float, timedelta] | None = None
        #: member -> (when read, monotonic; offset)
        self._peers: dict[str, tuple[float, timedelta]] = {}
        #: Whether the broker stamps its own time on the clock topic; None: not known yet.
        self.broker_time: bool | None = None

    def note_broker(
        self, host_sent: datetime, host_acked: datetime, ts_ms: int, ts_type: int
    ) -> None:
        """A heartbeat's produce answer: broker time when it is LogAppendTime."""
        assigns = ts_type == LOG_APPEND_TIME and ts_ms >= 0
        self.broker_time = assigns
        if assigns:
            at = datetime.fromtimestamp(ts_ms / 1000, UTC)
            self._broker = (self._mono(), broker_offset(host_sent, host_acked, at))

    def note_peer(self, member: str, peer_time: datetime, host_read: datetime) -> None:
        if member != self.member:
            self._peers[member] = (self._mono(), peer_offset(host_read, peer_time))

    def offsets(self) -> tuple[list[timedelta], str]:
        """The fresh offsets (host minus reference) and what the reference is."""
        now = self._mono()
        if self._broker is not None and now - self._broker[0] <= BROKER_FRESH_S:
            return [self._broker[1]], "the broker's time (LogAppendTime)"
        fresh = {m: o for m, (at, o) in self._peers.items() if now - at <= PEER_FRESH_S}
        if fresh:
            return list(fresh.values()), f"the clocks of {len(fresh)} other worker(s)"
        if self.broker_time is False:
            return [], (
                "the broker (it keeps the producer's timestamps on the clock topic: no "
                "LogAppendTime) nor from another worker (none running)"
            )
        return [], "the broker yet (no heartbeat acknowledged)"

    def verdict(self, host_now: datetime, tolerance: timedelta | None) -> ClockVerdict:
        offsets, source = self.offsets()
        return close_clock(host_now, offsets, tolerance, source)


def heartbeat(member: str, host_time: datetime) -> bytes:
    return orjson.dumps(
        {"v": 1, "member": member, "host_time_ms": int(host_time.timestamp() * 1000)}
    )


def read_heartbeat(value: bytes | None) -> tuple[str, datetime] | None:
    """``(member, its host time)`` of a heartbeat; ``None`` for anything else."""
    try:
        doc = orjson.loads(value or b"")
        member, ms = doc["member"], doc["host_time_ms"]
        if not isinstance(member, str) or not isinstance(ms, int) or isinstance(ms, bool):
            return None
        return member, datetime.fromtimestamp(ms / 1000, UTC)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError, OSError):
        return None


async def watch_clock(
    ref: ClockReference,
    producer: AIOKafkaProducer,
    reader: AIOKafkaConsumer,
    topic: str,
    now: Callable[[], datetime],
    every_s: float = HEARTBEAT_S,
    report: Callable[[BaseException | None, str], bool] | None = None,
) -> None:
    """Write heartbeats and read the other workers', until cancelled.  ``reader`` is a
    started consumer without a group; it is assigned the clock topic's partition here and
    starts at its end.  ``report(exc, operation)`` hears of every failure (``operation``:
    ``Write`` for a heartbeat, ``Read`` for the others') and returns True when it said it
    itself; ``report(None, "")`` of every turn that succeeded."""
    tp = TopicPartition(topic, 0)
    reader.assign([tp])
    await reader.seek_to_end(tp)
    next_beat = 0.0
    warned = False
    while True:
        operation = "Write"
        try:
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + every_s
                await _beat(ref, producer, topic, now)
            operation = "Read"
            got: dict[Any, list[Any]] = await reader.getmany(tp, timeout_ms=250)
            read_at = now()
            for rec in got.get(tp, ()):
                hb = read_heartbeat(rec.value)
                if hb is not None:
                    ref.note_peer(hb[0], hb[1], read_at)
            warned = False
            if report is not None:
                report(None, "")
        except (KafkaError, OSError, TimeoutError) as exc:
            said = report is not None and report(exc, operation)
            if not warned and not said:
                log.warning("clock heartbeat on %s failed (%s); retrying", topic, exc)
                warned = True
            await asyncio.sleep(every_s)


async def _beat(
    ref: ClockReference, producer: AIOKafkaProducer, topic: str, now: Callable[[], datetime]
) -> None:
    sent, started = now(), time.monotonic()
    fut = await producer.send(topic, heartbeat(ref.member, sent), key=ref.member.encode())
    meta = await asyncio.wait_for(fut, MAX_RTT_S)
    if time.monotonic() - started > MAX_RTT_S:
        return
    before = ref.broker_time
    ref.note_broker(sent, now(), meta.timestamp, meta.timestamp_type)
    if before is None and ref.broker_time is False:
        log.info(
            "the broker keeps the producer's timestamps on %s (no LogAppendTime; the "
            "embedded broker never assigns one): month closes are checked against the "
            "other workers' clocks instead, and a worker alone holds them",
            topic,
        )


async def stop_watch(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, KafkaError, OSError):
            await task


__all__ = [
    "ClockReference",
    "heartbeat",
    "member_id",
    "read_heartbeat",
    "stop_watch",
    "watch_clock",
]
