"""The changelog's bytes on Apache Kafka's disk over months of history, with and without
``--purge-changelog``, and what a new host then reads.

One Apache Kafka node (the test suite's ``KafkaBroker``, jars from ``deploy/kafka/fetch.sh``),
one worker with ``--state-dir``, a fleet of ``--tenants`` x ``--workloads`` workloads
reporting ``--events`` events every month for ``--months`` months; the clock moves a month
at a time, so each month closes (and, ``--prune-after 0``, leaves memory).  After each month
the changelog's ``.log`` segment bytes on the broker's disk are summed; its segments roll
every ``--segment-ms`` (in production ``segment.bytes``, 1 GiB, or ``segment.ms``, 7 days,
decide when a purged segment leaves the disk: Kafka deletes whole segments only).  At the end
the worker stops and a new host (an empty ``--state-dir``) takes every partition: the seconds
to its state being ready and the changelog entries it replayed.

    python -m bench.bench_purge --months 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.bench_scale import OUT
from meter.kafka import KafkaSettings
from meter.sim.fleet import generate
from tests.integration.harness import Names, WorkerProcess, expected_usage, send
from tests.integration.harness import wait_for_usage as wait_usage
from tests.integration.kafka import KafkaBroker, fetch_libs

PARTITIONS = 4


def months(n: int) -> list[str]:
    return [f"2026-{m:02d}" for m in range(1, n + 1)]


def next_month(month: str) -> str:
    y, m = map(int, month.split("-"))
    return f"{y + m // 12}-{m % 12 + 1:02d}"


async def create(bootstrap: str, names: Names, segment_ms: int) -> None:
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
                        "segment.ms": str(segment_ms),
                    },
                ),
            ]
        )
    finally:
        await admin.close()


def disk_bytes(broker: KafkaBroker, topic: str) -> int:
    assert broker._dir is not None
    return sum(
        f.stat().st_size
        for d in Path(broker._dir.name).glob(f"data-*/{topic}-*")
        for f in d.glob("*.log")
    )


def run(broker: KafkaBroker, purge: bool, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    names = Names(f"bench-purge-{'on' if purge else 'off'}-{int(time.time())}")
    settings = KafkaSettings(bootstrap=broker.bootstrap)
    asyncio.run(create(broker.bootstrap, names, args.segment_ms))
    changelog = f"{names.jobs}.ledger.changelog"
    clock = work / f"clock-{purge}"
    names.extra = [
        "--clock", str(clock), "--checkpoint-interval", "1", "--snapshot-interval", "0",
        "--prune-after", "0", "--history-start", "2025-12",
        *(["--purge-changelog"] if purge else []),
    ]  # fmt: skip
    history = months(args.months)
    clock.write_text(f"{history[0]}-20T00:00:00Z")
    sent: list[bytes] = []
    sizes: list[int] = []
    a = WorkerProcess(broker.bootstrap, names, "a", extra=["--state-dir", str(work / f"a-{purge}")])
    try:
        a.wait_for_log("took home partitions")
        for n, month in enumerate(history):
            clock.write_text(f"{month}-20T00:00:00Z")
            events = list(
                generate(
                    args.events, seed=7, month=month, tenants=args.tenants,
                    workloads=args.workloads, event_seed=100 + n, id_prefix=f"{month}-",
                )
            )  # fmt: skip
            sent += events
            send(settings, names.jobs, events)
            wait_usage(settings, names.usage, expected_usage(sent), workers=[a], timeout=300)
            clock.write_text(f"{next_month(month)}-03T00:00:01Z")  # the month closes
            deadline = time.monotonic() + 60
            while a.log().count(f"{month} pruned from memory") < PARTITIONS:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{month} not pruned:\n{a.log()[-3000:]}")
                time.sleep(0.5)
            time.sleep(3 * args.segment_ms / 1000 + 2)  # a segment rolls, a check deletes
            sizes.append(disk_bytes(broker, changelog))
            print(f"purge={purge} {month}: changelog {sizes[-1]:,} bytes on disk", flush=True)
        assert a.terminate() == 0
    finally:
        a.close()
    started = time.monotonic()
    b = WorkerProcess(broker.bootstrap, names, "b", extra=["--state-dir", str(work / f"b-{purge}")])
    try:
        b.wait_for_log("took home partitions", timeout=300)
        ready = time.monotonic() - started
        log = b.log()
    finally:
        b.close()
    took = re.search(r"took home partitions .*: recovered (\d+) ledger entries in ([\d.]+)s", log)
    assert took is not None, log
    return {
        "purge": purge,
        "changelog_bytes_on_disk_by_month": dict(zip(history, sizes, strict=True)),
        "new_host_ready_s": round(ready, 2),
        "new_host_recovered_entries": int(took.group(1)),
        "new_host_recovery_s": float(took.group(2)),
        "events_per_month": args.events,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--months", type=int, default=6)
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--workloads", type=int, default=50)
    parser.add_argument("--segment-ms", type=int, default=2000)
    args = parser.parse_args()
    settings = {"log.retention.check.interval.ms": "1000", "log.segment.delete.delay.ms": "0"}
    with (
        tempfile.TemporaryDirectory() as tmp,
        KafkaBroker(fetch_libs(), Path(tmp) / "kafka.log", settings=settings) as broker,
    ):
        results = [run(broker, purge, args, Path(tmp)) for purge in (False, True)]
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_purge.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
