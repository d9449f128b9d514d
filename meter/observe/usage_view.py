"""A live view of ``meter.usage``: tails the topic, keeps the highest revision per key.

It serves the status page and ``/api/usage`` whatever number of workers there
are, because it reads what all of them publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from meter.kafka import KafkaSettings, close_consumer, describe_partitions
from meter.report import UsageReport
from meter.stream.usage import keep_latest, usage_rows

log = logging.getLogger(__name__)


class UsageView:
    def __init__(self, settings: KafkaSettings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self.records: dict[str, dict[str, Any]] = {}
        self.version = 0  # bumps on every change, for cheap polling

    def months(self) -> list[str]:
        return sorted({r["month"] for r in self.records.values() if "month" in r}, reverse=True)

    def document(self, month: str | None = None, tenant_id: str | None = None) -> dict[str, Any]:
        """The same shape as ``meter report --format json``."""
        rows = usage_rows(self.records, month=month, tenant_id=tenant_id)
        return UsageReport(usage=rows).as_dict()

    async def run(self, stop: asyncio.Event) -> None:
        """Tail the topic until ``stop``; reconnects on its own."""
        while not stop.is_set():
            consumer = None
            try:
                parts = (await describe_partitions(self.settings, [self.topic])).get(self.topic)
                if not parts:
                    await _sleep(stop, 1.0)
                    continue
                consumer = AIOKafkaConsumer(
                    **self.settings.client_kwargs(),
                    group_id=None,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                )
                await consumer.start()
                tps = [TopicPartition(self.topic, p) for p in range(parts)]
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                while not stop.is_set():
                    batch = await consumer.getmany(timeout_ms=250)
                    for records in batch.values():
                        for rec in records:
                            self._take(rec.key, rec.value)
            except (KafkaError, OSError) as exc:
                log.warning("usage view: %s; retrying", exc)
                await _sleep(stop, 1.0)
            finally:
                if consumer is not None:
                    await close_consumer(consumer, max_seconds=5.0)

    def _take(self, key: bytes | None, value: bytes | None) -> None:
        if key is None or value is None:
            return
        try:
            record = orjson.loads(value)
        except orjson.JSONDecodeError:
            return
        if isinstance(record, dict):
            before = self.records.get(key.decode("utf-8", "replace"))
            keep_latest(self.records, key.decode("utf-8", "replace"), record)
            if self.records.get(key.decode("utf-8", "replace")) is not before:
                self.version += 1


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
