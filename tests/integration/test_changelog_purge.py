"""Storage on Apache Kafka: the snapshots topic really compacted, the changelog really purged
(``--purge-changelog``: DeleteRecords below the whole snapshot before the last one), and
still a restart, a new host, a late correction and a damaged last snapshot end exact.

A broker of their own, whose log cleaner and retention check run every fraction of a
second (the defaults are 15 s and 5 min); the test's topics are created before the worker
starts, with the configs meter needs plus segments that roll every 300 ms, so compaction
and segment deletion happen within the test.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from meter.kafka import KafkaSettings
from meter.kafka.topics import read_to_end
from meter.sim.fleet import generate
from meter.stream import snapshots
from meter.stream.partition import HomePartition
from tests.integration.conftest import _unavailable
from tests.integration.harness import (
    Names,
    WorkerProcess,
    audit_args,
    audit_clean,
    expected_usage,
    read_all,
    revision_faults,
    send,
)
from tests.integration.harness import wait_for_usage as wait_usage
from tests.integration.kafka import KafkaBroker, KafkaUnavailableError, fetch_libs
from tests.integration.test_month_close import finals, meter, wait_until

pytestmark = [pytest.mark.integration]

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
PARTITIONS = 4
SEGMENTS = {"segment.ms": "300"}


@pytest.fixture(scope="module")
def cleaning_kafka() -> Iterator[KafkaBroker]:
    """Apache Kafka whose cleaner and retention check run promptly."""
    try:
        libs = fetch_libs()
    except KafkaUnavailableError as exc:
        _unavailable(f"Apache Kafka unavailable: {exc}")
    settings = {
        "log.cleaner.backoff.ms": "200",
        "log.retention.check.interval.ms": "500",
        "log.segment.delete.delay.ms": "0",
        "log.cleaner.delete.retention.ms": "0",
    }
    log = ARTIFACTS / f"kafka-purge-{os.getpid()}.log"
    with KafkaBroker(libs, log, settings=settings) as kafka:
        yield kafka


async def _create(bootstrap: str, names: Names) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(
                    f"{names.jobs}.ledger.changelog",
                    PARTITIONS,
                    1,
                    topic_configs={
                        "cleanup.policy": "delete",
                        "retention.ms": "-1",
                        "retention.bytes": "-1",
                        **SEGMENTS,
                    },
                ),
                NewTopic(
                    f"{names.jobs}.ledger.snapshots",
                    PARTITIONS,
                    1,
                    topic_configs={
                        "cleanup.policy": "compact",
                        "min.cleanable.dirty.ratio": "0.01",
                        "delete.retention.ms": "0",
                        **SEGMENTS,
                    },
                ),
            ]
        )
    finally:
        await admin.close()


async def _starts(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return {tp.partition: o for tp, o in (await consumer.beginning_offsets(tps)).items()}
    finally:
        await consumer.stop()


def starts(bootstrap: str, topic: str) -> dict[int, int]:
    """Each partition's log start offset (ListOffsets, earliest)."""
    return asyncio.run(_starts(bootstrap, topic))


def first_segments(broker: KafkaBroker, topic: str) -> dict[int, int]:
    """Each partition's oldest segment file on the broker's disk (its base offset)."""
    assert broker._dir is not None
    found: dict[int, int] = {}
    for d in Path(broker._dir.name).glob(f"data-*/{topic}-*"):
        bases = [int(f.stem) for f in d.glob("*.log")]
        if bases:
            found[int(d.name.rsplit("-", 1)[1])] = min(bases)
    return found


def compacted(bootstrap: str, topic: str) -> dict[int, tuple[int, int]]:
    """Per partition of ``topic``: (records read, offsets spanned): fewer records than
    offsets means compaction removed some."""
    seen: dict[int, list[int]] = {}
    for r in asyncio.run(read_to_end(KafkaSettings(bootstrap=bootstrap), topic)):
        seen.setdefault(r.partition, []).append(r.offset)
    return {p: (len(o), max(o) - min(o) + 1) for p, o in seen.items()}


def recovered(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"recovered (\d+) ledger entries", log)]


