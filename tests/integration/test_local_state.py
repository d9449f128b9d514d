"""Local state (``--state-dir``) on a real broker: a worker SIGKILLed in the middle of a
checkpoint, a deleted or corrupt store, a partition moving to a worker with no local state,
a pruned month that a late event and the audit still reach, and snapshots on Kafka damaged
by records produced to their topic (missing, mislabelled, unreadable, cut short)."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from meter.kafka import KafkaSettings
from meter.kafka.topics import read_to_end
from meter.sim.fleet import generate
from meter.store import Checkpoint
from meter.stream import snapshots
from meter.stream.records import read_changelog
from tests.integration.harness import (
    Names,
    WorkerProcess,
    audit_args,
    audit_clean,
    current_usage,
    expected_usage,
    send,
)
from tests.integration.harness import wait_for_usage as wait_usage
from tests.integration.test_month_close import finals, meter, reports, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.brokers("tansu", "kafka")]

#: Makes every save slow (1 s inside its transaction, after its first row) and visible in
#: the log, so the test can SIGKILL the worker in the middle of one for certain.
SLOW_SAVES = """
import time as _time
import meter.store.sqlite as _sqlite
_save = _sqlite.SqlitePartition.save
class _Slow(dict):
    def items(self):
        for n, item in enumerate(super().items()):
            if n == 1:
                _time.sleep(1.0)
            yield item
def _slow_save(self, checkpoint, rows):
    print(f"SAVE-BEGIN {self.path.name} {checkpoint.offset}", flush=True)
    _save(self, checkpoint, _Slow({"": [], **rows}))
    print(f"SAVE-END {self.path.name}", flush=True)
_sqlite.SqlitePartition.save = _slow_save
"""


def recovered(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"recovered (\d+) ledger entries", log)]


def workload_months(events: list[bytes]) -> int:
    return sum(r.workloads for r in expected_usage(events))


def read_to(log: str) -> dict[int, int]:
    """Each home partition's changelog offset its local state was read to, from the log."""
    found = re.findall(r"home partition (\d+): local state read to changelog offset (\d+)", log)
    return {int(p): int(o) for p, o in found}


def saved_at(log: str, partition: int) -> int:
    """The newest changelog offset ``partition``'s state was saved at (-1: none yet)."""
    found = re.findall(rf"home partition {partition}: state saved at changelog offset (\d+)", log)
    return max(map(int, found), default=-1)


def changelog_ends(settings: KafkaSettings, topic: str) -> dict[int, int]:
    """Each partition's end offset, of the partitions with records."""
    ends: dict[int, int] = {}
    for r in asyncio.run(read_to_end(settings, topic)):
        ends[r.partition] = max(ends.get(r.partition, 0), r.offset + 1)
    return ends


def changelog_entries(
    settings: KafkaSettings,
    topic: str,
    since: dict[int, int] | None = None,
    until: dict[int, int] | None = None,
) -> int:
    """The ledger entries a replay of ``topic`` applies, from ``since[partition]`` (0 where
    absent) to ``until[partition]`` (its end where absent): what a worker's "recovered N
    ledger entries" counts."""
    since, until = since or {}, until or {}
    total = 0
    for r in asyncio.run(read_to_end(settings, topic)):
        if r.value and since.get(r.partition, 0) <= r.offset < until.get(r.partition, r.offset + 1):
            cl = read_changelog(r.value)
            total += len(cl.entries) + len(cl.final_entries) + len(cl.tails)
    return total


