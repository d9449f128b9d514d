"""Explicit topic creation and "read a whole topic" helpers.

Each helper checks the SASL handshake before it starts a client and raises
:class:`~meter.errors.AuthenticationError` if the broker refuses it (see
:mod:`meter.kafka.auth`).

Neither helper relies on broker-side auto-creation (Tansu auto-creates 4-partition
topics on metadata requests) nor on ListOffsets(latest) (Tansu 0.6.0 answers the last
batch's *base* offset + 1, which is short when that batch held several records).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, Final, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic, RecordsToDelete
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAuthorizationFailedError, for_code
from aiokafka.protocol.group import JoinGroupRequest, LeaveGroupRequest
from aiokafka.protocol.metadata import MetadataRequest

from meter.errors import BrokerError
from meter.kafka.auth import check_authentication, translate_auth_errors
from meter.kafka.authz import TOPIC_AUTHORIZATION_FAILED, not_authorized
from meter.kafka.settings import KafkaSettings
from meter.kafka.topic_check import (
    MIN_INSYNC,
    FoundTopic,
    Replication,
    TopicSpec,
    choose_replication,
    compare,
    refusal,
)

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS: Final = 36
_METADATA_WAIT_S: Final = 10.0


class TopicError(BrokerError):
    """A topic could not be created, described or read."""


class Startable(Protocol):
    """What :func:`start_client` needs: AIOKafkaProducer and AIOKafkaConsumer have it."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def start_client(client: Startable, settings: KafkaSettings) -> None:
    """``await client.start()`` with a refused SASL handshake raised as
    :class:`~meter.errors.AuthenticationError` (aiokafka raises ``KeyError: 'v'`` or an
    "Unable to bootstrap" that hides the cause).  A client that fails to start is stopped,
    so it leaks no connection and no "Unclosed" warning; the error propagates.

    Does not check the handshake first: call
    :func:`~meter.kafka.auth.check_authentication` once before starting several clients.
    """
    try:
        async with translate_auth_errors(settings, check_first=False):
            await client.start()
    except Exception:
        if isinstance(client, AIOKafkaConsumer):
            await close_consumer(client, max_seconds=5.0)
        else:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.stop(), 5.0)
        raise


#: What aiokafka's sender logs at ERROR when a broker refuses InitProducerId (Tansu does).
_INIT_PRODUCER_ID_ERROR: Final = "Unexpected error during InitProducerIdRequest"


class _DropInitProducerIdError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_INIT_PRODUCER_ID_ERROR)


@contextlib.contextmanager
def init_producer_id_handled() -> Iterator[None]:
    """Around the start of an idempotent producer whose failure the caller handles and
    reports itself: aiokafka's own ERROR about the failed InitProducerId is dropped.
    Only that record, only meanwhile: every other sender error still shows."""
    sender = logging.getLogger("aiokafka.producer.sender")
    drop = _DropInitProducerIdError()
    sender.addFilter(drop)
    try:
        yield
    finally:
        sender.removeFilter(drop)


async def _start_admin(settings: KafkaSettings, request_timeout_ms: int) -> AIOKafkaAdminClient:
    await check_authentication(settings)
    admin = AIOKafkaAdminClient(**settings.client_kwargs(), request_timeout_ms=request_timeout_ms)
    try:
        async with translate_auth_errors(settings, check_first=False):
            await admin.start()
    except Exception:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(admin.close(), 5.0)
        raise
    return admin


async def _denied(admin: AIOKafkaAdminClient, names: list[str]) -> list[str]:
    """Which of ``names`` the broker refuses to describe to us (TOPIC_AUTHORIZATION_FAILED).

    Metadata for all topics leaves out, without a word, the topics a client may not
    describe; asked for by name (auto-creation off, which Tansu honours too), they answer
    error 29, whether they exist or not."""
    request = MetadataRequest(names, allow_auto_topic_creation=False)
    answer = await admin._send_request(request)  # no public call for named Metadata
    return [
        t["topic"]
        for t in answer.to_object()["topics"]
        if t["error_code"] == TOPIC_AUTHORIZATION_FAILED
    ]


