"""Benchmark the streaming worker against the embedded (memory-only) broker.

    python -m bench.bench_stream                                  # today's profile
    python -m bench.bench_stream --profile today --profile provider-1m   # make bench-stream
    python -m bench.bench_stream --profile provider-3m --baseline /tmp/prev  # vs another build

Profiles (each generated deterministically, cached in ``bench/out``):

- ``today``: ``--events`` (200,000) events of 200 tenants x 50 workloads (10,000
  distinct workloads, 93% of events repeat one already counted), as the shipped
  benchmarks always had;
- ``provider-1m`` / ``provider-3m``: a provider's month, 1 M / 3 M distinct workloads
  over 5,000 tenants (Pareto-sized: a few with tens of thousands of workloads, most with
  tens), each workload backed up on ~3 days of the month (geometric), events in time
  order, 2% redeliveries, 5% failed sessions, a few time zones; ~3 M / ~9 M events.

Per profile:

1. loads the events into its own jobs topic on the embedded Tansu broker (memory only:
   nothing survives the run), keyed by tenant_id (murmur2, as a keyed producer);
2. computes the expected usage with the core (``Rater`` -> ``ledger.usage()``);
3. measures the I/O ceiling: a plain aiokafka consumer reading the topic and
   ``orjson.loads``-ing every value (best of two);
4. starts one ``meter worker`` child and times the replay until its usage topic equals
   the expected totals *and* the group's committed offsets reach the end of every jobs
   partition; CPU µs per event, and RSS once the worker is idle;
5. stops it (SIGTERM) and starts it again: restart to ready (ledger recovered from the
   changelog) and RSS once idle, against the live one's;
6. with ``--baseline DIR``, steps 4-5 again for the build checked out in DIR (run with
   ``PYTHONPATH=DIR`` from ``DIR``) on a second copy of the same events, in the same run.

Then optionally (``--faust``) a bare faust-streaming agent on today's topic, and
end-to-end latency with a fresh worker at a paced 2,000 events/s where every event adds
a new workload.  Prints a table and writes it to ``bench/out/stream.json``.  Every child
process is stopped at the end (SIGTERM, then SIGKILL), also on errors.  Run wall-clock
benchmarks one at a time on a shared machine (``flock /tmp/bench.lock ...``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import importlib.util
import json
import logging
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner, murmur2
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.structs import ConsumerRecord, RecordMetadata

from bench.profiles import Profile, events_file, profiles
from meter.broker import EmbeddedBroker
from meter.domain import Rater, UsageRow, load_ratecards
from meter.kafka import KafkaSettings, close_consumer, ensure_topics, iter_to_end
from meter.stream.config import StreamConfig, Topics
from meter.stream.send import tenant_key
from meter.stream.usage import keep_latest, usage_rows

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


# --------------------------------------------------------------------------- profiles


def read_lines(path: Path, chunk_bytes: int = 64 << 20) -> Iterator[bytes]:
    """The file's lines, read in chunks (a provider profile does not fit in memory twice)."""
    rest = b""
    with path.open("rb") as f:
        while block := f.read(chunk_bytes):
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            yield from lines
    if rest:
        yield rest


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, KiB."""
    rss = hwm = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


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

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        log_path: Path,
        markers: Sequence[str],
        build: str | None = None,
    ) -> None:
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
            cwd=build,
            env=None if build is None else {**os.environ, "PYTHONPATH": build},
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


def start_worker(
    bootstrap: str,
    name: str,
    log_path: Path,
    extra: Sequence[str] = (),
    build: str | None = None,
    cprofile: Path | None = None,
) -> Child:
    """A ``meter worker`` child; ``build``: a checkout to run instead (PYTHONPATH, cwd);
    ``cprofile``: write cProfile's stats of the whole run there."""
    profile = ["-m", "cProfile", "-o", str(cprofile)] if cprofile else []
    cmd = [
        sys.executable,
        *profile,
        "-m",
        "meter",
        "worker",
        "--broker",
        bootstrap,
        "--session-timeout-ms",
        str(SESSION_TIMEOUT_MS),
        *extra,
    ]
    return Child(name, cmd, log_path, ["worker started", "took home partitions"], build=build)


# --------------------------------------------------------------------------- loading


@dataclass
class Loaded:
    events: int
    seconds: float
    ends: dict[int, int]  # partition -> offset after its last record