def _worker(bootstrap: str, names: Names, tag: str, state: Path) -> WorkerProcess:
    w = WorkerProcess(bootstrap, names, tag, extra=["--state-dir", str(state)])
    try:
        w.wait_for_log("took home partitions")
    except BaseException:
        w.close()
        raise
    return w


def _purged_history(
    broker: KafkaBroker, names: Names, tmp_path: Path, seed: int
) -> tuple[list[bytes], dict[str, object]]:
    """A worker with ``--purge-changelog`` rates June in three rounds, the clock moves to
    3 July (June closes and leaves memory), it rates July in two rounds, and stops cleanly
    once every changelog partition's old records are gone from the broker's disk and the
    snapshots topic was compacted.  Returns the events and June's finals."""
    bootstrap = broker.bootstrap
    settings = KafkaSettings(bootstrap=bootstrap)
    asyncio.run(_create(bootstrap, names))
    clock = tmp_path / "clock"
    clock.write_text("2026-06-20T00:00:00Z")
    names.extra = [
        "--clock", str(clock), "--history-start", "2026-05", "--checkpoint-interval", "0.3",
        "--snapshot-interval", "0", "--prune-after", "0", "--purge-changelog",
    ]  # fmt: skip
    june = [list(generate(700, seed=seed + n, month="2026-06", tenants=12)) for n in range(3)]
    july = [list(generate(700, seed=seed + 10 + n, month="2026-07", tenants=12)) for n in range(2)]
    changelog = f"{names.jobs}.ledger.changelog"
    snaps = f"{names.jobs}.ledger.snapshots"
    sent: list[bytes] = []
    a = _worker(bootstrap, names, "a", tmp_path / "host-a")
    try:
        for chunk in june:
            sent += chunk
            send(settings, names.jobs, chunk)
            wait_usage(settings, names.usage, expected_usage(sent), workers=[a])
        clock.write_text("2026-07-03T00:00:01Z")
        wait_until(lambda: a.log().count("2026-06 pruned from memory") == 4, "June pruned")
        for chunk in july:
            sent += chunk
            send(settings, names.jobs, chunk)
            wait_usage(settings, names.usage, expected_usage(sent), workers=[a])
        wait_until(
            lambda: (
                all(o > 0 for o in first_segments(broker, changelog).values())
                and len(first_segments(broker, changelog)) == PARTITIONS
            ),
            "old changelog segments deleted from disk",
        )
        assert all(o > 0 for o in starts(bootstrap, changelog).values())
        wait_until(
            lambda: any(n < span for n, span in compacted(bootstrap, snaps).values()),
            "the snapshots topic compacted",
        )
        assert a.terminate() == 0
    finally:
        a.close()
    assert "changelog records below offset" in a.log(), a.log()
    return sent, finals(settings, names.usage, "2026-06")


def _exact(settings: KafkaSettings, names: Names, events: list[bytes]) -> None:
    """``meter audit`` of June and July: 0 differences; no usage revision ever went down."""
    for month in ("2026-06", "2026-07"):
        audit = meter("audit", "--broker", settings.bootstrap, "--month", month, *audit_args(names))
        assert audit.returncode == 0, audit.stdout.decode() + audit.stderr.decode()
        assert audit_clean(audit.stdout, names), audit.stdout.decode()
    assert revision_faults(read_all(settings, names.usage)) == []


