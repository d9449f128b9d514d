"""What a worker on a new host reads of a home partition's snapshot, at a provider's scale.

One home partition of ``--workloads`` workloads a month and ``--months`` months of history is
built through the worker's own code (:func:`bench.bench_scale.step_build`: every month but
the last closed and pruned), its local state is published to a topic of the embedded broker
with :func:`meter.stream.snapshots.publish`, and read back with
:func:`meter.stream.snapshots.read`, as a worker with an empty ``--state-dir`` does.  Printed:
the saved state's size, and the read's rows, bytes, seconds and RSS growth.

    python -m bench.bench_snapshot --workloads 1000000 --months 12
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.bench_scale import OUT, rss_bytes, step_build
from meter.broker import EmbeddedBroker
from meter.store.sqlite import SqliteStore
from meter.stream import snapshots
from meter.stream.snapshots import Published

TOPIC = "bench.ledger.snapshots"


async def publish_and_read(state: Path) -> dict[str, Any]:
    with EmbeddedBroker() as broker:
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(TOPIC, 1, 1)])
        finally:
            await admin.close()
        store = SqliteStore(state).partition("meter.jobs.ledger.changelog", 0)
        keys = set(store.keys())
        saved = sum(len(r) for k in keys for r in store.read(k))
        producer = AIOKafkaProducer(
            bootstrap_servers=broker.bootstrap, max_request_size=4 << 20, linger_ms=5
        )
        await producer.start()
        started = time.perf_counter()
        try:
            await snapshots.publish(producer, TOPIC, 0, store, keys, Published({}))
        finally:
            await producer.stop()
        published_s = time.perf_counter() - started
        consumer = AIOKafkaConsumer(
            bootstrap_servers=broker.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50
        )
        await consumer.start()
        try:
            base = rss_bytes()
            started = time.perf_counter()
            got = await snapshots.read(consumer, TOPIC, 0)
            read_s = time.perf_counter() - started
            grown = rss_bytes() - base
        finally:
            await consumer.stop()
        assert got is not None, "no snapshot read back"
        checkpoint, rows, published = got
        return {
            "saved_rows": len(keys),
            "saved_mib": round(saved / 2**20),
            "publish_s": round(published_s, 2),
            "read_rows": len(rows),
            "read_mib": round(sum(len(r) for v in rows.values() for r in v) / 2**20),
            "left_on_topic": sorted(k for k in published.index if k not in rows),
            "read_s": round(read_s, 2),
            "read_rss_mib": round(grown / 2**20),
            "pruned": list(checkpoint.pruned),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workloads", type=int, default=1_000_000)
    p.add_argument("--months", type=int, default=12)
    p.add_argument("--work", default=str(OUT / "snapshot"), help="scratch directory")
    args = p.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        built = step_build(args.workloads, args.months, str(work / "state"), str(work / "log"))
        result = {"workloads": args.workloads, "months": args.months, **built}
        result.update(asyncio.run(publish_and_read(work / "state")))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