async def load_events(settings: KafkaSettings, topic: str, path: Path) -> Loaded:
    """Produce the file's lines keyed by tenant_id, a record batch per partition at a time.

    Streams the file: one open batch per partition, at most a few dozen in flight."""
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
        keys: dict[bytes, bytes | None] = {}  # tenant key of a line's tenant, shared
        where: dict[bytes | None, int] = {}
        open_batches: dict[int, Any] = {}
        counts: dict[int, int] = dict.fromkeys(parts, 0)
        sent: list[tuple[int, int, asyncio.Future[Any]]] = []
        metas: list[tuple[int, int, Any]] = []
        events = 0
        t0 = time.perf_counter()

        async def ship(p: int) -> None:
            b = open_batches.pop(p)
            sent.append((p, b.record_count(), await producer.send_batch(b, topic, partition=p)))
            if len(sent) >= 32:
                done = await asyncio.gather(*(f for _, _, f in sent))
                metas.extend((p, n, m) for (p, n, _), m in zip(sent, done, strict=True))
                sent.clear()

        for raw in read_lines(path):
            if not raw:
                continue
            events += 1
            key = tenant_key(raw)
            if key is not None:
                key = keys.setdefault(key, key)
            p = where.get(key)
            if p is None:
                p = where[key] = pick(key, parts, parts)
            batch = open_batches.get(p)
            if batch is None:
                batch = open_batches[p] = producer.create_batch()
            if batch.append(key=key, value=raw, timestamp=None) is None:
                await ship(p)
                batch = open_batches[p] = producer.create_batch()
                if batch.append(key=key, value=raw, timestamp=None) is None:
                    raise RuntimeError(f"a {len(raw)}-byte message does not fit a batch")
            counts[p] += 1
        for p in list(open_batches):
            await ship(p)
        done = await asyncio.gather(*(f for _, _, f in sent))
        metas.extend((p, n, m) for (p, n, _), m in zip(sent, done, strict=True))
        ends: dict[int, int] = dict.fromkeys(parts, 0)
        for p, count, meta in metas:
            ends[p] = max(ends[p], meta.offset + count)
        if ends != counts:
            raise RuntimeError(f"end offsets {ends} are not the counts loaded {counts}")
        return Loaded(events, time.perf_counter() - t0, ends)
    finally:
        await producer.stop()


def expected_usage(path: Path) -> tuple[list[UsageRow], dict[str, int], float, int]:
    """The core's usage of the file (rows, tally, seconds, distinct workloads counted)."""
    t0 = time.perf_counter()
    rater = Rater(load_ratecards())
    feed = rater.feed
    for raw in read_lines(path):
        if raw:
            feed(raw)
    seconds = time.perf_counter() - t0
    rows = rater.ledger.usage()
    distinct = len(rater.ledger)
    tally = rater.tally.as_dict()
    del rater, feed
    gc.collect()
    return rows, tally, seconds, distinct


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


async def usage_final_at(
    settings: KafkaSettings, topic: str, expected: list[UsageRow]
) -> tuple[float, int]:
    """When ``topic`` first held the ``expected`` totals (wall-clock seconds, from the
    records' timestamps), and how many records it holds.  Per tenant-month the revision
    grows with every change, so the first record with the final revision is the moment
    that tenant-month became final; the topic's totals were final at the latest of them."""
    latest: dict[str, dict[str, Any]] = {}
    first: dict[str, tuple[int, int]] = {}  # key -> (highest revision, first timestamp ms)
    n = 0
    async for rec in iter_to_end(settings, topic, max_seconds=600):
        if rec.key is None or not rec.value:
            continue
        doc = orjson.loads(rec.value)
        key = rec.key.decode()
        keep_latest(latest, key, doc)
        n += 1
        rev = doc.get("revision", -1)
        held = first.get(key)
        if held is None or rev > held[0]:
            first[key] = (rev, rec.timestamp)
    if usage_rows(latest) != expected:
        raise RuntimeError(f"{topic} does not hold the core's totals")
    return max(ts for _, ts in first.values()) / 1000, n


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
    #: KiB once the worker is idle after the replay: (VmRSS, VmHWM)
    rss_live: tuple[int, int] = (0, 0)
    #: after a restart (the ledger recovered from the changelog), once idle
    rss_restarted: tuple[int, int] = (0, 0)
    restart_to_ready_s: float = 0.0
    recovery_line: str = ""

    @property
    def done(self) -> float:
        return max(self.usage_final, self.committed)