def _raise_denied(settings: KafkaSettings, denied: list[str], operation: str) -> None:
    if denied:
        hint = "Read or Write on it grant it too" if operation == "Describe" else ""
        raise not_authorized(settings, operation, "topic", denied[0], hint)


async def _describe_all(admin: AIOKafkaAdminClient) -> dict[str, list[dict[str, Any]]]:
    """All topics -> partition metadata, via Metadata(topics=null), which never auto-creates."""
    topics: list[dict[str, Any]] = await admin.describe_topics()
    return {t["topic"]: list(t["partitions"]) for t in topics if t["error_code"] == 0}


async def describe_partitions(
    settings: KafkaSettings, topics: list[str] | None = None, *, request_timeout_ms: int = 30000
) -> dict[str, int]:
    """Partition counts of existing topics (missing topics are absent, never auto-created)."""
    admin = await _start_admin(settings, request_timeout_ms)
    try:
        described = await _describe_all(admin)
        missing = [t for t in topics or () if t not in described]
        if missing:
            _raise_denied(settings, await _denied(admin, missing), "Describe")
    finally:
        await admin.close()
    wanted = described if topics is None else {t: described[t] for t in topics if t in described}
    return {name: len(parts) for name, parts in wanted.items()}


async def ensure_topics(
    settings: KafkaSettings,
    specs: list[TopicSpec],
    *,
    replication_factor: int | None = None,
    min_insync_replicas: int | None = None,
    request_timeout_ms: int = 30000,
) -> dict[str, int]:
    """Create the missing topics in ``specs``, check every one against what meter needs
    (:func:`~meter.kafka.topic_check.compare`); return ``{topic: actual partition count}``.

    Replication (for specs that name none) is chosen for the brokers the cluster metadata
    lists (:func:`~meter.kafka.topic_check.choose_replication`); ``min.insync.replicas``
    goes into every created topic's configs.  Existing topics are never altered: each
    difference is logged on one line, as a WARNING, or as an ERROR and then raised as a
    :class:`~meter.errors.ConfigError` when it breaks exactness.  Idempotent (topics
    created concurrently count as existing).
    """
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate topic names in {names}")
    admin = await _start_admin(settings, request_timeout_ms)
    try:
        cluster = await admin.describe_cluster()
        brokers = len(cluster.get("brokers") or ())
        replication = choose_replication(brokers, replication_factor, min_insync_replicas)
        existing = await _describe_all(admin)
        missing = [s for s in specs if s.name not in existing]
        if missing:
            await _create(settings, admin, missing, replication, request_timeout_ms)
            existing = await _wait_for_topics(settings, admin, names)
        # Also when another worker created them a moment ago.
        await _wait_for_leaders(settings, existing, names)
        configs = await _describe_configs(settings, admin, names)
        found = {
            name: FoundTopic(
                len(existing[name]),
                min((len(p.get("replicas") or ()) for p in existing[name]), default=0),
                configs.get(name),
            )
            for name in names
        }
        diffs = compare(specs, found, replication, brokers)
        for diff in diffs:
            log.log(logging.ERROR if diff.fatal else logging.WARNING, "%s", diff.line())
        error = refusal(diffs)
        if error is not None:
            raise error
        return {name: found[name].partitions for name in names}
    finally:
        await admin.close()


