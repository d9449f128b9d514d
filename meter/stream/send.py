"""``meter send``: produce JSON lines to ``meter.jobs`` with their bytes untouched, or each
event in CloudEvents binary content mode (``--mode binary``)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable
from typing import Final

import msgspec
from aiokafka import AIOKafkaProducer
from aiokafka.errors import UnknownTopicOrPartitionError

from meter.domain import Event, parse
from meter.domain.event import DEFAULT_MAX_EVENT_BYTES
from meter.kafka import KafkaSettings, TopicError, start_client

log = logging.getLogger(__name__)

#: How ``meter send`` writes an event (the CloudEvents Kafka binding's content modes).
MODES: Final = ("structured", "binary")
#: A CloudEvents attribute name (lower-case letters and digits), so ``ce_{name}`` is its header.
_ATTRIBUTE: Final = re.compile(r"[a-z0-9]{1,20}")
#: Members of a structured event that are not ``ce_`` headers in binary mode.
_NOT_HEADERS: Final = frozenset({"data", "data_base64", "datacontenttype"})
_members: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])


def tenant_key(raw: bytes, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> bytes | None:
    """The tenant_id of a line as a message key when it is a valid event, else ``None``.

    Read by :func:`meter.domain.parse`, as the worker reads it, so it never raises;
    a line the meter rejects needs no key (it goes to the dead-letter topic).
    """
    event = parse(raw, max_bytes)
    if event.__class__ is Event:
        return event.tenant_id.encode()
    return None


def binary_message(raw: bytes) -> tuple[bytes, list[tuple[str, bytes]]] | None:
    """A structured-mode event the meter accepts as a binary-mode message, ``(value, headers)``.

    The value is ``data``'s JSON text, bytes untouched; each attribute with a string
    value is a ``ce_`` header (the five the meter needs, and extensions), and
    ``content-type`` is ``application/json``.  ``None`` if ``raw`` is not a JSON object
    with ``data``.
    """
    try:
        members = _members.decode(raw.removeprefix(b"\xef\xbb\xbf"))
        data = members["data"]
        headers = [
            (f"ce_{name}", value.encode())
            for name, text in members.items()
            if name not in _NOT_HEADERS
            and _ATTRIBUTE.fullmatch(name)
            and isinstance(value := msgspec.json.decode(text), str)
        ]
    except (msgspec.DecodeError, KeyError, UnicodeEncodeError):
        return None
    headers.append(("content-type", b"application/json"))
    return bytes(data), headers


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
    mode: str = "structured",
    request_timeout_ms: int = 40_000,
) -> int:
    """Produce every non-blank line; return how many.  Waits for every ack.

    A topic the broker does not have is waited for up to ``request_timeout_ms`` (a worker
    may be creating it), then :class:`TopicError`: Apache Kafka as production runs it
    creates no topic on demand, and neither does this.

    A line is keyed by its tenant when it is an event of at most
    ``max_event_bytes`` that the meter accepts (see :func:`tenant_key`).  In
    ``binary`` mode such a line goes as a binary-mode message
    (:func:`binary_message`); every other line goes as it is, so it still reaches
    the dead-letter topic.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    binary = mode == "binary"
    producer = AIOKafkaProducer(
        **settings.client_kwargs(),
        acks="all",
        enable_idempotence=idempotence,
        linger_ms=10,
        max_batch_size=1024 * 1024,
        request_timeout_ms=request_timeout_ms,
    )
    await start_client(producer, settings)  # a producer that cannot start is stopped
    sent = 0
    try:
        pending: list[asyncio.Future[object]] = []
        for line in lines:
            value = strip_line(line)
            if not value.strip():
                continue
            key = tenant_key(value, max_event_bytes)
            headers = None
            if binary and key is not None and (message := binary_message(value)) is not None:
                value, headers = message
            try:
                pending.append(await producer.send(topic, value, key=key, headers=headers))
            except UnknownTopicOrPartitionError as exc:
                raise TopicError(
                    f"topic {topic} does not exist on {settings.bootstrap} (waited "
                    f"{request_timeout_ms / 1000:.0f} s for it); meter send creates no topic: "
                    "start `meter worker` first (it creates the topics it reads), or create it"
                ) from exc
            sent += 1
            if len(pending) >= window:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return sent