async def settle(child: Child, quiet_s: float = 1.0, limit_s: float = 60.0) -> None:
    """Wait until ``child`` uses (almost) no CPU for ``quiet_s``."""
    deadline = time.monotonic() + limit_s
    last = child.cpu_seconds()
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet_s)
        now = child.cpu_seconds()
        if now - last < 0.05 * quiet_s:
            return
        last = now


def bench_topics(prefix: str) -> Topics:
    jobs, usage, lic = f"{prefix}.jobs", f"{prefix}.usage", f"{prefix}.license"
    return Topics(
        jobs=jobs,
        usage=usage,
        rejected=f"{prefix}.rejected",
        by_tenant=f"{jobs}.by-tenant",
        changelog=f"{jobs}.ledger.changelog",
        reports=f"{prefix}.reports",
        corrections=f"{usage}.corrections",
        license=lic,
        license_corrections=f"{lic}.corrections",
    )


#: ``--state-dir``: the workers keep local state under it, one directory per group.
STATE_DIR: list[Path] = []


def worker_args(t: Topics, group: str) -> list[str]:
    state = ["--state-dir", str(STATE_DIR[0] / group)] if STATE_DIR else []
    return [*state,
        "--jobs-topic", t.jobs,
        "--usage-topic", t.usage,
        "--rejected-topic", t.rejected,
        "--reports-topic", t.reports,
        "--license-topic", t.license,
        "--group", group,
        "--http-port", "-1",
    ]  # fmt: skip


async def replay(
    settings: KafkaSettings,
    broker_pid: int | None,
    t: Topics,
    group: str,
    expected: list[UsageRow],
    ends: dict[int, int],
    partitions: int,
    limit_s: float,
    py_spy: str | None,
    build: str | None,
    tag: str,
    cprofile: bool = False,
) -> Replay:
    args = worker_args(t, group)
    worker = start_worker(
        settings.bootstrap,
        f"worker ({tag})",
        OUT / f"stream-worker-{tag}.log",
        args,
        build,
        OUT / f"stream-worker-{tag}.prof" if cprofile else None,
    )
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
                    str(OUT / f"stream-worker-{tag}.pyspy.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent(),  # noqa: PLW1509
            )
        # Nothing follows the usage topic during the replay (a reader costs CPU that the
        # worker and broker compete for on a small machine): once every offset is
        # committed, the topic is read to its end, untimed, and the moment the totals
        # became final is taken from the records' own timestamps.
        committed = asyncio.ensure_future(wait_committed(settings, group, t.jobs, ends, limit_s))
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
        finally:
            committed.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await committed
        await settle(worker)  # its last usage records go out, then it idles
        worker_cpu = worker.cpu_seconds() - cpu0[0]
        broker_cpu = (_cpu_seconds(broker_pid) if broker_pid else float("nan")) - cpu0[1]
        bench_cpu = time.process_time() - cpu0[2]
        rss_live = rss_kib(worker.proc.pid)
        final_wall, records = await usage_final_at(settings, t.usage, expected)
        final = final_wall - (time.time() - time.monotonic())
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
    result = Replay(
        spawned=worker.started,
        started=started,
        home=home,
        usage_final=final,
        committed=done_committed,
        usage_records=records,
        worker_cpu_s=worker_cpu,
        broker_cpu_s=broker_cpu,
        bench_cpu_s=bench_cpu,
        summary_line=summary.split("worker stopped: ", 1)[-1],
        rss_live=rss_live,
    )
    say(f"restarting the worker ({tag}): its ledger comes back from the changelog")
    again = start_worker(
        settings.bootstrap, f"worker ({tag}, restarted)", OUT / f"stream-worker-{tag}-2.log",
        args, build,
    )  # fmt: skip
    try:
        ready = await again.wait_mark("took home partitions", max(120.0, limit_s))
        result.restart_to_ready_s = ready - again.started
        await settle(again)
        result.rss_restarted = rss_kib(again.proc.pid)
    finally:
        again.stop()
    result.recovery_line = next((ln for ln in again.lines if "took home partitions" in ln), "")
    return result


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


# --------------------------------------------------------------------------- hot path


