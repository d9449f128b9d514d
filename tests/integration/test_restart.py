"""A restart with months of history: what it reads, and that it publishes nothing new."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from meter.kafka import KafkaSettings
from meter.sim.fleet import generate
from tests.integration.harness import Names, WorkerProcess, expected_usage, read_all, send
from tests.integration.harness import wait_for_usage as wait_usage
from tests.integration.test_month_close import reports, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.brokers("tansu", "kafka")]

#: Counts, in the worker's log, every read of a keyed topic (meter.reports among them).
COUNT_READS = """
import meter.stream.worker as _worker
_read_keyed = _worker.read_keyed
async def _counted(settings, topic, keep, **kw):
    print(f"READ-KEYED {topic}", flush=True)
    return await _read_keyed(settings, topic, keep, **kw)
_worker.read_keyed = _counted
"""

MONTHS = ("2026-06", "2026-07", "2026-08")


def test_a_restart_reads_the_reports_topic_once_whatever_the_months_closed(
    kafka_settings: KafkaSettings, unique: str, tmp_path: Path
) -> None:
    """Three closed months, then a restart: the ledger comes back from the changelog,
    ``meter.reports`` is read once (not once per month or per partition), and since it
    holds every close already, nothing is published to it again."""
    clock = tmp_path / "clock"
    clock.write_text("2026-08-20T00:00:00Z")
    names = Names(unique)
    names.extra = ["--clock", str(clock), "--history-start", "2026-05"]
    events = [
        raw
        for n, month in enumerate(MONTHS)
        for raw in generate(600, seed=90 + n, month=month, tenants=12, workloads=10)
    ]
    first = WorkerProcess(kafka_settings.bootstrap, names, "first")
    try:
        first.wait_for_log("took home partitions")
        send(kafka_settings, names.jobs, events)
        wait_usage(kafka_settings, names.usage, expected_usage(events), workers=[first])
        clock.write_text("2026-09-03T00:00:01Z")  # June, July and August are all due
        for month in MONTHS:
            wait_until(
                lambda m=month: reports(kafka_settings, names.reports).get(f"provider/{m}"),
                f"the provider summary of {month}",
            )
        assert first.terminate() == 0
    finally:
        first.close()
    held = len(read_all(kafka_settings, names.reports))

    again = WorkerProcess(kafka_settings.bootstrap, names, "again", prelude=COUNT_READS)
    try:
        again.wait_for_log("took home partitions", timeout=60)
        time.sleep(3.0)  # past the first close check (every second)
        log = again.log()
        reads = [ln for ln in log.splitlines() if ln == f"READ-KEYED {names.reports}"]
        assert len(reads) == 1, log
        assert len(read_all(kafka_settings, names.reports)) == held  # nothing republished
        wait_usage(kafka_settings, names.usage, expected_usage(events), workers=[again])
    finally:
        again.close()