def test_a_worker_sigkilled_mid_checkpoint_restarts_from_its_local_state_and_the_tail(
    kafka_settings: KafkaSettings, unique: str, tmp_path: Path
) -> None:
    names = Names(unique)
    names.extra = ["--state-dir", str(tmp_path / "state"), "--checkpoint-interval", "0.5"]
    chunks = [list(generate(2500, seed=300 + n, month="2026-11", tenants=15)) for n in range(3)]
    a = WorkerProcess(kafka_settings.bootstrap, names, "a", prelude=SLOW_SAVES)
    try:
        a.wait_for_log("took home partitions")
        send(kafka_settings, names.jobs, chunks[0])
        wait_usage(kafka_settings, names.usage, expected_usage(chunks[0]), workers=[a])
        changelog = f"{names.jobs}.ledger.changelog"
        written = changelog_ends(kafka_settings, changelog)
        assert sorted(written) == [0, 1, 2, 3]
        wait_until(
            lambda: all(saved_at(a.log(), p) >= end for p, end in written.items()),
            "a whole checkpoint of the first events on every partition",
        )
        send(kafka_settings, names.jobs, chunks[1])
        deadline = time.monotonic() + 60
        ends = a.log().count("SAVE-END")
        while True:  # SIGKILL while a later save is half-way through its transaction
            log = a.log()
            if log.count("SAVE-END") > ends and log.rfind("SAVE-BEGIN") > log.rfind("SAVE-END"):
                break
            assert time.monotonic() < deadline, log
            time.sleep(0.02)
        a.kill()
        assert a.log().rfind("SAVE-BEGIN") > a.log().rfind("SAVE-END")
    finally:
        a.close()
    # What the next worker's recovery reads to (it goes on to write more, from the events
    # a had not finished).
    at_kill = changelog_ends(kafka_settings, changelog)

    b = WorkerProcess(kafka_settings.bootstrap, names, "b")
    try:
        b.wait_for_log("took home partitions")
        log = b.log()
        saved = read_to(log)
        assert sorted(saved) == [0, 1, 2, 3], log
        # Exactly the changelog written since each partition's last whole checkpoint was
        # replayed (the partition killed mid-save from its previous one), and that is less
        # than a replay from the start: the first events came from local state.
        tail = changelog_entries(kafka_settings, changelog, saved, at_kill)
        assert sum(recovered(log)) == tail, log
        assert all(saved[p] >= end for p, end in written.items()), (saved, written)
        assert tail <= changelog_entries(kafka_settings, changelog, written, at_kill), log
        send(kafka_settings, names.jobs, chunks[2])
        everything = chunks[0] + chunks[1] + chunks[2]
        wait_usage(kafka_settings, names.usage, expected_usage(everything), workers=[b])
    finally:
        b.close()


def test_a_deleted_or_corrupt_store_is_rebuilt_and_a_worker_without_one_takes_partitions(
    kafka_settings: KafkaSettings, unique: str, tmp_path: Path
) -> None:
    names = Names(unique)
    state = tmp_path / "state-a"
    # No snapshots on Kafka: what a worker without local state does is replay the changelog.
    names.extra = ["--checkpoint-interval", "0.5", "--snapshot-interval", "-1"]
    chunks = [list(generate(2000, seed=400 + n, month="2026-11", tenants=15)) for n in range(3)]
    a = WorkerProcess(kafka_settings.bootstrap, names, "a", extra=["--state-dir", str(state)])
    try:
        a.wait_for_log("took home partitions")
        send(kafka_settings, names.jobs, chunks[0])
        wait_usage(kafka_settings, names.usage, expected_usage(chunks[0]), workers=[a])
        assert a.terminate() == 0  # a clean stop saves every partition
    finally:
        a.close()
    files = sorted(state.glob("*.sqlite"))
    assert len(files) == 4, files
    assert not list(state.glob("*-wal")) or all(p.stat().st_size == 0 for p in state.glob("*-wal"))
    files[0].write_bytes(b"\x00garbage" * 500)  # corrupt
    files[1].unlink()  # deleted

    a2 = WorkerProcess(kafka_settings.bootstrap, names, "a2", extra=["--state-dir", str(state)])
    b: WorkerProcess | None = None
    try:
        a2.wait_for_log("took home partitions")
        log = a2.log()
        assert "rebuilding home partition 0 from the changelog" in log, log
        assert log.count("local state read to changelog offset") == 2, log  # 2 and 3
        send(kafka_settings, names.jobs, chunks[1])
        both = chunks[0] + chunks[1]
        wait_usage(kafka_settings, names.usage, expected_usage(both), workers=[a2])

        # A second worker with an empty state directory: it is given partitions it has no
        # local state of, and rebuilds them from the changelog.
        b = WorkerProcess(
            kafka_settings.bootstrap, names, "b", extra=["--state-dir", str(tmp_path / "state-b")]
        )
        wait_until(lambda: "took home partitions" in b.log(), "the rebalance", timeout=90)
        send(kafka_settings, names.jobs, chunks[2])
        everything = both + chunks[2]
        wait_usage(kafka_settings, names.usage, expected_usage(everything), workers=[a2, b])
        assert "local state read" not in b.log()
    finally:
        a2.close()
        if b is not None:
            b.close()