class _AckedProducer:
    """A producer whose every write is acknowledged at once (offsets counted per partition)."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self.ends: dict[tuple[str, int], int] = defaultdict(int)
        self.records = 0

    def _done(self, topic: str, partition: int, n: int) -> asyncio.Future[Any]:
        offset = self.ends[(topic, partition)]
        self.ends[(topic, partition)] = offset + n
        self.records += n
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(RecordMetadata(topic, partition, TopicPartition(topic, partition),
                                      offset, -1, 0, 0))  # fmt: skip
        return fut

    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   partition: int | None = None, **_: Any) -> asyncio.Future[Any]:  # fmt: skip
        if partition is None:
            partition = (murmur2(key) & 0x7FFFFFFF) % self.partitions if key else 0
        return self._done(topic, partition, 1)

    async def send_and_wait(self, *args: Any, **kw: Any) -> Any:
        return await (await self.send(*args, **kw))

    def create_batch(self) -> Any:
        return BatchBuilder(1 << 20, 0)

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> asyncio.Future[Any]:
        batch.close()
        return self._done(topic, partition, batch.record_count())

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(self.partitions))


class _Fetched:
    """A consumer that has read everything already and is always behind (a replay)."""

    def __init__(self, topics: Topics, partitions: int) -> None:
        self.tps = {TopicPartition(t, n) for t in (topics.jobs, topics.by_tenant)
                    for n in range(partitions)}  # fmt: skip

    def assignment(self) -> set[TopicPartition]:
        return self.tps

    def highwater(self, tp: TopicPartition) -> int:
        return 1 << 40

    def seek(self, tp: TopicPartition, offset: int) -> None:
        pass

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        pass

    def paused(self) -> set[TopicPartition]:
        return set()

    async def position(self, tp: TopicPartition) -> int:
        return 0


def _fetches(path: Path, limit: int, topic: str, partitions: int, size: int = 10_000) -> Iterator[
    dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
]:  # fmt: skip
    """The file's first ``limit`` events as getmany gives them: keyed by tenant, by partition."""
    offsets = [0] * partitions
    homes: dict[bytes | None, int] = {}
    batch: dict[int, list[ConsumerRecord[bytes, bytes]]] = defaultdict(list)
    count = 0
    for n, raw in enumerate(read_lines(path)):
        if n >= limit:
            break
        if not raw:
            continue
        key = tenant_key(raw)
        p = homes.get(key)
        if p is None:
            p = homes[key] = (murmur2(key) & 0x7FFFFFFF) % partitions if key else 0
        batch[p].append(ConsumerRecord(topic, p, offsets[p], 1_700_000_000_000 + n, 0, key,
                                       raw, None, 0, len(raw), ()))  # fmt: skip
        offsets[p] += 1
        count += 1
        if count >= size:
            yield {TopicPartition(topic, q): recs for q, recs in sorted(batch.items())}
            batch, count = defaultdict(list), 0
    if batch:
        yield {TopicPartition(topic, q): recs for q, recs in sorted(batch.items())}


def hot_path(profile: Profile, limit: int, state: int, flush_every: int, work: bool) -> None:
    """The worker's own code over one profile's events, without Kafka: fetched records
    in, writes acknowledged at once; ``state`` workloads already in the ledgers.  For
    instruction counts, run it under callgrind twice, with and without ``--no-work``
    (which does everything but the processing), and divide the difference by the events.
    """
    from meter.stream.partition import HomePartition  # noqa: PLC0415
    from meter.stream.worker import Worker  # noqa: PLC0415

    logging.getLogger("meter").setLevel(logging.ERROR)  # rejections are expected here
    path = events_file(profile)
    config = StreamConfig(close_grace=None)
    partitions = config.partitions
    w = Worker(KafkaSettings(bootstrap="127.0.0.1:1"), config, load_ratecards())
    w.connecting = ""
    w.lease.granted(1)
    w.lease.ttl = float("inf")
    for n in range(partitions):
        hp = w.homes[n] = HomePartition(n, w.cards.height)
        hp.begin_recovery()
        hp.recovered(0)
    rate = (5, "vcsp-2026", "subscription")
    # Straight into the ledgers (the license view joins the calendar), in a month before
    # the profile's, so that they only make the ledgers bigger.
    for i in range(state):
        w.homes[i % partitions].license.add(
            f"state-{i % 5000:05d}", "2026-08", "vm", f"state-{i:09d}", rate
        )
    w._consumer = _Fetched(config.topics, partitions)
    producer = _AckedProducer(partitions)
    w._producer = producer
    fetches = list(_fetches(path, limit, config.topics.jobs, partitions))
    events = sum(len(r) for f in fetches for r in f.values())
    gc.collect()
    gc.freeze()

    async def replay() -> None:
        stop = asyncio.Event()
        for n, fetched in enumerate(fetches, 1):
            await w._process(fetched, stop)
            gc.freeze()  # as the worker's loop does after each batch
            if n % flush_every == 0:
                await w._flush()
        drain = getattr(w, "_drain", None)  # builds before the pipeline settle in _process
        if drain is not None:
            await drain()
        await w._flush()

    cpu = time.process_time()
    if work:
        asyncio.run(replay())
    cpu = time.process_time() - cpu
    print(
        f"hot path, {profile.name}: {events:,} events on {state:,} workloads already held, "
        f"a flush every {flush_every} batches of 10,000: {cpu:.2f}s CPU "
        f"({cpu / events * 1e6:.2f} µs/event); {producer.records:,} records written; "
        f"{sum(len(h.ledger) for h in w.homes.values()):,} ledger entries"
        + ("" if work else " (--no-work: loading only)")
    )