def test_after_the_changelog_is_purged_a_restart_a_new_host_and_a_late_correction_are_exact(
    cleaning_kafka: KafkaBroker, unique: str, tmp_path: Path
) -> None:
    """The changelog's log start moved and its old segments are gone from disk; the snapshots
    topic lost superseded records to compaction.  Then: a restart from local state, a new
    host (an empty ``--state-dir``) reading the compacted snapshots and the purged changelog's
    tail, and late June events (June closed and pruned, inside its correction horizon) on
    the new host: the usage topic equals ``meter rate`` of every event, the audit finds 0
    differences, no revision goes down, and June's finals never move."""
    names = Names(unique)
    settings = KafkaSettings(bootstrap=cleaning_kafka.bootstrap)
    changelog = f"{names.jobs}.ledger.changelog"
    events, june_finals = _purged_history(cleaning_kafka, names, tmp_path, seed=900)
    purged = starts(settings.bootstrap, changelog)

    again = _worker(settings.bootstrap, names, "a2", tmp_path / "host-a")
    try:
        assert again.log().count("local state read to changelog offset") == 4, again.log()
        more = list(generate(400, seed=950, month="2026-07", tenants=12))
        events += more
        send(settings, names.jobs, more)
        wait_usage(settings, names.usage, expected_usage(events), workers=[again])
        assert again.terminate() == 0
    finally:
        again.close()

    b = _worker(settings.bootstrap, names, "b", tmp_path / "host-b")
    try:
        log = b.log()
        assert log.count("snapshot read from") == 4, log
        assert "reading the whole snapshot before" not in log, log
        late = list(generate(400, seed=960, month="2026-06", tenants=14, workloads=20))
        events += late
        send(settings, names.jobs, late)
        wait_usage(settings, names.usage, expected_usage(events), workers=[b])
        assert "rebuilding" not in b.log(), b.log()
        assert b.terminate() == 0
    finally:
        b.close()
    assert all(o >= purged[p] > 0 for p, o in starts(settings.bootstrap, changelog).items())
    assert finals(settings, names.usage, "2026-06") == june_finals
    _exact(settings, names, events)


def test_a_damaged_last_snapshot_after_a_purge_falls_back_to_the_one_before_it(
    cleaning_kafka: KafkaBroker, unique: str, tmp_path: Path
) -> None:
    """The changelog is purged below the whole snapshot *before* the last one: on partition 0
    the last snapshot is then damaged (its checkpoint lists a record that is not there, what
    compaction or retention leaves; it carries the one before it, as a real one does).  A new
    host reads the one before it (whose rows compaction kept: each row alternates between two
    keys) and the changelog after it, which the purge kept, and ends exact."""
    names = Names(unique)
    settings = KafkaSettings(bootstrap=cleaning_kafka.bootstrap)
    snaps = f"{names.jobs}.ledger.snapshots"
    events, _ = _purged_history(cleaning_kafka, names, tmp_path, seed=970)
    last = None
    for r in asyncio.run(read_to_end(settings, snaps)):
        if r.partition == 0 and r.key == snapshots.CHECKPOINT_KEY:
            last = snapshots.parse_snapshot(r.value, r.offset)
    assert last is not None and last.checkpoint is not None and last.before is not None
    assert last.before.checkpoint is not None
    purged = starts(settings.bootstrap, f"{names.jobs}.ledger.changelog")[0]
    assert 0 < purged <= last.before.checkpoint.offset - 1  # the slack the fallback needs
    row = next(k for k in last.index if k.startswith("month:2026-07"))
    gone = {**last.index, row: [10**9]}

    doc = snapshots.checkpoint_doc(last.checkpoint, gone, last.slots, last.before)
    asyncio.run(_produce(settings.bootstrap, snaps, 0, doc))
    b = _worker(settings.bootstrap, names, "b", tmp_path / "host-b")
    try:
        log = b.log()
        assert "home partition 0: reading the whole snapshot before the last one" in log, log
        assert log.count("snapshot read from") == 4, log
        more = list(generate(400, seed=990, month="2026-07", tenants=12))
        events += more
        send(settings, names.jobs, more)
        wait_usage(settings, names.usage, expected_usage(events), workers=[b])
        assert "Traceback" not in b.log()
        assert b.terminate() == 0
    finally:
        b.close()
    _exact(settings, names, events)

    # Both snapshots of partition 1 damaged: nothing at or past the changelog's start reads
    # back, so a new host halts (not ready) rather than count from a partial history.
    last = None
    for r in asyncio.run(read_to_end(settings, snaps)):
        if r.partition == 1 and r.key == snapshots.CHECKPOINT_KEY:
            last = snapshots.parse_snapshot(r.value, r.offset)
    assert last is not None and last.checkpoint is not None and last.before is not None
    before = last.before
    before.index = {k: [10**9] for k in before.index}
    doc = snapshots.checkpoint_doc(
        last.checkpoint, {k: [10**9] for k in last.index}, last.slots, before
    )
    asyncio.run(_produce(settings.bootstrap, snaps, 1, doc))
    usage = read_all(settings, names.usage)
    c = WorkerProcess(settings.bootstrap, names, "c", extra=["--state-dir", str(tmp_path / "c")])
    try:
        c.wait_for_log("no state at or past it reads back")
        assert c.health()[0] != 200
        assert "Traceback" not in c.log()
    finally:
        c.close()
    assert len(read_all(settings, names.usage)) == len(usage)  # it published nothing


