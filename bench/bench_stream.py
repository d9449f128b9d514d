"""Benchmark the streaming worker against the embedded (memory-only) broker.

    python -m bench.bench_stream [--events 200000]

1. starts the embedded Tansu broker (memory only: nothing survives the run);
2. loads N generated events into ``meter.jobs``, keyed by tenant_id, with
   ``create_batch``/``send_batch`` per partition (murmur2, as a keyed producer);
3. computes the expected usage with the core (``Rater`` -> ``ledger.usage()``);
4. measures the I/O ceiling: a plain aiokafka consumer reading the topic and
   ``orjson.loads``-ing every value;
5. starts one ``meter worker`` child and times the replay until ``meter.usage``
   equals the expected totals *and* the group's committed offsets reach the end
   of every ``meter.jobs`` partition (usage alone can be final long before the
   last event is read: most events repeat a workload already counted);
6. optionally (``--faust``) times a bare faust-streaming agent on the same topic;
7. measures end-to-end latency with a fresh worker at a paced 2,000 events/s
   where every event adds a new workload (so every event changes a total).

Prints a summary block and writes it to ``bench/out/stream.json``.  Every child
process is stopped at the end (SIGTERM, then SIGKILL), also on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import importlib.util
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner

from meter.broker import EmbeddedBroker
from meter.domain import Rater, UsageRow, load_ratecards
from meter.kafka import KafkaSettings, close_consumer, ensure_topics
from meter.sim.fleet import generate
from meter.stream.config import StreamConfig, Topics
from meter.stream.send import tenant_key
from meter.stream.usage import keep_latest, read_usage, usage_rows

OUT = Path(__file__).parent / "out"
SESSION_TIMEOUT_MS = 6000
FETCH = {
    # The same fetch sizes the worker uses, so the ceiling is comparable.
    "fetch_max_bytes": 64 * 1024 * 1024,
    "max_partition_fetch_bytes": 16 * 1024 * 1024,
    "fetch_max_wait_ms": 100,
}
LATENCY_TOPICS = Topics(
    jobs="bench.latency.jobs",
    usage="bench.latency.usage",
    rejected="bench.latency.rejected",
    by_tenant="bench.latency.jobs.by-tenant",
    changelog="bench.latency.jobs.ledger.changelog",
)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- child processes


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn giving the child SIGKILL if this process dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

    def preexec() -> None:
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG

    return preexec


class Child:
    """A child process whose stderr is copied to a log file and watched for markers."""

    def __init__(self, name: str, cmd: Sequence[str], log_path: Path, markers: Sequence[str]):
        self.name = name
        self.log_path = log_path
        self.marks: dict[str, float] = {}
        self._markers = list(markers)
        self._cond = threading.Condition()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 - one prctl call
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._log: IO[bytes] = log_path.open("wb")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        _CHILDREN.append(self)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            now = time.monotonic()
            self._log.write(raw)
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self.lines.append(line)
                for m in self._markers:
                    if m not in self.marks and m in line:
                        self.marks[m] = now
                self._cond.notify_all()
        self._log.flush()

    async def wait_mark(self, marker: str, limit_s: float) -> float:
        deadline = time.monotonic() + limit_s
        while marker not in self.marks:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before {marker!r}; "
                    f"see {self.log_path}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {marker!r} within {limit_s}s")
            await asyncio.sleep(0.01)
        return self.marks[marker]

    def cpu_seconds(self) -> float:
        """User + system CPU time of the child so far (Linux /proc)."""
        return _cpu_seconds(self.proc.pid)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; reap.  Idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                say(f"{self.name} pid={self.proc.pid} ignored SIGTERM; killing it")
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5.0)
        with contextlib.suppress(ValueError):
            self._log.close()
        if self in _CHILDREN:
            _CHILDREN.remove(self)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


_CHILDREN: list[Child] = []


def _cpu_seconds(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_worker(bootstrap: str, name: str, log_path: Path, extra: Sequence[str] = ()) -> Child:
    cmd = [
        sys.executable,
        "-m",
        "meter",
        "worker",
        "--broker",
        bootstrap,
        "--session-timeout-ms",
        str(SESSION_TIMEOUT_MS),
        *extra,
    ]
    return Child(name, cmd, log_path, ["worker started", "took home partitions"])


# --------------------------------------------------------------------------- loading


@dataclass
class Loaded:
    seconds: float
    ends: dict[int, int]  # partition -> offset after its last record


async def load_events(settings: KafkaSettings, topic: str, lines: list[bytes]) -> Loaded:
    """Produce ``lines`` keyed by tenant_id, one record batch per partition at a time."""
    producer = AIOKafkaProducer(
        **settings.client_kwargs(),
        acks="all",
        max_batch_size=1024 * 1024,
        max_request_size=8 * 1024 * 1024,
    )
    await producer.start()
    try:
        parts = sorted(await producer.partitions_for(topic))
        pick = DefaultPartitioner()
        by_part: dict[int, list[tuple[bytes | None, bytes]]] = defaultdict(list)
        for raw in lines:
            key = tenant_key(raw)
            by_part[pick(key, parts, parts)].append((key, raw))
        t0 = time.perf_counter()
        # Build each partition's batches, then send them round-robin: aiokafka keeps
        # one pending batch per partition, so interleaving keeps every partition busy.
        queues: dict[int, list[Any]] = {}
        for p, msgs in by_part.items():
            batches = []
            batch = producer.create_batch()
            for key, raw in msgs:
                if batch.append(key=key, value=raw, timestamp=None) is None:
                    batches.append(batch)
                    batch = producer.create_batch()
                    if batch.append(key=key, value=raw, timestamp=None) is None:
                        raise RuntimeError(f"a {len(raw)}-byte message does not fit a batch")
            batches.append(batch)
            queues[p] = batches
        sent: list[tuple[int, int, asyncio.Future[Any]]] = []
        while any(queues.values()):
            for p, batches in queues.items():
                if batches:
                    b = batches.pop(0)
                    count = b.record_count()
                    sent.append((p, count, await producer.send_batch(b, topic, partition=p)))
        metas = await asyncio.gather(*(f for _, _, f in sent))
        ends: dict[int, int] = dict.fromkeys(parts, 0)
        for (p, count, _), meta in zip(sent, metas, strict=True):
            ends[p] = max(ends[p], meta.offset + count)
        return Loaded(time.perf_counter() - t0, ends)
    finally:
        await producer.stop()


# --------------------------------------------------------------------------- ceiling


async def io_ceiling(settings: KafkaSettings, topic: str, ends: dict[int, int]) -> float:
    """Seconds for a plain consumer to read and orjson-parse every record of ``topic``."""
    consumer = AIOKafkaConsumer(
        **settings.client_kwargs(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **FETCH,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in ends]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        total = sum(ends.values())
        seen = 0
        loads = orjson.loads
        t0 = time.perf_counter()
        while seen < total:
            batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
            for records in batch.values():
                for rec in records:
                    with contextlib.suppress(orjson.JSONDecodeError):
                        loads(rec.value)
                seen += len(records)
        return time.perf_counter() - t0
    finally:
        await close_consumer(consumer)


# --------------------------------------------------------------------------- replay


class UsageWatch:
    """Follows a usage topic from the start, keeping the highest revision per key."""

    def __init__(self, settings: KafkaSettings, topic: str, partitions: int) -> None:
        self.settings = settings
        self.topic = topic
        self.partitions = partitions
        self.latest: dict[str, dict[str, Any]] = {}
        self.records = 0

    async def run(
        self, on_batch: Callable[[float, list[dict[str, Any]]], bool], stop: asyncio.Event
    ) -> None:
        """Call ``on_batch(arrival, records)`` per fetch until it returns True or ``stop``."""
        consumer = AIOKafkaConsumer(
            **self.settings.client_kwargs(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=20,
        )
        await consumer.start()
        try:
            tps = [TopicPartition(self.topic, p) for p in range(self.partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=50, max_records=10_000)
                now = time.monotonic()
                docs = []
                for records in batch.values():
                    for rec in records:
                        if rec.key is None or rec.value is None:
                            continue
                        doc = orjson.loads(rec.value)
                        keep_latest(self.latest, rec.key.decode(), doc)
                        docs.append(doc)
                self.records += len(docs)
                if on_batch(now, docs):
                    return
        finally:
            await close_consumer(consumer)


async def wait_committed(
    settings: KafkaSettings, group: str, topic: str, ends: dict[int, int], limit_s: float
) -> float:
    """Poll the group's committed offsets until they reach ``ends``; return when."""
    admin = AIOKafkaAdminClient(**settings.client_kwargs())
    await admin.start()
    tps = [TopicPartition(topic, p) for p in ends]
    deadline = time.monotonic() + limit_s
    try:
        while True:
            try:
                got = await admin.list_consumer_group_offsets(group, partitions=tps)
            except Exception as exc:  # noqa: BLE001 - coordinator not there yet: keep polling
                say(f"offset fetch failed ({type(exc).__name__}: {exc}); retrying")
                got = {}
            now = time.monotonic()
            if all(got.get(tp) is not None and got[tp].offset >= ends[tp.partition] for tp in tps):
                return now
            if now > deadline:
                raise TimeoutError(f"group {group} did not commit {ends} within {limit_s}s: {got}")
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