# --------------------------------------------------------------------------- main


async def run_profile(
    settings: KafkaSettings,
    broker_pid: int | None,
    profile: Profile,
    args: argparse.Namespace,
) -> dict[str, Any]:
    path = events_file(profile)
    say(f"[{profile.name}] expected usage from the core (meter rate's Rater) over {path}")
    expected, tally, core_s, distinct = expected_usage(path)
    say(
        f"[{profile.name}] {len(expected)} usage rows, {distinct:,} distinct workloads, "
        f"{tally['counted']:,} counted"
    )
    builds: list[tuple[str, str | None]] = [("now", None)]
    if args.baseline:
        builds.insert(0, ("base", args.baseline))  # the previous build first, then this one
    out: dict[str, Any] = {
        "profile": profile.name,
        "what": profile.what,
        "distinct_workloads": distinct,
        "expected": {"usage_rows": len(expected), **tally},
        "core_events_per_s": None,
        "builds": {},
    }
    loads: dict[str, Loaded] = {}
    for tag, _ in builds:
        t = bench_topics(f"bench.{profile.name}.{tag}")
        parts = await ensure_topics(settings, StreamConfig(topics=t).topic_specs())
        loaded = loads[tag] = await load_events(settings, t.jobs, path)
        say(
            f"[{profile.name}] loaded {loaded.events:,} events into {t.jobs} ({parts[t.jobs]} "
            f"partitions) in {loaded.seconds:.1f}s: {loaded.events / loaded.seconds:,.0f} msgs/s"
        )
    n_events = loads["now"].events
    out["events"] = n_events
    out["bytes_per_event"] = round(path.stat().st_size / n_events) - 1
    out["core_events_per_s"] = round(n_events / core_s)
    out["load_msgs_per_s"] = round(n_events / loads["now"].seconds)
    jobs_now = bench_topics(f"bench.{profile.name}.now").jobs
    ceilings = [await io_ceiling(settings, jobs_now, loads["now"].ends) for _ in range(2)]
    ceiling = n_events / min(ceilings)
    out["ceiling_events_per_s"] = round(ceiling)
    out["ceiling_runs_s"] = [round(x, 3) for x in ceilings]
    say(f"[{profile.name}] raw consumer (aiokafka + orjson.loads): {ceiling:,.0f} events/s")
    timeout = max(120.0, n_events / 2_000)
    for tag, build in builds:
        t = bench_topics(f"bench.{profile.name}.{tag}")
        say(f"[{profile.name}] one worker ({build or 'this build'}) replays {t.jobs}")
        r = await replay(
            settings,
            broker_pid,
            t,
            f"bench.{profile.name}.{tag}",
            expected,
            loads[tag].ends,
            len(loads[tag].ends),
            timeout,
            args.py_spy,
            build,
            f"{profile.name}-{tag}",
            args.cprofile,
        )
        rate = n_events / (r.done - r.home)
        out["builds"][tag] = {
            "build": build or "this build",
            "events_per_s": round(rate),
            "events_per_s_incl_start": round(n_events / (r.done - r.spawned)),
            "ratio_to_ceiling": round(rate / ceiling, 3),
            "cpu_us_per_event": round(r.worker_cpu_s / n_events * 1e6, 2),
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
            "rss_live_mib": round(r.rss_live[0] / 1024),
            "peak_rss_live_mib": round(r.rss_live[1] / 1024),
            "rss_restarted_mib": round(r.rss_restarted[0] / 1024),
            "peak_rss_restarted_mib": round(r.rss_restarted[1] / 1024),
            "restart_to_ready_s": round(r.restart_to_ready_s, 2),
            "recovery_s": _recovery_seconds(r.recovery_line),
            "recovery": r.recovery_line.split("took home partitions ", 1)[-1],
            "worker_summary": r.summary_line,
        }
        say(f"[{profile.name}] worker ({tag}): {json.dumps(out['builds'][tag])}")
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    OUT.mkdir(exist_ok=True)
    known = profiles(args.events)
    chosen = [known[name] for name in args.profile or ["today"]]
    with EmbeddedBroker(0) as broker:
        say(
            f"embedded broker (Tansu) on {broker.bootstrap}, pid {broker.pid}: MEMORY ONLY, "
            "every topic is gone when this benchmark ends"
        )
        settings = KafkaSettings(bootstrap=broker.bootstrap, client_id="meter-bench")
        results = [await run_profile(settings, broker.pid, p, args) for p in chosen]

        faust: dict[str, Any] | None = None
        if args.faust:
            topic = bench_topics(f"bench.{chosen[0].name}.now").jobs
            say(f"bare faust-streaming agent over {topic}")
            faust = await faust_bench(
                broker.bootstrap, topic, results[0]["events"], args.faust_timeout
            )

        lat = None
        if args.latency_seconds > 0:
            say(
                f"latency: fresh worker, {args.latency_rate:,.0f} events/s for "
                f"{args.latency_seconds:.0f}s, every event a new workload"
            )
            lat = await latency(settings, args.latency_rate, args.latency_seconds, 200, 4)

    return {
        "command": "python -m bench.bench_stream " + " ".join(args.argv),
        "broker": "embedded Tansu, memory-only storage",
        "cpus": os.cpu_count(),
        "profiles": results,
        "faust_agent": faust,
        "latency": lat.summary() if lat else None,
        "targets": {"worker_events_per_s": 30_000, "p99_ms": 1000, "ratio_to_ceiling": 0.8},
    }


