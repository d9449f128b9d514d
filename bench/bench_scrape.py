"""HTTP at a large provider's scale: does serving /metrics and /api/usage stall the worker?

    python -m bench.bench_scrape                       # 200,000 tenants (make bench-scrape)
    python -m bench.bench_scrape --tenants 20000 --events 50000 --seconds 20   # quicker

On the embedded broker, one ``meter worker --status-page`` child:

1. ``--tenants`` tenants with one VM each (this UTC month) are sent and counted; then
   the worker's RSS is read (memory per tenant: against the RSS before any event), and
   ``/metrics`` (size, time; first and again), ``/api/usage?tenant=T`` and a page of
   ``/api/usage?month=M&limit=100`` are timed;
2. ``--events`` more events (new workloads of existing tenants) are sent twice: once with
   nothing else, once with ``--clients`` threads calling ``/metrics`` and ``/api/usage``
   (whole month, one tenant, a page) in a loop the whole time, and a prober calling
   ``/healthz`` every 50 ms.  For each: events per second until all are counted; for the
   loaded one the ``/healthz`` latencies (max, p99), partitions fenced and the ratio of
   the two throughputs (the issue's target: within 10%, ``/healthz`` < 100 ms).

Prints a table and writes ``bench/out/scrape.json``.  Every child is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from meter.broker import EmbeddedBroker
from meter.stream.send import tenant_key

OUT = Path(__file__).parent / "out"
URL_LINE = re.compile(r"Prometheus metrics on (http://[0-9.:]+)/metrics")


def event(tenant: str, workload: str, n: int, at: datetime) -> bytes:
    return orjson.dumps(
        {
            "specversion": "1.0",
            "id": f"{tenant}-{workload}-{n}",
            "source": "vbr://bench",
            "type": "meter.job.workload",
            "time": at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "data": {
                "tenant_id": tenant,
                "workload_id": workload,
                "workload_type": "vm",
                "license": "subscription",
                "result": "success",
            },
        }
    )


async def produce(bootstrap: str, topic: str, items: list[tuple[str, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=512_000)
    await producer.start()
    try:
        futures = [await producer.send(topic, v, key=tenant_key(t)) for t, v in items]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def get(url: str, timeout: float = 60.0) -> tuple[float, bytes]:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback http
        body = resp.read()
    return time.perf_counter() - t, body


def metric(base: str, name: str) -> float:
    _, body = get(f"{base}/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def lag_buckets(base: str) -> dict[float, float]:
    """``le -> count`` of the worker's event-loop lag histogram (a body at most ~10 s old:
    the caller waits that long first)."""
    _, body = get(f"{base}/metrics")
    out = {}
    for line in body.decode().splitlines():
        if line.startswith("meter_event_loop_lag_seconds_bucket{"):
            le = line.split('le="')[1].split('"')[0]
            out[float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_drained(bootstrap: str, deadline: float) -> float:
    """Seconds until the worker's group has committed every ``meter.jobs`` record (it
    commits once the totals that include them are acknowledged): measured on the broker,
    not through the worker's HTTP (whose answers are cached)."""

    async def run() -> float:
        t = time.perf_counter()
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
        await admin.start()
        await consumer.start()
        try:
            tps = [
                TopicPartition("meter.jobs", p)
                for p in consumer.partitions_for_topic("meter.jobs") or ()
            ]
            while time.perf_counter() - t < deadline:
                ends = await consumer.end_offsets(tps)
                try:
                    done = await admin.list_consumer_group_offsets("meter", partitions=tps)
                except Exception:  # noqa: BLE001 - the coordinator not there yet: poll again
                    done = {}
                if tps and all(
                    done.get(tp) is not None and done[tp].offset >= ends[tp] for tp in tps
                ):
                    return time.perf_counter() - t
                await asyncio.sleep(0.2)
        finally:
            await consumer.stop()
            await admin.close()
        raise TimeoutError(f"not all committed within {deadline:.0f}s")

    return asyncio.run(run())


class Load:
    """``clients`` threads scraping and calling the API in a loop, in a child process, and
    a /healthz prober in another (so neither the bench's nor the load's GIL is in the
    latencies measured)."""

    def __init__(self, base: str, month: str, clients: int) -> None:
        self.base, self.month, self.clients = base, month, clients
        self.dir = Path(tempfile.mkdtemp(prefix="bench-scrape-load-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        for role in ("load", "probe"):
            self.procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "bench.bench_scrape",
                        f"--{role}-child",
                        self.base,
                        self.month,
                        str(self.clients),
                        str(self.dir / f"{role}.json"),
                    ]
                )
            )

    def end(self) -> dict[str, Any]:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            proc.wait(180)
        out: dict[str, Any] = {}
        for role in ("load", "probe"):
            out.update(json.loads((self.dir / f"{role}.json").read_text()))
        return out