@dataclass
class Replay:
    spawned: float
    started: float  # "worker started" logged (clients up, before the group join)
    home: float  # "took home partitions" logged
    usage_final: float
    committed: float
    usage_records: int
    worker_cpu_s: float  # during the replay: partitions taken -> done
    broker_cpu_s: float
    bench_cpu_s: float
    summary_line: str = ""

    @property
    def done(self) -> float:
        return max(self.usage_final, self.committed)


async def replay(
    settings: KafkaSettings,
    broker_pid: int | None,
    expected: list[UsageRow],
    ends: dict[int, int],
    partitions: int,
    limit_s: float,
    py_spy: str | None,
) -> Replay:
    t = StreamConfig().topics
    worker = start_worker(settings.bootstrap, "worker", OUT / "stream-worker.log")
    spy: subprocess.Popen[bytes] | None = None
    try:
        if py_spy:
            spy = subprocess.Popen(  # noqa: ASYNC220 - starts at once, reaped below
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(worker.proc.pid),
                    "--rate",
                    "250",
                    "--idle",
                    "--format",
                    "raw",
                    "-o",
                    str(OUT / "stream-worker.pyspy.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent(),  # noqa: PLW1509
            )
        stop = asyncio.Event()
        final: list[float] = []
        watch = UsageWatch(settings, t.usage, partitions)

        def on_batch(now: float, _docs: list[dict[str, Any]]) -> bool:
            if usage_rows(watch.latest) == expected:
                final.append(now)
                return True
            return False

        # The usage watcher starts once every offset is committed: following the
        # topic during the replay costs CPU that the worker and broker compete for
        # on a small machine.  Usage can only be final later than that, or within
        # the watcher's catch-up read (a few records), so this errs on the slow side.
        watcher: asyncio.Future[None] | None = None
        committed = asyncio.ensure_future(
            wait_committed(settings, StreamConfig().group_id, t.jobs, ends, limit_s)
        )
        try:
            started = await worker.wait_mark("worker started", 60)
            home = await worker.wait_mark("took home partitions", 60)
            cpu0 = (
                worker.cpu_seconds(),
                _cpu_seconds(broker_pid) if broker_pid else float("nan"),
                time.process_time(),
            )
            say(f"worker took its partitions {home - worker.started:.2f}s after it was spawned")
            done_committed = await committed
            watcher = asyncio.ensure_future(watch.run(on_batch, stop))
            await asyncio.wait_for(watcher, max(1.0, limit_s - (time.monotonic() - home)))
        finally:
            stop.set()
            for task in (watcher, committed):
                if task is None:
                    continue
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        worker_cpu = worker.cpu_seconds() - cpu0[0]
        broker_cpu = (_cpu_seconds(broker_pid) if broker_pid else float("nan")) - cpu0[1]
        bench_cpu = time.process_time() - cpu0[2]
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        worker.stop()
    summary = next((ln for ln in worker.lines if "worker stopped:" in ln), "")
    return Replay(
        spawned=worker.started,
        started=started,
        home=home,
        usage_final=final[0],
        committed=done_committed,
        usage_records=watch.records,
        worker_cpu_s=worker_cpu,
        broker_cpu_s=broker_cpu,
        bench_cpu_s=bench_cpu,
        summary_line=summary.split("worker stopped: ", 1)[-1],
    )


# --------------------------------------------------------------------------- latency


def latency_event(i: int, tenant: str, k: int) -> bytes:
    return orjson.dumps(
        {
            "specversion": "1.0",
            "id": f"lat-{i}",
            "source": f"vbr://{tenant}/vbr-01",
            "type": "meter.job.workload",
            "time": "2026-11-15T10:00:00Z",
            "data": {
                "tenant_id": tenant,
                "workload_id": f"lat-{tenant}-{k:06d}",
                "workload_type": "vm",
                "license": "subscription",
                "result": "success",
                "operation": "backup",
                "job_id": "job-1",
            },
        }
    )


@dataclass
class Latency:
    rate: float
    seconds: float
    sent: int
    latencies: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        xs = sorted(self.latencies)

        def q(p: float) -> float | None:
            return round(xs[min(len(xs) - 1, int(p * len(xs)))] * 1000, 1) if xs else None

        return {
            "rate_target_per_s": self.rate,
            "rate_achieved_per_s": round(self.sent / self.seconds, 1),
            "sent": self.sent,
            "measured": len(xs),
            "p50_ms": q(0.50),
            "p95_ms": q(0.95),
            "p99_ms": q(0.99),
            "max_ms": round(xs[-1] * 1000, 1) if xs else None,
            "mean_ms": round(statistics.fmean(xs) * 1000, 1) if xs else None,
        }


async def latency(
    settings: KafkaSettings, rate: float, seconds: float, tenants: int, partitions: int
) -> Latency:
    topics = LATENCY_TOPICS
    await ensure_topics(settings, StreamConfig(topics=topics).topic_specs())
    worker = start_worker(
        settings.bootstrap,
        "latency worker",
        OUT / "stream-latency-worker.log",
        [
            "--jobs-topic",
            topics.jobs,
            "--usage-topic",
            topics.usage,
            "--rejected-topic",
            topics.rejected,
            "--group",
            "bench-latency",
        ],
    )
    producer = AIOKafkaProducer(**settings.client_kwargs(), acks="all", linger_ms=0)
    stop = asyncio.Event()
    watcher: asyncio.Future[None] | None = None
    try:
        await worker.wait_mark("took home partitions", 60)
        await producer.start()
        names = [f"lat-tenant-{i:04d}" for i in range(tenants)]
        sent_at: dict[tuple[str, int], float] = {}
        seen: dict[str, int] = defaultdict(int)
        result = Latency(rate, seconds, 0)
        total = int(rate * seconds)
        all_seen = asyncio.Event()

        def on_batch(now: float, docs: list[dict[str, Any]]) -> bool:
            for doc in docs:
                tenant, n = doc.get("tenant_id"), doc.get("workloads", 0)
                if not isinstance(tenant, str) or not isinstance(n, int):
                    continue
                for k in range(seen[tenant] + 1, n + 1):
                    result.latencies.append(now - sent_at[tenant, k])
                seen[tenant] = max(seen[tenant], n)
            if len(result.latencies) >= total:
                all_seen.set()
            return False

        watch = UsageWatch(settings, topics.usage, partitions)
        watcher = asyncio.ensure_future(watch.run(on_batch, stop))
        await asyncio.sleep(0.5)  # let the watcher's first fetch settle
        rnd = random.Random(7)
        counts: dict[str, int] = defaultdict(int)
        pending: list[asyncio.Future[Any]] = []
        t0 = time.monotonic()
        i = 0
        while i < total:
            due = min(total, int((time.monotonic() - t0) * rate) + 1)
            while i < due:
                tenant = names[rnd.randrange(tenants)]
                counts[tenant] += 1
                k = counts[tenant]
                value = latency_event(i, tenant, k)
                sent_at[tenant, k] = time.monotonic()
                pending.append(await producer.send(topics.jobs, value, key=tenant.encode()))
                i += 1
            await asyncio.sleep(0.01)
        result.seconds = time.monotonic() - t0
        result.sent = i
        await asyncio.gather(*pending)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_seen.wait(), 15.0)
        return result
    finally:
        stop.set()
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
        with contextlib.suppress(Exception):
            await producer.stop()
        worker.stop()