def _recovery_seconds(line: str) -> float | None:
    """The seconds in the worker's "took home partitions ...: recovered N ledger entries
    in X.XXs" line: reading the changelog (the rest of a restart is the group join)."""
    _, found, rest = line.partition(" ledger entries in ")
    if not found:
        return None
    with contextlib.suppress(ValueError):
        return float(rest.split("s", 1)[0])
    return None


def _mib(b: dict[str, Any], key: str) -> str:
    live = b["rss_live_mib"]
    if key == "rss_live_mib":
        return f"{live:,} MiB"
    return f"{b[key]:,} MiB ({b[key] / live:.2f}x live)" if live else f"{b[key]:,} MiB"


def render(res: dict[str, Any]) -> str:
    bar = "-" * 78
    out = [
        bar,
        f"command  {res['command']}",
        f"broker   {res['broker']}; {res['cpus']} CPUs",
    ]
    for p in res["profiles"]:
        builds = p["builds"]
        tags = [t for t in ("base", "now") if t in builds]
        names = {"base": "previous build", "now": "this build"}
        head = [("", [names[t] for t in tags])]
        rows: list[tuple[str, list[str]]] = [
            ("worker replay", [f"{builds[t]['events_per_s']:,} events/s" for t in tags]),
            ("worker / raw consumer", [f"{builds[t]['ratio_to_ceiling']:.2f}" for t in tags]),
            ("worker CPU per event", [f"{builds[t]['cpu_us_per_event']:.1f} µs" for t in tags]),
            ("worker RSS live", [_mib(builds[t], "rss_live_mib") for t in tags]),
            ("RSS after a restart", [_mib(builds[t], "rss_restarted_mib") for t in tags]),
            (
                "restart: recovery / ready",
                [
                    f"{builds[t]['recovery_s']} s / {builds[t]['restart_to_ready_s']:.1f} s"
                    for t in tags
                ],
            ),
            (
                "incl. start, group join",
                [f"{builds[t]['events_per_s_incl_start']:,} events/s" for t in tags],
            ),
        ]
        e = p["expected"]
        out += [
            bar,
            f"profile {p['profile']}: {p['what']}",
            f"  {p['events']:,} events ({p['bytes_per_event']} bytes/event), "
            f"{p['distinct_workloads']:,} distinct workloads, {e['counted']:,} counted, "
            f"{e['rejected']:,} rejected; {e['usage_rows']:,} usage rows",
            f"  raw consumer (aiokafka + orjson.loads): {p['ceiling_events_per_s']:,} events/s; "
            f"core in-process {p['core_events_per_s']:,} events/s",
        ]
        width = max(len(k) for k, _ in rows)
        cols = [max(len(v[i]) for _, v in head + rows) for i in range(len(tags))]
        for k, vals in head + rows:
            cells = "  ".join(f"{v:>{c}}" for v, c in zip(vals, cols, strict=True))
            out.append(f"  {k:<{width}}  {cells}")
    f = res["faust_agent"]
    if f is not None:
        out.append(bar)
        if "error" in f:
            out.append(f"faust agent  failed: {f['error']}")
        else:
            out.append(
                f"faust agent  {f['events_per_s']:,} events/s "
                f"({f['events_per_s_incl_start']:,} incl. start)"
            )
    lat = res["latency"]
    if lat is not None:
        out.append(bar)
        out.append(
            f"latency  p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms "
            f"({lat['measured']:,}/{lat['sent']:,} events at "
            f"{lat['rate_achieved_per_s']:,.0f}/s; target p99 < 1000 ms)"
        )
    out.append(bar)
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--faust-child"]:
        faust_child(int(argv[1]), argv[2], argv[3], argv[4])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--profile",
        action="append",
        choices=sorted(profiles(0)),
        help="what to replay; repeat for several, side by side [today]",
    )
    p.add_argument("--events", type=int, default=200_000, help="events of the today profile")
    p.add_argument(
        "--baseline",
        metavar="DIR",
        help="also replay with the build checked out in DIR (a git worktree), same data, same run",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="run the workers with local state under DIR (one directory per group): the "
        "restart then reads it instead of the whole changelog",
    )
    p.add_argument("--latency-rate", type=float, default=2_000.0)
    p.add_argument(
        "--latency-seconds", type=float, default=20.0, help="0 skips the latency run [20]"
    )
    p.add_argument(
        "--faust",
        action="store_true",
        help="also time a bare faust-streaming agent over the first profile's topic",
    )
    p.add_argument("--faust-timeout", type=float, default=180.0)
    p.add_argument(
        "--py-spy",
        metavar="EXE",
        help="record the replay worker with this py-spy binary "
        "(raw stacks to bench/out/stream-worker-*.pyspy.txt; slows it down)",
    )
    p.add_argument(
        "--cprofile",
        action="store_true",
        help="run the replay worker under cProfile (stats to bench/out/stream-worker-*.prof; "
        "slows it down)",
    )
    g = p.add_argument_group(
        "hot path (no broker)",
        "the worker's own code over a profile's events with fake Kafka clients; for "
        "instruction counts under callgrind: run with and without --no-work",
    )
    g.add_argument("--hot-path", action="store_true", help="run the hot path, not the replay")
    g.add_argument("--limit", type=int, default=200_000, help="events of the profile [200000]")
    g.add_argument("--state", type=int, default=0, help="workloads already in the ledgers [0]")
    g.add_argument("--flush-every", type=int, default=4, help="batches between flushes [4]")
    g.add_argument("--no-work", action="store_true", help="load everything, process nothing")
    args = p.parse_args(argv)
    if args.state_dir:
        STATE_DIR.append(Path(args.state_dir))
    args.argv = argv
    if args.hot_path:
        for name in args.profile or ["today"]:
            hot_path(profiles(args.events)[name], args.limit, args.state, args.flush_every,
                     not args.no_work)  # fmt: skip
        return 0
    if args.faust and importlib.util.find_spec("faust") is None:
        p.error("--faust needs faust-streaming: pip install -e '.[faust]'")
    if args.baseline and not Path(args.baseline, "meter", "__init__.py").exists():
        p.error(f"--baseline {args.baseline}: no meter package there")
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