async def _create(
    settings: KafkaSettings,
    admin: AIOKafkaAdminClient,
    missing: list[TopicSpec],
    replication: Replication,
    request_timeout_ms: int,
) -> None:
    new_topics = [
        NewTopic(
            s.name,
            s.partitions,
            s.replication_factor or replication.factor,
            topic_configs={
                **{k: str(v) for k, v in s.configs.items()},
                MIN_INSYNC: str(replication.min_insync),
            },
        )
        for s in missing
    ]
    response = await admin.create_topics(new_topics, timeout_ms=request_timeout_ms)
    for topic, code, message in _topic_errors(response):
        if code == 0:
            log.info(
                "created topic %s (replication factor %d, min.insync.replicas %d)",
                topic,
                next(t.replication_factor for t in new_topics if t.name == topic),
                replication.min_insync,
            )
        elif code == _TOPIC_ALREADY_EXISTS:
            log.debug("topic %s already exists (created concurrently)", topic)
        elif code == TOPIC_AUTHORIZATION_FAILED:
            raise not_authorized(
                settings, "Create", "topic", topic, "or create the topic as an administrator"
            )
        else:
            exc_cls = for_code(code)
            raise TopicError(f"cannot create topic {topic}: {exc_cls.__name__} ({code}): {message}")


async def _describe_configs(
    settings: KafkaSettings, admin: AIOKafkaAdminClient, names: list[str]
) -> dict[str, dict[str, str]]:
    """``{topic: {config: value}}`` from DescribeConfigs (all configs: Tansu 0.6 closes the
    connection when asked for named ones).  A topic the broker answers with an error is
    absent; a broker that refuses the request altogether is said once, and nothing of
    it is compared.  A topic whose configs we may not describe raises
    :class:`~meter.errors.AuthorizationError`: the check at start is what keeps a changelog
    with a finite retention from losing totals, so it is not skipped for want of an ACL."""
    resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
    try:
        responses = await admin.describe_configs(resources)
    except KafkaError as exc:
        log.warning(
            "the broker does not describe topic configs (DescribeConfigs: %r): cleanup "
            "policy, retention and min.insync.replicas of existing topics are not checked",
            exc,
        )
        return {}
    out: dict[str, dict[str, str]] = {}
    for response in responses:
        for resource in response.resources:
            code, _message, _type, name, entries = resource[:5]
            if code == TOPIC_AUTHORIZATION_FAILED:
                raise not_authorized(
                    settings, "DescribeConfigs", "topic", name, "meter checks its topics at start"
                )
            if code != 0:
                log.warning("DescribeConfigs for topic %s: error %d; not checked", name, code)
                continue
            out[name] = {e[0]: e[1] for e in entries if e[1] is not None}
    return out


def _topic_errors(response: Any) -> list[tuple[str, int, str | None]]:
    out: list[tuple[str, int, str | None]] = []
    for entry in response.topic_errors:
        topic, code = entry[0], entry[1]
        message = entry[2] if len(entry) > 2 else None
        out.append((topic, code, message))
    return out


async def _wait_for_topics(
    settings: KafkaSettings, admin: AIOKafkaAdminClient, names: list[str]
) -> dict[str, list[dict[str, Any]]]:
    """Real Kafka propagates new topics to metadata asynchronously: poll until visible.
    A topic that is not visible because we may not describe it raises
    :class:`~meter.errors.AuthorizationError` at once."""
    deadline = time.monotonic() + _METADATA_WAIT_S
    asked = False
    while True:
        described = await _describe_all(admin)
        pending = [n for n in names if not described.get(n)]
        if not pending:
            return described
        if not asked:
            asked = True
            _raise_denied(settings, await _denied(admin, pending), "Describe")
        if time.monotonic() > deadline:
            raise TopicError(f"topics {pending} not visible in metadata after creation")
        await asyncio.sleep(0.1)