# --------------------------------------------------------------------------- faust


def faust_child(n: int, bootstrap: str, topic: str, datadir: str) -> None:
    """Run a bare faust agent over ``topic``; print a JSON line once it has seen ``n``."""
    import faust  # noqa: PLC0415 - only in the child

    app = faust.App(
        "bench-faust",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=datadir,
        web_enabled=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
    )
    source = app.topic(topic, key_type=bytes, value_type=bytes, value_serializer="raw")
    state = {"seen": 0, "first": 0.0}

    @app.agent(source)
    async def count(stream: Any) -> None:
        loads = orjson.loads
        async for value in stream:
            if not state["seen"]:
                state["first"] = time.time()
            with contextlib.suppress(orjson.JSONDecodeError):
                loads(value)
            state["seen"] += 1
            if state["seen"] >= n:
                line = {"seen": state["seen"], "first": state["first"], "last": time.time()}
                # faust sends stdout to its log: the result goes to a file, the marker to both.
                _write_json(Path(datadir, "result.json"), line)
                print("FAUST-DONE", flush=True)
                os._exit(0)

    sys.argv = [sys.argv[0], "worker", "--loglevel", "warn", "--without-web"]
    app.main()


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc))


def _read_json(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


async def faust_bench(bootstrap: str, topic: str, n: int, limit_s: float) -> dict[str, Any]:
    datadir = tempfile.mkdtemp(prefix="meter-bench-faust-")
    spawned_wall = time.time()
    child = Child(
        "faust agent",
        [
            sys.executable,
            "-m",
            "bench.bench_stream",
            "--faust-child",
            str(n),
            bootstrap,
            topic,
            datadir,
        ],
        OUT / "stream-faust.log",
        ["FAUST-DONE"],
    )
    try:
        try:
            await child.wait_mark("FAUST-DONE", limit_s)
        except (TimeoutError, RuntimeError) as exc:
            return {"error": str(exc)}
        doc = _read_json(Path(datadir, "result.json"))
        steady = doc["last"] - doc["first"]
        total = doc["last"] - spawned_wall
        return {
            "events": doc["seen"],
            "events_per_s": round(n / steady) if steady > 0 else None,
            "events_per_s_incl_start": round(n / total),
            "seconds": round(steady, 3),
        }
    finally:
        child.stop(10.0)
        shutil.rmtree(datadir, ignore_errors=True)


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> dict[str, Any]:
    OUT.mkdir(exist_ok=True)
    config = StreamConfig()
    t = config.topics
    with EmbeddedBroker(0) as broker:
        say(
            f"embedded broker (Tansu) on {broker.bootstrap}, pid {broker.pid}: MEMORY ONLY, "
            "every topic is gone when this benchmark ends"
        )
        settings = KafkaSettings(bootstrap=broker.bootstrap, client_id="meter-bench")
        parts = await ensure_topics(settings, config.topic_specs())
        n_parts = parts[t.jobs]

        cached = OUT / f"events-{args.events}.jsonl"  # the file bench_rate writes too
        if cached.exists():
            say(f"reading {args.events:,} generated events from {cached}")
            lines = cached.read_bytes().splitlines()
        else:
            say(f"generating {args.events:,} events")
            lines = list(generate(args.events))
            cached.write_bytes(b"".join(raw + b"\n" for raw in lines))
        size = sum(map(len, lines)) / len(lines)

        t0 = time.perf_counter()
        rater = Rater(load_ratecards())
        for raw in lines:
            rater.feed(raw)
        core_s = time.perf_counter() - t0
        expected = rater.ledger.usage()
        tally = rater.tally
        say(
            f"expected usage from the core: {len(expected)} rows, {tally.counted:,} counted "
            f"({len(lines) / core_s:,.0f} events/s in-process)"
        )

        loaded = await load_events(settings, t.jobs, lines)
        say(
            f"loaded {len(lines):,} events into {t.jobs} ({n_parts} partitions) in "
            f"{loaded.seconds:.2f}s: {len(lines) / loaded.seconds:,.0f} msgs/s (send_batch)"
        )
        if sum(loaded.ends.values()) != len(lines):
            raise RuntimeError(f"end offsets {loaded.ends} do not add up to {len(lines)}")

        ceilings = [await io_ceiling(settings, t.jobs, loaded.ends) for _ in range(2)]
        ceiling = len(lines) / min(ceilings)
        say(f"I/O ceiling (plain consumer + orjson.loads): {ceiling:,.0f} events/s")

        timeout = max(120.0, args.events / 2_000)
        say("starting one worker and replaying the topic")
        r = await replay(settings, broker.pid, expected, loaded.ends, n_parts, timeout, args.py_spy)
        check = usage_rows(await read_usage(settings, t.usage))
        if check != expected:
            raise RuntimeError("meter.usage read with read_usage differs from the core's totals")
        worker_rate = len(lines) / (r.done - r.home)
        worker_total = len(lines) / (r.done - r.spawned)
        say(f"worker: {r.summary_line}")

        faust: dict[str, Any] | None = None
        if args.faust:
            say("bare faust-streaming agent over the same topic")
            faust = await faust_bench(broker.bootstrap, t.jobs, len(lines), args.faust_timeout)

        lat = None
        if args.latency_seconds > 0:
            say(
                f"latency: fresh worker, {args.latency_rate:,.0f} events/s for "
                f"{args.latency_seconds:.0f}s, every event a new workload"
            )
            lat = await latency(settings, args.latency_rate, args.latency_seconds, 200, n_parts)

    cmd = "python -m bench.bench_stream" + (
        f" --events {args.events}" if args.events != 200_000 else ""
    )
    return {
        "command": cmd,
        "broker": "embedded Tansu, memory-only storage",
        "cpus": os.cpu_count(),
        "events": len(lines),
        "bytes_per_event": round(size),
        "partitions": n_parts,
        "expected": {
            "usage_rows": len(expected),
            **tally.as_dict(),
        },
        "core_events_per_s": round(len(lines) / core_s),
        "load_msgs_per_s": round(len(lines) / loaded.seconds),
        "ceiling_events_per_s": round(ceiling),
        "ceiling_runs_s": [round(x, 3) for x in ceilings],
        "worker": {
            "events_per_s": round(worker_rate),
            "events_per_s_incl_start": round(worker_total),
            "ratio_to_ceiling": round(worker_rate / ceiling, 3),
            "spawn_to_started_s": round(r.started - r.spawned, 3),
            "spawn_to_partitions_s": round(r.home - r.spawned, 3),
            "partitions_to_done_s": round(r.done - r.home, 3),
            "partitions_to_usage_final_s": round(r.usage_final - r.home, 3),
            "partitions_to_all_committed_s": round(r.committed - r.home, 3),
            "usage_records_seen": r.usage_records,
            "replay_cpu_s": {
                "worker": round(r.worker_cpu_s, 2),
                "broker": round(r.broker_cpu_s, 2),
                "bench_observers": round(r.bench_cpu_s, 2),
            },
            "worker_cpu_utilisation": round(r.worker_cpu_s / (r.done - r.home), 2),
            "worker_summary": r.summary_line,
        },
        "faust_agent": faust,
        "latency": lat.summary() if lat else None,
        "targets": {"worker_events_per_s": 30_000, "p99_ms": 1000},
    }


def render(res: dict[str, Any]) -> str:
    w = res["worker"]
    lat = res["latency"]
    f = res["faust_agent"]
    rows = [
        ("command", res["command"]),
        ("broker", f"{res['broker']}; {res['partitions']} partitions; {res['cpus']} CPUs"),
        (
            "events",
            f"{res['events']:,} ({res['bytes_per_event']} bytes/event; "
            f"{res['expected']['counted']:,} counted, {res['expected']['rejected']:,} rejected)",
        ),
        ("load (send_batch)", f"{res['load_msgs_per_s']:,} msgs/s"),
        ("core, in-process", f"{res['core_events_per_s']:,} events/s"),
        (
            "worker replay",
            f"{w['events_per_s']:,} events/s from partitions taken "
            f"({w['partitions_to_done_s']}s; target >= 30,000)",
        ),
        (
            "worker incl. start",
            f"{w['events_per_s_incl_start']:,} events/s "
            f"(spawn->partitions {w['spawn_to_partitions_s']}s)",
        ),
        ("I/O ceiling", f"{res['ceiling_events_per_s']:,} events/s (aiokafka + orjson.loads)"),
        ("ratio worker/ceiling", f"{w['ratio_to_ceiling']:.2f}"),
        (
            "CPU during replay",
            f"worker {w['replay_cpu_s']['worker']}s ({w['worker_cpu_utilisation']:.0%} of "
            f"the replay's wall time), broker {w['replay_cpu_s']['broker']}s, "
            f"bench observers {w['replay_cpu_s']['bench_observers']}s",
        ),
    ]
    if f is not None:
        if "error" in f:
            rows.append(("faust agent", f"failed: {f['error']}"))
        else:
            rows.append(
                (
                    "faust agent",
                    f"{f['events_per_s']:,} events/s "
                    f"({f['events_per_s_incl_start']:,} incl. start)",
                )
            )
    if lat is not None:
        rows.append(
            (
                "latency",
                f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms "
                f"({lat['measured']:,}/{lat['sent']:,} events at "
                f"{lat['rate_achieved_per_s']:,.0f}/s; target p99 < 1000 ms)",
            )
        )
    width = max(len(k) for k, _ in rows)
    bar = "-" * 72
    return "\n".join([bar, *(f"{k:<{width}}  {v}" for k, v in rows), bar])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--faust-child"]:
        faust_child(int(argv[1]), argv[2], argv[3], argv[4])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--latency-rate", type=float, default=2_000.0)
    p.add_argument(
        "--latency-seconds", type=float, default=20.0, help="0 skips the latency run [20]"
    )
    p.add_argument(
        "--faust",
        action="store_true",
        help="also time a bare faust-streaming agent over the same topic",
    )
    p.add_argument("--faust-timeout", type=float, default=180.0)
    p.add_argument(
        "--py-spy",
        metavar="EXE",
        help="record the replay worker with this py-spy binary "
        "(raw stacks to bench/out/stream-worker.pyspy.txt; slows it down)",
    )
    args = p.parse_args(argv)
    if args.faust and importlib.util.find_spec("faust") is None:
        p.error("--faust needs faust-streaming: pip install -e '.[faust]'")
    try:
        res = asyncio.run(run(args))
    finally:
        for child in list(_CHILDREN):
            child.kill()
            child.stop()
    text = render(res)
    print(text)
    OUT.mkdir(exist_ok=True)
    (OUT / "stream.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"written to {OUT / 'stream.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
