"""``meter send``: produce JSON lines to ``meter.jobs`` with their bytes untouched."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaProducer

from meter.domain import Event, parse
from meter.domain.event import DEFAULT_MAX_EVENT_BYTES
from meter.kafka import KafkaSettings

log = logging.getLogger(__name__)


def tenant_key(raw: bytes, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> bytes | None:
    """The tenant_id of a line as a message key when it is a valid event, else ``None``.

    Read by :func:`meter.domain.parse`, as the worker reads it, so it never raises;
    a line the meter rejects needs no key (it goes to the dead-letter topic).
    """
    event = parse(raw, max_bytes)
    if event.__class__ is Event:
        return event.tenant_id.encode()
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
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
) -> int:
    """Produce every non-blank line; return how many.  Waits for every ack.

    A line is keyed by its tenant when it is an event of at most
    ``max_event_bytes`` that the meter accepts (see :func:`tenant_key`).
    """
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
            pending.append(
                await producer.send(topic, value, key=tenant_key(value, max_event_bytes))
            )
            sent += 1
            if len(pending) >= window:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return sent