async def _wait_for_leaders(
    settings: KafkaSettings, described: dict[str, list[dict[str, Any]]], names: list[str]
) -> None:
    """Wait until every partition of the new topics answers ListOffsets.

    Apache Kafka shows a new topic in metadata, leader and all, before that leader serves
    it: measured on 4.4.0, a worker whose consumer started right after CreateTopics logged
    ``ERROR aiokafka.consumer.fetcher: Failed fetch offsets from 1: [Error 6]
    NotLeaderForPartitionError`` on its first start (3 of 5 fresh starts); a new topic was
    served 1.1 s after CreateTopics answered (3 of 3 measurements).  aiokafka's
    ``beginning_offsets`` retries that quietly, so the worker's own consumers then start on
    partitions that are served.  On topics already served it costs one ListOffsets."""
    partitions = [
        TopicPartition(name, p["partition"]) for name in names for p in described.get(name, ())
    ]
    if not partitions:
        return
    probe = AIOKafkaConsumer(**settings.client_kwargs(), enable_auto_commit=False)
    await start_client(probe, settings)
    try:
        await probe.beginning_offsets(partitions)  # bounded by request_timeout_ms
    except KafkaError as exc:
        raise TopicError(f"new topics {names} not served after creation: {exc!r}") from exc
    finally:
        await close_consumer(probe, max_seconds=5.0)


def leave_at_generation_zero(consumer: AIOKafkaConsumer) -> bool:
    """Make ``consumer.stop()`` send LeaveGroup at generation 0 too; True when it will.

    aiokafka (0.11-0.14) leaves a group on stop only from generation 1 on, the first that
    Apache Kafka hands out.  The embedded broker (Tansu) numbers generations from 0, so a
    worker's first clean stop left nothing behind, the broker kept the stopped member for
    its whole session, and the next worker's join waited it out: measured, 19.5 s from a
    restart to ready instead of 6.5 s.  A LeaveGroup names only the group and the member,
    so sending it at generation 0 is the same request Kafka gets at 1.  This reaches into
    aiokafka's coordinator; on any other shape of it, it does nothing (returns False).
    """
    coordinator = getattr(consumer, "_coordinator", None)
    leave = getattr(coordinator, "_maybe_leave_group", None)
    send = getattr(coordinator, "_send_req", None)
    if coordinator is None or leave is None or send is None or getattr(leave, "_meter", False):
        return False
    if not hasattr(coordinator, "generation") or not hasattr(coordinator, "member_id"):
        return False

    async def leave_group() -> None:
        if (
            coordinator.generation == 0
            and coordinator.member_id != JoinGroupRequest.UNKNOWN_MEMBER_ID
            and getattr(coordinator, "_group_instance_id", None) is None
        ):
            try:
                request = (
                    LeaveGroupRequest[0]  # aiokafka < 0.12: a list of versions
                    if isinstance(LeaveGroupRequest, list)
                    else LeaveGroupRequest
                )
                await send(request(coordinator.group_id, coordinator.member_id))
            except KafkaError as exc:
                log.warning("LeaveGroup at generation 0 failed: %s", exc)
            else:
                log.info("left group %s (generation 0)", coordinator.group_id)
        await leave()

    leave_group._meter = True  # type: ignore[attr-defined]
    coordinator._maybe_leave_group = leave_group
    return True


async def close_consumer(consumer: AIOKafkaConsumer, *, max_seconds: float = 10.0) -> bool:
    """``consumer.stop()`` that cannot hang or leak a stray ``CancelledError``.

    Measured against a dead broker (aiokafka 0.14): ``stop()`` hangs indefinitely when
    auto-commit is on (final commit waits for a coordinator), and otherwise may raise
    ``CancelledError`` from a fetch task that was sleeping in its retry backoff.  Returns
    ``True`` on a clean stop.  A genuine cancellation of the calling task is re-raised.

    A group member always leaves its group (:func:`leave_at_generation_zero`).
    """
    leave_at_generation_zero(consumer)
    try:
        await asyncio.wait_for(consumer.stop(), max_seconds)
    except TimeoutError:
        log.warning("Kafka consumer did not stop within %.1fs (broker unreachable?)", max_seconds)
        return False
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.warning("Kafka consumer stop() raised a stray CancelledError (broker unreachable?)")
        return False
    return True


