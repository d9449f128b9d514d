"""Local state (``--state-dir``) on a real broker: a worker SIGKILLed in the middle of a
checkpoint, a deleted or corrupt store, a partition moving to a worker with no local state,
and a pruned month that a late event and the audit still reach."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from meter.kafka import KafkaSettings
from meter.kafka.topics import read_to_end
from meter.sim.fleet import generate
from tests.integration.harness import Names, WorkerProcess, expected_usage, send
from tests.integration.harness import wait_for_usage as wait_usage
from tests.integration.test_month_close import finals, meter, reports, wait_until

pytestmark = pytest.mark.integration

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
        wait_until(
            lambda: len(set(re.findall(r"home partition (\d): state saved at changelog offset "
                                       r"[1-9]", a.log()))) == 4,
            "a whole checkpoint of the first events on every partition",
        )  # fmt: skip
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

    b = WorkerProcess(kafka_settings.bootstrap, names, "b")
    try:
        b.wait_for_log("took home partitions")
        log = b.log()
        assert "local state read to changelog offset" in log, log
        # Only the changelog written since the last whole checkpoint was replayed.
        assert sum(recovered(log)) < workload_months(chunks[0]), log
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
        "--metrics-months", "1",  # else June, the previous month, stays for /metrics
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
        # Partition 0's June no longer reads back as saved (a disk that went bad while the
        # worker ran): the late events must still count, through a rebuild of partition 0.
        db = sqlite3.connect(state / f"jobs-{unique}.ledger.changelog-0.sqlite")
        db.execute("UPDATE records SET raw = CAST('[]' AS BLOB) WHERE key = 'month:2026-06'")
        db.commit()
        db.close()
        send(kafka_settings, names.jobs, late)
        everything = june + late
        wait_usage(kafka_settings, names.usage, expected_usage(everything), workers=[again])
        again.wait_for_log("2026-06 read back from local state")
        log = again.log()
        assert "local state of home partition 0: " in log, log
        assert "rebuilding it from the changelog" in log, log
        assert finals(kafka_settings, names.usage, "2026-06") == closed  # finals never move
        audit = meter("audit", "--broker", bootstrap, "--month", "2026-06",
                      "--jobs-topic", names.jobs, "--usage-topic", names.usage)  # fmt: skip
        assert audit.returncode == 0, audit.stdout.decode() + audit.stderr.decode()
        assert b"0 difference(s)" in audit.stdout
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
