"""Rolling meter workers on Apache Kafka: how long does counting stop?

    python -m bench.bench_roll                 # make bench-roll
    python -m bench.bench_roll --kafka-nodes 1 --rate 200 --seconds 20

One Apache Kafka node (the test suite's ``KafkaBroker``) and two ``meter worker``
processes in one group, each with ``--state-dir``.  A steady stream of events (``--rate``
per second, each a new VM of one of ``--tenants`` tenants) runs the whole time.  After
``--seconds`` of steady counting the workers are rolled one at a time, as an upgrade
does: SIGTERM to worker a, a started again on its state directory, then, once its
``/healthz`` is ready, the same for b.  Then ``--seconds`` more of steady counting.

Measured, per event: the time from its send until ``meter.usage`` shows it counted (its
tenant's record reaches that many workloads).  Printed: that latency's median, p99 and
max before, during and after the roll (the gap is the max during it), each worker's
seconds from SIGTERM to exit and from start to ready, and whether the totals are exact
at the end (``meter.usage`` equals the events sent, no revision goes down).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.bench_scale import OUT
from bench.bench_scrape import event
from meter.kafka import KafkaSettings
from tests.integration.harness import (
    Names,
    WorkerProcess,
    expected_usage,
    read_all,
    revision_faults,
    wait_for_usage,
)
from tests.integration.kafka import KafkaBroker, fetch_libs

MONTH_DAY = "2026-11-20T00:00:00Z"


#: when every event of the roll says it ran (the clock is pinned to the day after)
SESSION = datetime(2026, 11, 19, 12, tzinfo=UTC)


class Stream:
    """Sends events at a steady rate and watches the usage topic count them."""

    def __init__(self, bootstrap: str, names: Names, tenants: int, rate: float) -> None:
        self.bootstrap, self.names, self.tenants, self.rate = bootstrap, names, tenants, rate
        #: (tenant, n) -> monotonic send time; n is the tenant's n-th workload
        self.sent_at: dict[tuple[str, int], float] = {}
        #: (send time, latency) of every counted event
        self.latencies: list[tuple[float, float]] = []
        self.lines: list[bytes] = []
        self._counted: dict[str, int] = {}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=lambda: asyncio.run(self._send()), daemon=True),
            threading.Thread(target=lambda: asyncio.run(self._watch()), daemon=True),
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    async def _send(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            n = 0
            started = time.monotonic()
            while not self._stop.is_set():
                tenant = f"t{n % self.tenants:04d}"
                k = n // self.tenants + 1
                line = event(tenant, f"{tenant}-vm-{k}", k, SESSION)
                self.lines.append(line)
                self.sent_at[(tenant, k)] = time.monotonic()
                await producer.send_and_wait(self.names.jobs, line, key=tenant.encode())
                n += 1
                await asyncio.sleep(max(0.0, started + n / self.rate - time.monotonic()))
        finally:
            await producer.stop()

    async def _watch(self) -> None:
        consumer = AIOKafkaConsumer(
            self.names.usage, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            while not self._stop.is_set():
                batches = await consumer.getmany(timeout_ms=200)
                now = time.monotonic()
                for records in batches.values():
                    for rec in records:
                        doc = orjson.loads(rec.value)
                        tenant, workloads = doc["tenant_id"], int(doc["workloads"])
                        for k in range(self._counted.get(tenant, 0) + 1, workloads + 1):
                            at = self.sent_at.get((tenant, k))
                            if at is not None:
                                self.latencies.append((at, now - at))
                        self._counted[tenant] = max(self._counted.get(tenant, 0), workloads)
        finally:
            await consumer.stop()


def wait_ready(worker: WorkerProcess, timeout: float = 300.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited {worker.proc.returncode}:\n{worker.log()}")
        try:
            if worker.health()[0] == 200:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not ready in {timeout}s:\n{worker.log()[-3000:]}")


def summary(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"events": 0}
    ordered = sorted(latencies)
    return {
        "events": len(ordered),
        "median_s": round(statistics.median(ordered), 3),
        "p99_s": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
        "max_s": round(ordered[-1], 3),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-roll-"))
    with KafkaBroker(fetch_libs(), work / "kafka.log") as broker:
        names = Names(f"bench-roll-{int(time.time())}")
        clock = work / "clock"
        clock.write_text(MONTH_DAY)
        names.extra = ["--clock", str(clock), "--checkpoint-interval", "1"]
        state = {tag: ["--state-dir", str(work / tag)] for tag in ("a", "b")}
        workers = {tag: WorkerProcess(broker.bootstrap, names, tag, extra=state[tag])
                   for tag in ("a", "b")}  # fmt: skip
        stream = Stream(broker.bootstrap, names, args.tenants, args.rate)
        result: dict[str, Any] = {"rate": args.rate, "tenants": args.tenants}
        try:
            for w in workers.values():
                wait_ready(w)
            stream.start()
            time.sleep(args.seconds)
            roll_start = time.monotonic()
            for tag in ("a", "b"):
                stopping = time.monotonic()
                code = workers[tag].terminate()
                result[f"{tag}_stop_s"] = round(time.monotonic() - stopping, 2)
                result[f"{tag}_exit"] = code
                workers[tag] = WorkerProcess(broker.bootstrap, names, f"{tag}2", extra=state[tag])
                result[f"{tag}_ready_s"] = round(wait_ready(workers[tag]), 2)
            roll_end = time.monotonic()
            time.sleep(args.seconds)
            stream.stop()
            settings = KafkaSettings(bootstrap=broker.bootstrap)
            wait_for_usage(settings, names.usage, expected_usage(stream.lines), timeout=120,
                           workers=list(workers.values()))  # fmt: skip
            result["exact"] = True
            result["revision_faults"] = len(revision_faults(read_all(settings, names.usage)))
        finally:
            stream.stop()
            for w in workers.values():
                w.close()
    lat = stream.latencies
    result["roll_s"] = round(roll_end - roll_start, 2)
    result["before"] = summary([d for at, d in lat if at < roll_start])
    result["during"] = summary([d for at, d in lat if roll_start <= at < roll_end])
    result["after"] = summary([d for at, d in lat if at >= roll_end])
    result["sent"] = len(stream.lines)
    result["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0, help="events per second")
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=15.0, help="steady time before/after")
    args = parser.parse_args()
    result = run(args)
    for key, value in result.items():
        print(f"{key:18} {value}")
    OUT.mkdir(exist_ok=True)
    (OUT / "roll.json").write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