async def iter_to_end(
    settings: KafkaSettings,
    topic: str,
    *,
    max_seconds: float | None = 60.0,
    fetch_timeout_ms: int = 200,
    consumer_kwargs: Mapping[str, Any] | None = None,
) -> AsyncIterator[ConsumerRecord[bytes, bytes]]:
    """Yield every record of every partition of ``topic``, from the beginning up to the end
    as it was when reading started, then stop.

    End detection does not use ListOffsets(latest).  Instead, each partition's target is
    the high watermark carried by the first Fetch response for it (aiokafka exposes it as
    ``consumer.highwater(tp)``; it is also set, to 0, for empty partitions).  A partition
    is finished once ``position >= target``; records at or beyond the target (produced
    after reading started) are not yielded, so the result is a consistent snapshot.

    With ``consumer_kwargs={"isolation_level": "read_committed"}`` the last stable offset
    is used instead of the high watermark.  Raises :class:`TopicError` if the topic does
    not exist and ``TimeoutError`` if the end is not reached within ``max_seconds``.
    """
    partitions = (await describe_partitions(settings, [topic])).get(topic)
    if partitions is None:
        raise TopicError(f"topic {topic!r} does not exist")
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    extra = dict(consumer_kwargs or {})
    read_committed = extra.get("isolation_level") == "read_committed"
    consumer = AIOKafkaConsumer(
        **{
            **settings.client_kwargs(),
            "group_id": None,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            **extra,
        }
    )
    await start_client(consumer, settings)
    try:
        if not tps:
            return
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        targets: dict[TopicPartition, int] = {}
        remaining = set(tps)
        total = 0
        while True:
            for tp in list(remaining):
                if tp not in targets:
                    end = (
                        consumer.last_stable_offset(tp)
                        if read_committed
                        else consumer.highwater(tp)
                    )
                    if end is None:
                        continue
                    targets[tp] = end
                if await consumer.position(tp) >= targets[tp]:
                    remaining.discard(tp)
            if not remaining:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"reading {topic} to its end timed out after {max_seconds}s "
                    f"({total} records; unfinished partitions "
                    f"{sorted(tp.partition for tp in remaining)})"
                )
            try:
                batches = await consumer.getmany(*remaining, timeout_ms=fetch_timeout_ms)
            except TopicAuthorizationFailedError as exc:
                raise not_authorized(settings, "Read", "topic", topic) from exc
            for tp, records in batches.items():
                target = targets.get(tp)
                if target is None:
                    # Records arrived with the first fetch response: its high watermark
                    # is already known, so take it now.
                    end = (
                        consumer.last_stable_offset(tp)
                        if read_committed
                        else consumer.highwater(tp)
                    )
                    target = targets[tp] = end if end is not None else records[-1].offset + 1
                for record in records:
                    if record.offset < target:
                        total += 1
                        yield record
        log.debug("read %d records from %s (end offsets %s)", total, topic, targets)
    finally:
        await close_consumer(consumer)


async def read_to_end(
    settings: KafkaSettings,
    topic: str,
    *,
    max_seconds: float | None = 60.0,
    consumer_kwargs: Mapping[str, Any] | None = None,
) -> list[ConsumerRecord[bytes, bytes]]:
    """All records of ``topic`` from the beginning to its current end (see :func:`iter_to_end`)."""
    return [
        record
        async for record in iter_to_end(
            settings, topic, max_seconds=max_seconds, consumer_kwargs=consumer_kwargs
        )
    ]


async def delete_records_below(
    settings: KafkaSettings, topic: str, below: dict[int, int], request_timeout_ms: int = 15_000
) -> dict[int, int]:
    """DeleteRecords: every record of ``topic`` partition p below offset ``below[p]``.
    Returns each partition's new start (low watermark).  Raises the broker's error
    (:class:`~aiokafka.errors.KafkaError`; the embedded broker does not implement the
    request: an error or a closed connection)."""
    admin = await _start_admin(settings, request_timeout_ms)
    try:
        done = await admin.delete_records(
            {TopicPartition(topic, p): RecordsToDelete(o) for p, o in below.items()},
            timeout_ms=request_timeout_ms,
        )
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(admin.close(), 5.0)
    return {tp.partition: low for tp, low in done.items()}