def test_a_late_event_for_a_pruned_month_becomes_a_correction_and_the_audit_still_agrees(
    kafka_settings: KafkaSettings, unique: str, tmp_path: Path
) -> None:
    clock = tmp_path / "clock"
    clock.write_text("2026-06-20T00:00:00Z")
    state = tmp_path / "state"
    names = Names(unique)
    names.extra = [
        "--clock", str(clock), "--history-start", "2026-05",
        "--state-dir", str(state), "--checkpoint-interval", "0.5", "--prune-after", "0",
    ]  # fmt: skip
    june = list(generate(2000, seed=501, month="2026-06", tenants=12, workloads=10))
    late = list(generate(600, seed=502, month="2026-06", tenants=16, workloads=14))
    bootstrap = kafka_settings.bootstrap
    a = WorkerProcess(bootstrap, names, "a")
    try:
        a.wait_for_log("took home partitions")
        send(kafka_settings, names.jobs, june)
        wait_usage(kafka_settings, names.usage, expected_usage(june), workers=[a])
        clock.write_text("2026-07-03T00:00:01Z")
        wait_until(
            lambda: reports(kafka_settings, names.reports).get("provider/2026-06"), "the close"
        )
        a.wait_for_log("2026-06 pruned from memory")
        assert a.terminate() == 0
    finally:
        a.close()
    closed = finals(kafka_settings, names.usage, "2026-06")

    again = WorkerProcess(bootstrap, names, "again")
    try:
        again.wait_for_log("took home partitions")
        log = again.log()
        # June (and May, which some sessions fall in once in UTC) stay on disk everywhere.
        pruned = [int(n) for n in re.findall(r"(\d+) months pruned", log)]
        assert len(pruned) == 4 and min(pruned) >= 1, log
        assert "read back from local state" not in log  # meter.reports holds its close
        # June left memory, yet /metrics still shows it: its totals were saved with it.
        with urllib.request.urlopen(f"{again.http_url()}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        gauge = r'^meter_workloads\{[^}]*month="2026-06"[^}]*\} (\S+)$'
        shown = sum(float(v) for v in re.findall(gauge, body, re.M))
        assert shown == sum(u.workloads for u in expected_usage(june) if u.month == "2026-06")
        assert shown > 0
        # Partition 0's June no longer reads back as saved (a disk that went bad while the
        # worker ran): the late events must still count, through a rebuild of partition 0.
        db = sqlite3.connect(state / f"jobs-{unique}.ledger.changelog-0.sqlite")
        db.execute("UPDATE records SET raw = CAST('[]' AS BLOB) WHERE key = 'month:2026-06'")
        db.commit()
        db.close()
        # July's events first, so the batch that reaches the damaged June row has counted
        # some before it (they are read again after the rebuild, and must count once).
        july = list(generate(300, seed=503, month="2026-07", tenants=16, workloads=14))
        send(kafka_settings, names.jobs, july + late)
        everything = june + july + late
        wait_usage(kafka_settings, names.usage, expected_usage(everything), workers=[again])
        again.wait_for_log("2026-06 read back from local state")
        log = again.log()
        assert "local state of home partition 0: " in log, log
        assert "rebuilding it from the changelog" in log, log
        assert finals(kafka_settings, names.usage, "2026-06") == closed  # finals never move

        # The batch read again after the rebuild counts once: one outcome per event.  Read
        # until they are all there: /metrics serves a body again for 1 s, and on Apache Kafka
        # the events were all counted within 1 s of an earlier scrape (measured: [0, 0, 0, 0]).
        def all_outcomes() -> list[float] | None:
            seen = [
                again.metric(f'meter_events_total{{outcome="{o}"}}') or 0
                for o in ("counted", "duplicate", "not_counted", "rejected")
            ]
            return seen if sum(seen) >= len(july) + len(late) else None

        seen = wait_until(all_outcomes, "an outcome of every event on /metrics")
        assert sum(seen) == len(july) + len(late), seen
        _audit_agrees(bootstrap, names, "2026-06")
    finally:
        again.close()


async def _torn_snapshot(settings: KafkaSettings, topic: str) -> int:
    """Append to partition 0 of the snapshots topic what a worker killed half-way through a
    snapshot leaves: a row record, no checkpoint record after it.  Returns the offset of the
    last whole snapshot's checkpoint record."""
    records = [r for r in await read_to_end(settings, topic) if r.partition == 0]
    [last] = [r for r in records if r.key == b"checkpoint"][-1:]
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(
            topic,
            b'{"v":1,"state":"2026-11","rates":[],"groups":[],"late":[]}',
            key=b"month:2026-11/0",
            partition=0,
            headers=[("meter.snapshot.previous", str(last.offset).encode())],
        )
    finally:
        await producer.stop()
    return last.offset


def test_a_worker_on_a_new_host_reads_the_last_snapshot_not_the_whole_changelog(
    kafka_settings: KafkaSettings, unique: str, tmp_path: Path
) -> None:
    names = Names(unique)
    names.extra = ["--checkpoint-interval", "0.5", "--snapshot-interval", "0"]
    chunks = [list(generate(2500, seed=600 + n, month="2026-11", tenants=15)) for n in range(2)]
    a = WorkerProcess(
        kafka_settings.bootstrap, names, "a", extra=["--state-dir", str(tmp_path / "host-a")]
    )
    try:
        a.wait_for_log("took home partitions")
        send(kafka_settings, names.jobs, chunks[0])
        wait_usage(kafka_settings, names.usage, expected_usage(chunks[0]), workers=[a])
        assert a.terminate() == 0  # its last snapshot is on the topic
    finally:
        a.close()
    assert "snapshot of its state at changelog offset" in a.log()
    asyncio.run(_torn_snapshot(kafka_settings, f"{names.jobs}.ledger.snapshots"))

    # Another host: an empty state directory.
    b = WorkerProcess(
        kafka_settings.bootstrap, names, "b", extra=["--state-dir", str(tmp_path / "host-b")]
    )
    try:
        b.wait_for_log("took home partitions")
        log = b.log()
        assert log.count("snapshot read from") == 4, log  # partition 0 past the torn one
        assert log.count("local state read to changelog offset") == 4, log
        assert sum(recovered(log)) == 0, log  # nothing written since: no changelog replayed
        send(kafka_settings, names.jobs, chunks[1])
        everything = chunks[0] + chunks[1]
        wait_usage(kafka_settings, names.usage, expected_usage(everything), workers=[b])
    finally:
        b.close()


# ------------------------------------------------------------------ damaged snapshots

#: A record to produce: key, value, headers.
Produced = tuple[bytes | None, bytes, list[tuple[str, bytes]]]


@dataclass
class LastSnapshot:
    """A partition of the snapshots topic as a worker left it."""

    at: int  # offset of its last checkpoint record
    checkpoint: Checkpoint
    index: dict[str, list[int]]
    end: int  # the partition's log end


async def _append(
    settings: KafkaSettings, topic: str, partition: int, records: list[Produced]
) -> None:
    producer = AIOKafkaProducer(**settings.client_kwargs(), acks="all")
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send_and_wait(
                topic, value, key=key, partition=partition, headers=headers
            )
    finally:
        await producer.stop()


def _last_snapshots(settings: KafkaSettings, topic: str) -> dict[int, LastSnapshot]:
    last: dict[int, LastSnapshot] = {}
    for r in asyncio.run(read_to_end(settings, topic)):
        if r.key == snapshots.CHECKPOINT_KEY:
            parsed = snapshots.parse_checkpoint(r.value)
            assert parsed is not None, r
            last[r.partition] = LastSnapshot(r.offset, *parsed, end=r.offset + 1)
        elif r.partition in last:
            last[r.partition].end = r.offset + 1
    return last


#: A record of a format this version does not read (a newer meter's, a stray writer's).
JUNK = b'{"v":99,"what":"a record of a format this version does not know"}'


def _previous(at: int) -> list[tuple[str, bytes]]:
    return [(snapshots.H_PREVIOUS, str(at).encode())]


def _snapshot_and_stop(
    settings: KafkaSettings, names: Names, state: Path, events: list[bytes]
) -> dict[int, LastSnapshot]:
    """A worker rates ``events`` and stops cleanly: every partition's last snapshot is on the
    topic, and it is what this returns."""
    a = WorkerProcess(settings.bootstrap, names, "a", extra=["--state-dir", str(state)])
    try:
        a.wait_for_log("took home partitions")
        send(settings, names.jobs, events)
        wait_usage(settings, names.usage, expected_usage(events), workers=[a])
        assert a.terminate() == 0
    finally:
        a.close()
    last = _last_snapshots(settings, f"{names.jobs}.ledger.snapshots")
    assert sorted(last) == [0, 1, 2, 3], last
    for snap in last.values():  # what the damage below relies on
        assert {"firsts:2026-11", "month:2026-11"} <= set(snap.index), snap.index
    return last


def _new_host(settings: KafkaSettings, names: Names, state: Path, tag: str) -> WorkerProcess:
    b = WorkerProcess(settings.bootstrap, names, tag, extra=["--state-dir", str(state)])
    try:
        b.wait_for_log("took home partitions")
    except BaseException:
        b.close()
        raise
    return b


def test_a_new_host_replays_the_changelog_where_the_last_snapshot_is_damaged(
    kafka_settings: KafkaSettings, unique: str, tmp_path: Path
) -> None:
    """Each home partition's last snapshot damaged another way, by records produced to the
    snapshots topic after a worker's clean stop: (0) its checkpoint lists a record that is not
    there (what compaction or retention leaves), (1) it lists another row's record where a
    row's should be, (2) the last record is a checkpoint that does not parse, (3) a snapshot cut
    short leads back to a checkpoint of a format this version does not know.  A worker on a new
    host must load none of them: each partition replays its changelog from offset 0, and the
    totals are exact."""
    names = Names(unique)
    names.extra = ["--checkpoint-interval", "0.5", "--snapshot-interval", "0"]
    chunks = [list(generate(2500, seed=700 + n, month="2026-11", tenants=15)) for n in range(2)]
    topic = f"{names.jobs}.ledger.snapshots"
    last = _snapshot_and_stop(kafka_settings, names, tmp_path / "host-a", chunks[0])

    def forged(snap: LastSnapshot, index: dict[str, list[int]]) -> Produced:
        return snapshots.CHECKPOINT_KEY, snapshots.checkpoint_doc(snap.checkpoint, index), []

    s = last[0]
    gone = {**s.index, "month:2026-11": [s.end + 1000, *s.index["month:2026-11"][1:]]}
    s1 = last[1]
    swapped = {
        **s1.index,
        "month:2026-11": s1.index["firsts:2026-11"],
        "firsts:2026-11": s1.index["month:2026-11"],
    }
    s3 = last[3]
    future = orjson.loads(snapshots.checkpoint_doc(s3.checkpoint, s3.index))
    future["format"] = snapshots.FORMAT + 1
    asyncio.run(_append(kafka_settings, topic, 0, [forged(s, gone)]))
    asyncio.run(_append(kafka_settings, topic, 1, [forged(s1, swapped)]))
    asyncio.run(
        _append(kafka_settings, topic, 2, [(snapshots.CHECKPOINT_KEY, b"\x00{not json", [])])
    )
    asyncio.run(
        _append(
            kafka_settings,
            topic,
            3,
            [
                (snapshots.CHECKPOINT_KEY, orjson.dumps(future), []),
                (b"month:2026-11/0", b"[]", _previous(s3.end)),  # at s3.end: the line above
            ],
        )
    )

    b = _new_host(kafka_settings, names, tmp_path / "host-b", "b")
    try:
        log = b.log()
        assert "snapshot read from" not in log, log
        assert "local state read" not in log, log
        assert log.count("lacks records of row") == 2, log  # partitions 0 and 1
        # Each partition replayed its whole changelog: every workload-month at least once.
        assert sum(recovered(log)) >= workload_months(chunks[0]), log
        send(kafka_settings, names.jobs, chunks[1])
        everything = chunks[0] + chunks[1]
        wait_usage(kafka_settings, names.usage, expected_usage(everything), workers=[b])
        assert b.health()[0] == 200
        assert "Traceback" not in b.log()
    finally:
        b.close()


def test_a_new_host_survives_snapshot_records_that_lead_nowhere(
    kafka_settings: KafkaSettings, unique: str, tmp_path: Path, is_tansu: bool
) -> None:
    """The last record of a partition of the snapshots topic is (0) a row record whose
    ``meter.snapshot.previous`` header is not an offset, (1) a stray record without key or
    headers (Apache Kafka refuses a keyless record on the compacted topic, so there it has a
    key no snapshot uses), (2) a row record cut short on top of a whole snapshot (records of a
    format this version does not know, as a crash leaves them): that whole one is read, (3) a
    row record whose header leads to another row record, not to a checkpoint.  The worker on a
    new host must neither stop nor load what it cannot use; it says why, and the totals are
    exact."""
    names = Names(unique)
    names.extra = ["--checkpoint-interval", "0.5", "--snapshot-interval", "0"]
    chunks = [list(generate(2500, seed=720 + n, month="2026-11", tenants=15)) for n in range(2)]
    topic = f"{names.jobs}.ledger.snapshots"
    last = _snapshot_and_stop(kafka_settings, names, tmp_path / "host-a", chunks[0])
    row = b"month:2026-11/0"
    if not is_tansu:
        with pytest.raises(KafkaError):
            asyncio.run(_append(kafka_settings, topic, 1, [(None, b"stray", [])]))
    damage: dict[int, list[Produced]] = {
        0: [(row, JUNK, [(snapshots.H_PREVIOUS, b"not-an-offset")])],
        1: [(None if is_tansu else b"stray", b"stray", [])],
        2: [(row, JUNK, _previous(last[2].at)), (b"month:2026-11/1", JUNK, _previous(last[2].at))],
        3: [(row, JUNK, _previous(last[3].index["month:2026-11"][0]))],
    }
    for partition, records in damage.items():
        asyncio.run(_append(kafka_settings, topic, partition, records))

    b = _new_host(kafka_settings, names, tmp_path / "host-b", "b")
    try:
        log = b.log()
        read = sorted(int(p) for p in re.findall(r"home partition (\d): snapshot read from", log))
        assert read == [2], log
        assert "home partition 2: local state read to changelog offset" in log, log
        unusable = re.findall(r"snapshot of home partition (\d) unusable", log)
        assert sorted(int(p) for p in unusable) == [0, 1, 3], log
        send(kafka_settings, names.jobs, chunks[1])
        everything = chunks[0] + chunks[1]
        wait_usage(kafka_settings, names.usage, expected_usage(everything), workers=[b])
        assert b.health()[0] == 200
        assert "Traceback" not in b.log()
    finally:
        b.close()


def test_a_snapshot_row_this_version_cannot_read_is_rebuilt_from_the_changelog(
    kafka_settings: KafkaSettings, unique: str, tmp_path: Path
) -> None:
    """A whole snapshot (rows and checkpoint, the checkpoint matching the changelog) whose first
    row holds a record this version does not read: written by a newer meter before a rollback,
    or by a stray writer.  The worker on a new host must treat it like a corrupt store:
    rebuild that partition from the changelog, go on, and end exact; and so must its restart
    from the state directory it wrote."""
    names = Names(unique)
    names.extra = ["--checkpoint-interval", "0.5", "--snapshot-interval", "0"]
    chunks = [list(generate(2500, seed=740 + n, month="2026-11", tenants=15)) for n in range(2)]
    topic = f"{names.jobs}.ledger.snapshots"
    last = _snapshot_and_stop(kafka_settings, names, tmp_path / "host-a", chunks[0])
    s = last[1]
    first = min(k for k in s.index if k.startswith("firsts:"))  # the row read first
    index = {**s.index, first: [s.end]}  # the record produced just below
    asyncio.run(
        _append(
            kafka_settings,
            topic,
            1,
            [
                (f"{first}/0".encode(), JUNK, _previous(s.at)),
                (snapshots.CHECKPOINT_KEY, snapshots.checkpoint_doc(s.checkpoint, index), []),
            ],
        )
    )

    b = _new_host(kafka_settings, names, tmp_path / "host-b", "b")
    try:
        b.wait_for_log("rebuilding home partition 1 from the changelog")
        send(kafka_settings, names.jobs, chunks[1])
        everything = chunks[0] + chunks[1]
        wait_usage(kafka_settings, names.usage, expected_usage(everything), workers=[b])
        assert b.health()[0] == 200
        assert "Traceback" not in b.log()
        assert b.terminate() == 0
    finally:
        b.close()
    again = _new_host(kafka_settings, names, tmp_path / "host-b", "b2")
    try:
        assert again.log().count("local state read to changelog offset") == 4, again.log()
        assert "Traceback" not in again.log()
    finally:
        again.close()


def _june_closed_and_pruned(
    settings: KafkaSettings, names: Names, tmp_path: Path, seed: int
) -> tuple[list[bytes], dict[str, dict[str, Any]]]:
    """A worker with local state rates June, the clock moves to 3 July (June closes, and
    with ``--prune-after 0`` leaves memory on every partition), and it stops cleanly.
    ``names.extra`` is set for every worker after it.  Returns June's events and finals."""
    clock = tmp_path / "clock"
    clock.write_text("2026-06-20T00:00:00Z")
    names.extra = [
        "--clock", str(clock), "--history-start", "2026-05", "--checkpoint-interval", "0.5",
        "--snapshot-interval", "0", "--prune-after", "0",
    ]  # fmt: skip
    june = list(generate(2000, seed=seed, month="2026-06", tenants=12, workloads=10))
    a = WorkerProcess(
        settings.bootstrap, names, "a", extra=["--state-dir", str(tmp_path / "host-a")]
    )
    try:
        a.wait_for_log("took home partitions")
        send(settings, names.jobs, june)
        wait_usage(settings, names.usage, expected_usage(june), workers=[a])
        clock.write_text("2026-07-03T00:00:01Z")
        wait_until(lambda: a.log().count("2026-06 pruned from memory") == 4, "June pruned")
        assert a.terminate() == 0
    finally:
        a.close()
    return june, finals(settings, names.usage, "2026-06")


def _audit_agrees(bootstrap: str, names: Names, month: str) -> None:
    """``meter audit`` of ``month``: the published totals equal the events rated afresh."""
    audit = meter("audit", "--broker", bootstrap, "--month", month, *audit_args(names))
    assert audit.returncode == 0, audit.stdout.decode() + audit.stderr.decode()
    assert audit_clean(audit.stdout, names), audit.stdout.decode()


def test_a_pruned_month_from_a_snapshot_that_does_not_read_back_is_rebuilt_not_dropped(
    kafka_settings: KafkaSettings, unique: str, tmp_path: Path
) -> None:
    """A new host reads a whole snapshot whose pruned month's row holds a record this version
    does not read (pruned rows are only read when a late event needs them, so nothing shows
    at start).  Late events for that month must still count, as when a local row no longer
    reads back: the partition is rebuilt from the changelog, finals never move, and the audit
    agrees."""
    names = Names(unique)
    june, closed = _june_closed_and_pruned(kafka_settings, names, tmp_path, seed=761)
    late = list(generate(600, seed=762, month="2026-06", tenants=16, workloads=14))
    topic = f"{names.jobs}.ledger.snapshots"
    s = _last_snapshots(kafka_settings, topic)[0]
    assert "2026-06" in s.checkpoint.pruned, s.checkpoint
    index = {**s.index, "month:2026-06": [s.end]}  # the record produced just below
    asyncio.run(
        _append(
            kafka_settings,
            topic,
            0,
            [
                (b"month:2026-06/0", JUNK, _previous(s.at)),
                (snapshots.CHECKPOINT_KEY, snapshots.checkpoint_doc(s.checkpoint, index), []),
            ],
        )
    )

    b = _new_host(kafka_settings, names, tmp_path / "host-b", "b")
    try:
        assert b.log().count("local state read to changelog offset") == 4, b.log()
        send(kafka_settings, names.jobs, late)
        expected = expected_usage(june + late)
        wait_until(  # whichever comes first: the totals, a dead letter, a second rebuild
            lambda: (
                b.metric("meter_internal_errors_total")
                or b.log().count("rebuilding it from the changelog") > 1
                or current_usage(kafka_settings, names.usage) == expected
            ),
            "the late events",
        )
        assert b.metric("meter_internal_errors_total") == 0.0, b.log()
        # Rebuilt once, from the changelog: not from the same snapshot again, and again.
        assert b.log().count("rebuilding it from the changelog") <= 1, b.log()
        wait_usage(kafka_settings, names.usage, expected, workers=[b])
        log = b.log()
        assert "local state of home partition 0: " in log, log
        assert log.count("rebuilding it from the changelog") == 1, log
        assert finals(kafka_settings, names.usage, "2026-06") == closed
        _audit_agrees(kafka_settings.bootstrap, names, "2026-06")
    finally:
        b.close()


def test_a_new_host_leaves_pruned_months_on_the_topic_and_fetches_one_a_late_event_needs(
    kafka_settings: KafkaSettings, unique: str, tmp_path: Path
) -> None:
    """A worker on a new host reads this month's state, not history: the pruned months'
    rows stay on the snapshots topic.  A late event for one fetches that month into local
    state and counts as a correction, exactly; a restart of the new host (from its own
    directory, which knows where the rest is) and a third host that reads the new host's
    snapshot still find it."""
    names = Names(unique)
    june, closed = _june_closed_and_pruned(kafka_settings, names, tmp_path, seed=771)
    late = list(generate(600, seed=772, month="2026-06", tenants=16, workloads=14))
    more = list(generate(600, seed=773, month="2026-06", tenants=16, workloads=16))

    b = _new_host(kafka_settings, names, tmp_path / "host-b", "b")
    try:
        left = [int(n) for n in re.findall(r"(\d+) rows of pruned months left there", b.log())]
        assert len(left) == 4 and sum(left) >= 4, b.log()  # June on every partition, at least
        send(kafka_settings, names.jobs, late)
        wait_usage(kafka_settings, names.usage, expected_usage(june + late), workers=[b])
        assert "month:2026-06 fetched from" in b.log(), b.log()
        assert "rebuilding" not in b.log(), b.log()
        assert b.terminate() == 0
    finally:
        b.close()
    assert finals(kafka_settings, names.usage, "2026-06") == closed  # finals never move

    # The new host again, from its own directory: what it did not fetch, it still knows where
    # to find.  And a third host, from the new host's snapshot.
    again = WorkerProcess(
        kafka_settings.bootstrap, names, "b2", extra=["--state-dir", str(tmp_path / "host-b")]
    )
    try:
        again.wait_for_log("took home partitions")
        send(kafka_settings, names.jobs, more[:300])
        wait_usage(
            kafka_settings, names.usage, expected_usage(june + late + more[:300]), workers=[again]
        )
        assert "rebuilding" not in again.log(), again.log()
        assert again.terminate() == 0
    finally:
        again.close()
    c = _new_host(kafka_settings, names, tmp_path / "host-c", "c")
    try:
        send(kafka_settings, names.jobs, more[300:])
        wait_usage(kafka_settings, names.usage, expected_usage(june + late + more), workers=[c])
        assert "rebuilding" not in c.log(), c.log()
        assert "rows of pruned months left there" in c.log(), c.log()
        _audit_agrees(kafka_settings.bootstrap, names, "2026-06")
    finally:
        c.close()
    assert finals(kafka_settings, names.usage, "2026-06") == closed