async def _produce(bootstrap: str, topic: str, partition: int, doc: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, doc, key=snapshots.CHECKPOINT_KEY, partition=partition)
    finally:
        await producer.stop()


def test_snapshot_records_of_the_longest_ids_fit_apache_kafkas_default_message_limit(
    cleaning_kafka: KafkaBroker, unique: str, tmp_path: Path
) -> None:
    """The records a checkpoint writes, with the longest workload ids (256 characters of
    4-byte UTF-8: a record of 5,000 such entries would be ~5 MB), published as a worker does
    to a topic with Apache Kafka's default ``max.message.bytes``: every one is accepted.
    A month of 1 M workloads is more records of the same bound (cut at ``ROW_BYTES``)."""
    from meter.store.sqlite import SqliteStore
    from tests.stream.test_local_state import (
        RATES,
        Changelog,
        event,
        recover,
        write,
    )

    log = Changelog()
    store = SqliteStore(tmp_path / "state").partition("changelog", 0)
    hp: HomePartition = recover(log, store)
    wide = "\U0001d518" * 250
    for n in range(3000):
        assert event(hp, f"t{n % 3}", "2026-07", f"{wide}{n:06d}", RATES[n % 3], 5)
    write(hp, log)
    hp.save(log.fingerprint(hp.changelog_end))
    topic = f"snaps-{unique}"

    async def publish() -> snapshots.Published:
        admin = AIOKafkaAdminClient(bootstrap_servers=cleaning_kafka.bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(topic, 1, 1, topic_configs={"cleanup.policy": "compact"})]
            )
        finally:
            await admin.close()
        producer = AIOKafkaProducer(
            bootstrap_servers=cleaning_kafka.bootstrap,
            acks="all",
            max_request_size=8 * 1024 * 1024,  # as the worker's: the broker's limit decides
        )
        await producer.start()
        try:
            return await snapshots.publish(
                producer, topic, 0, store, set(store.keys()), snapshots.Published({})
            )
        finally:
            await producer.stop()

    published = asyncio.run(publish())
    sizes = [len(r) for k in store.keys() for r in store.read(k)]  # noqa: SIM118
    assert published.at >= 0 and sum(len(v) for v in published.index.values()) == len(sizes)
    assert max(sizes) > 256 * 1024 and sum(sizes) > 2 * 1024 * 1024, sizes


@pytest.mark.brokers("tansu", "kafka")
def test_the_embedded_broker_keeps_the_changelog_whole_and_says_so_once_kafka_purges(
    kafka_settings: KafkaSettings, unique: str, tmp_path: Path, is_tansu: bool
) -> None:
    """The embedded broker closes the connection on DeleteRecords: the worker says once that
    it keeps the changelog whole, goes on, and counts exactly.  On Apache Kafka the same run
    purges (every partition's log start moves)."""
    names = Names(unique)
    names.extra = ["--checkpoint-interval", "0.3", "--snapshot-interval", "0", "--purge-changelog"]
    chunks = [list(generate(600, seed=995 + n, month="2026-11", tenants=16)) for n in range(3)]
    changelog = f"{names.jobs}.ledger.changelog"
    w = _worker(kafka_settings.bootstrap, names, "a", tmp_path / "a")
    try:
        sent: list[bytes] = []
        for chunk in chunks:
            sent += chunk
            send(kafka_settings, names.jobs, chunk)
            wait_usage(kafka_settings, names.usage, expected_usage(sent), workers=[w])
        if is_tansu:
            wait_until(lambda: "the broker does not delete records" in w.log(), "a purge tried")
            assert w.log().count("the broker does not delete records") == 1, w.log()
        else:
            wait_until(
                lambda: all(o > 0 for o in starts(kafka_settings.bootstrap, changelog).values()),
                "every partition purged",
            )
        assert w.health()[0] == 200
    finally:
        w.close()
    if is_tansu:
        assert set(starts(kafka_settings.bootstrap, changelog).values()) == {0}
