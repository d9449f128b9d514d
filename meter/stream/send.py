"""``meter send``: produce JSON lines to ``meter.jobs`` with their bytes untouched."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import orjson
from aiokafka import AIOKafkaProducer

from meter.kafka import KafkaSettings

log = logging.getLogger(__name__)


def tenant_key(raw: bytes) -> bytes | None:
    """The tenant_id of a line as a message key, where it can be read."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(doc, dict):
        data = doc.get("data")
        if isinstance(data, dict) and isinstance(data.get("tenant_id"), str):
            return str(data["tenant_id"]).encode()
    return None


def strip_line(line: bytes) -> bytes:
    """A line without its terminator (``\\n`` or ``\\r\\n``); nothing else is touched."""
    if line.endswith(b"\n"):
        line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
    return line


async def send_lines(
    settings: KafkaSettings,
    topic: str,
    lines: Iterable[bytes],
    *,
    idempotence: bool = False,
    window: int = 5_000,
) -> int:
    """Produce every non-blank line; return how many.  Waits for every ack."""
    producer = AIOKafkaProducer(
        **settings.client_kwargs(),
        acks="all",
        enable_idempotence=idempotence,
        linger_ms=10,
        max_batch_size=1024 * 1024,
    )
    await producer.start()
    sent = 0
    try:
        pending: list[asyncio.Future[object]] = []
        for line in lines:
            value = strip_line(line)
            if not value.strip():
                continue
            pending.append(await producer.send(topic, value, key=tenant_key(value)))
            sent += 1
            if len(pending) >= window:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return sent