def child(role: str, base: str, month: str, clients: int, out: Path) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    seen: dict[str, Any] = {"calls": 0, "errors": [], "health": []}

    def client(url: str) -> None:
        while not stop.is_set():
            try:
                get(url, timeout=120)
                seen["calls"] += 1
            except OSError as exc:
                seen["errors"].append(f"{url}: {exc}")

    def probe() -> None:
        while not stop.is_set():
            try:
                seen["health"].append(get(f"{base}/healthz", timeout=30)[0])
            except OSError as exc:
                seen["errors"].append(f"healthz: {exc}")
            time.sleep(0.05)

    urls = [
        f"{base}/metrics",
        f"{base}/api/usage?month={month}",
        f"{base}/api/usage?month={month}&tenant=t000042",
        f"{base}/api/usage?month={month}&limit=100&offset=5000",
    ]
    if role == "probe":
        threads = [threading.Thread(target=probe, daemon=True)]
    else:
        threads = [
            threading.Thread(target=client, args=(urls[i % len(urls)],), daemon=True)
            for i in range(clients)
        ]
    for th in threads:
        th.start()
    while not stop.is_set():
        stop.wait(0.2)
    for th in threads:
        th.join(130)
    if role == "probe":
        out.write_text(json.dumps({"health": seen["health"], "probe_errors": seen["errors"][:5]}))
    else:
        out.write_text(json.dumps({"calls": seen["calls"], "load_errors": seen["errors"][:5]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--tenants", type=int, default=200_000)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--load-child", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--probe-child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    for role in ("load", "probe"):
        spec = getattr(a, f"{role}_child")
        if spec:
            base, month, clients, out = spec
            child(role, base, month, int(clients), Path(out))
            return
    now = datetime.now(UTC)
    month = now.strftime("%Y-%m")
    at = max(now - timedelta(hours=1), now.replace(day=1, hour=0, minute=0, second=0))
    broker = EmbeddedBroker(0).start()
    log = Path(tempfile.mkdtemp(prefix="bench-scrape-")) / "worker.log"
    command = [sys.executable, "-m", "meter", "worker", "--broker", broker.bootstrap,
               "--status-page", "--http-port", "0", "--http-host", "127.0.0.1"]  # fmt: skip
    with log.open("w") as sink:
        worker = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    result: dict[str, Any] = {"tenants": a.tenants, "events": a.events, "clients": a.clients}
    try:
        base = None
        for _ in range(600):
            m = URL_LINE.search(log.read_text())
            if m:
                base = m[1]
                break
            time.sleep(0.1)
        assert base is not None, log.read_text()[-2000:]
        for _ in range(600):
            try:
                if get(f"{base}/healthz")[0] >= 0 and b'"ready": true' in get(f"{base}/healthz")[1]:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        rss0 = rss_mb(worker.pid)
        tenants = [f"t{i:06d}" for i in range(a.tenants)]
        first = [(t, event(t, "vm-0", 0, at)) for t in tenants]
        t0 = time.perf_counter()
        asyncio.run(produce(broker.bootstrap, "meter.jobs", first))
        wait_drained(broker.bootstrap, a.timeout)
        result["first_load_s"] = round(time.perf_counter() - t0, 1)
        time.sleep(3)  # the usage records reach the status page's view
        result["rss_mb"] = round(rss_mb(worker.pid), 1)
        result["kb_per_tenant"] = round((result["rss_mb"] - rss0) * 1024 / a.tenants, 2)
        took, body = get(f"{base}/metrics")
        result["metrics_first_s"] = round(took, 3)
        result["metrics_bytes"] = len(body)
        time.sleep(1.1)
        result["metrics_again_s"] = round(get(f"{base}/metrics")[0], 3)
        result["provider_points"] = metric(base, "meter_provider_points")
        result["api_tenant_s"] = round(get(f"{base}/api/usage?month={month}&tenant=t000042")[0], 4)
        result["api_page_first_s"] = round(get(f"{base}/api/usage?month={month}&limit=100")[0], 3)
        result["api_page_again_s"] = round(get(f"{base}/api/usage?month={month}&limit=100")[0], 3)
        fenced0 = metric(base, "meter_partitions_fenced_total")
        for run, load in (("quiet", None), ("loaded", Load(base, month, a.clients))):
            time.sleep(12)  # the cached /metrics body expires
            lag0 = lag_buckets(base)
            batch = [
                (tenants[i % a.tenants], event(tenants[i % a.tenants], f"{run}-{i}", i, at))
                for i in range(a.events)
            ]
            if load is not None:
                load.start()
            t = time.perf_counter()
            asyncio.run(produce(broker.bootstrap, "meter.jobs", batch))
            wait_drained(broker.bootstrap, a.timeout)
            took = time.perf_counter() - t
            result[f"{run}_events_per_s"] = round(a.events / took)
            if load is not None:
                load_seen = load.end()
            time.sleep(12)
            lag1 = lag_buckets(base)
            total = lag1[float("inf")] - lag0[float("inf")]
            for le in (0.1, 1.0):
                over = total - (lag1[le] - lag0[le])
                result[f"{run}_loop_lag_over_{le:g}s"] = f"{over:.0f} of {total:.0f} ticks"
            if load is not None:
                seen = load_seen
                h = sorted(seen["health"])
                result["healthz_max_ms"] = round(1000 * h[-1], 1)
                result["healthz_p99_ms"] = round(1000 * h[int(0.99 * (len(h) - 1))], 1)
                result["healthz_median_ms"] = round(1000 * statistics.median(h), 1)
                result["healthz_probes"] = len(h)
                result["scrape_and_api_calls"] = seen["calls"]
                result["http_errors"] = seen["load_errors"] + seen["probe_errors"]
        result["fenced_during_run"] = metric(base, "meter_partitions_fenced_total") - fenced0
        result["throughput_loaded_vs_quiet"] = round(
            result["loaded_events_per_s"] / result["quiet_events_per_s"], 3
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
        broker.stop()
        log.unlink()
    OUT.mkdir(exist_ok=True)
    (OUT / "scrape.json").write_text(json.dumps(result, indent=2) + "\n")
    width = max(map(len, result))
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
