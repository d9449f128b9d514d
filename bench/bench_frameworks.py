"""Time the streaming worker against stream-processing frameworks on the same topic.

    python -m bench.bench_frameworks [--events 200000] [--skip-faust] [--skip-quix]
                                     [--quix-python PATH]

1. starts the embedded Tansu broker (memory only: nothing survives the run);
2. loads N events from ``meter.sim.fleet.generate`` into ``meter.jobs``, keyed by
   tenant_id (murmur2, as a keyed producer), and computes the expected usage with
   the core (``Rater``);
3. then, in this order and on that same topic:

   a. the I/O ceiling: a plain aiokafka consumer ``orjson.loads``-ing every value
      (best of two reads);
   b. one ``meter worker`` child, timed from taking its partitions until its group's
      committed offsets reach the end of every partition *and* ``meter.usage``
      holds the core's totals;
   c. a bare faust-streaming agent (raw bytes, ``orjson.loads``, no table), timed
      from its first event to its N-th (extra ``faust``; ``--skip-faust``);
   d. a quixstreams application doing the worker's per-event work with its
      RocksDB-backed state: ``meter.domain.parse``, the rate card, and a max-rate
      entry per (tenant, month, workload) -- the worker's dedupe -- under
      at-least-once, timed from its first event until its group's committed
      offsets reach the end (extra ``quix``; ``--skip-quix``).  quixstreams pins
      confluent-kafka below the version the tests use, so it usually lives in a
      venv of its own: ``--quix-python`` names that interpreter (which needs
      ``pip install -e '.[quix]'``; the default is this one).

Prints events/s and the ratio worker/other for each, with N and the command, and
writes ``bench/out/frameworks.json``.  Every child process is stopped at the end
(SIGTERM, then SIGKILL), also on errors.
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
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner

from meter.broker import EmbeddedBroker
from meter.domain import Rater, load_ratecards
from meter.kafka import KafkaSettings, close_consumer, ensure_topics
from meter.sim.fleet import generate
from meter.stream.config import StreamConfig
from meter.stream.send import tenant_key
from meter.stream.usage import read_usage, usage_rows

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).parent / "out"
SESSION_TIMEOUT_MS = 6000
FETCH = {
    # The worker's fetch sizes, so the ceiling is comparable.
    "fetch_max_bytes": 64 * 1024 * 1024,
    "max_partition_fetch_bytes": 16 * 1024 * 1024,
    "fetch_max_wait_ms": 100,
}
FAUST_APP = "bench-faust"
QUIX_GROUP = "bench-quix"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- child processes
# (copied from bench_stream, which is being reworked: this file stands alone)


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn giving the child SIGKILL if this process dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

    def preexec() -> None:
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG

    return preexec


class Child:
    """A child process whose output is copied to a log file and watched for markers."""

    def __init__(self, name: str, cmd: Sequence[str], log_path: Path, markers: Sequence[str]):
        self.name = name
        self.log_path = log_path
        self.marks: dict[str, float] = {}
        self._markers = list(markers)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            list(cmd),
            cwd=ROOT,
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
            self.lines.append(line)
            for m in self._markers:
                if m not in self.marks and m in line:
                    self.marks[m] = now
        self._log.flush()

    async def wait_mark(self, marker: str, limit_s: float) -> float:
        deadline = time.monotonic() + limit_s
        while marker not in self.marks:
            if self.proc.poll() is not None:
                await asyncio.sleep(0.2)  # let the reader drain the pipe
                if marker in self.marks:
                    break
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before {marker!r}; "
                    f"see {self.log_path}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {marker!r} within {limit_s}s")
            await asyncio.sleep(0.01)
        return self.marks[marker]

    def cpu_seconds(self) -> float:
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


# --------------------------------------------------------------------------- loading


async def load_events(settings: KafkaSettings, topic: str, lines: list[bytes]) -> dict[int, int]:
    """Produce ``lines`` keyed by tenant_id; return partition -> end offset."""
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
        while any(queues.values()):  # round-robin: one pending batch per partition
            for p, batches in queues.items():
                if batches:
                    b = batches.pop(0)
                    count = b.record_count()
                    sent.append((p, count, await producer.send_batch(b, topic, partition=p)))
        metas = await asyncio.gather(*(f for _, _, f in sent))
        ends: dict[int, int] = dict.fromkeys(parts, 0)
        for (p, count, _), meta in zip(sent, metas, strict=True):
            ends[p] = max(ends[p], meta.offset + count)
        return ends
    finally:
        await producer.stop()


# --------------------------------------------------------------------------- measures


async def io_ceiling(settings: KafkaSettings, topic: str, ends: dict[int, int]) -> float:
    """Seconds for a plain consumer to read the topic and orjson.loads every value."""
    consumer = AIOKafkaConsumer(
        **settings.client_kwargs(), group_id=None, enable_auto_commit=False, **FETCH
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


async def wait_committed(
    settings: KafkaSettings,
    group: str,
    topic: str,
    ends: dict[int, int],
    limit_s: float,
    alive: Child | None = None,
) -> float:
    """Poll ``group``'s committed offsets until they reach ``ends``; return when (monotonic)."""
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
            if alive is not None and alive.proc.poll() is not None:
                raise RuntimeError(
                    f"{alive.name} exited with {alive.proc.returncode} before group {group} "
                    f"committed the end; see {alive.log_path}"
                )
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


@dataclass
class Timed:
    """One contender's figures: ``seconds`` from its start mark to done."""

    seconds: float
    seconds_incl_start: float
    cpu_s: float
    detail: dict[str, Any]

    def figures(self, n: int) -> dict[str, Any]:
        return {
            "events_per_s": round(n / self.seconds),
            "events_per_s_incl_start": round(n / self.seconds_incl_start),
            "seconds": round(self.seconds, 3),
            "cpu_s": round(self.cpu_s, 2),
            "cpu_us_per_event": round(self.cpu_s / n * 1e6, 2),
            **self.detail,
        }


async def worker_replay(
    settings: KafkaSettings, expected: list[Any], ends: dict[int, int], limit_s: float
) -> Timed:
    """One ``meter worker``: partitions taken -> end committed and usage final."""
    config = StreamConfig()
    cmd = [
        sys.executable,
        "-m",
        "meter",
        "worker",
        "--broker",
        settings.bootstrap,
        "--session-timeout-ms",
        str(SESSION_TIMEOUT_MS),
    ]
    worker = Child(
        "worker", cmd, OUT / "frameworks-worker.log", ["worker started", "took home partitions"]
    )
    try:
        home = await worker.wait_mark("took home partitions", 60)
        cpu0 = worker.cpu_seconds()
        committed = await wait_committed(
            settings, config.group_id, config.topics.jobs, ends, limit_s, worker
        )
        cpu1 = worker.cpu_seconds()
        # The usage topic is read once the offsets are committed (following it during the
        # replay costs CPU the worker and the broker compete for on a small machine).
        final = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if usage_rows(await read_usage(settings, config.topics.usage)) == expected:
                final = time.monotonic()
                break
            await asyncio.sleep(0.1)
        if final is None:
            raise RuntimeError("meter.usage does not hold the core's totals 30s after the commit")
        done = max(committed, final)
    finally:
        worker.stop()
    summary = next((ln for ln in worker.lines if "worker stopped:" in ln), "")
    return Timed(
        done - home,
        done - worker.started,
        cpu1 - cpu0,
        {
            "usage_equal_to_core": True,
            "committed_after_s": round(committed - home, 3),
            "summary": summary.split("worker stopped: ", 1)[-1],
        },
    )


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc))


def _read_json(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def faust_child(n: int, bootstrap: str, topic: str, datadir: str) -> None:
    """A bare faust agent over ``topic`` (raw bytes, orjson.loads); results to a file."""
    import faust  # noqa: PLC0415 - only in the child

    app = faust.App(
        FAUST_APP,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=datadir,
        web_enabled=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        # The worker's session timeout: the group join takes about half of it on Tansu.
        broker_session_timeout=SESSION_TIMEOUT_MS / 1000,
    )
    source = app.topic(topic, key_type=bytes, value_type=bytes, value_serializer="raw")
    state = {"seen": 0, "first": 0.0, "cpu0": 0.0}

    @app.agent(source)
    async def count(stream: Any) -> None:
        loads = orjson.loads
        async for value in stream:
            if not state["seen"]:
                state["first"] = time.time()
                state["cpu0"] = time.process_time()
            with contextlib.suppress(orjson.JSONDecodeError):
                loads(value)
            state["seen"] += 1
            if state["seen"] >= n:
                doc = {
                    "seen": state["seen"],
                    "first": state["first"],
                    "last": time.time(),
                    "cpu_s": time.process_time() - state["cpu0"],
                }
                # faust sends stdout to its log: the result goes to a file, the marker to both.
                _write_json(Path(datadir, "result.json"), doc)
                print("FAUST-DONE", flush=True)
                os._exit(0)

    sys.argv = [sys.argv[0], "worker", "--loglevel", "warn", "--without-web"]
    app.main()


async def faust_bench(bootstrap: str, topic: str, n: int, limit_s: float) -> Timed:
    datadir = tempfile.mkdtemp(prefix="meter-bench-faust-")
    spawned_wall = time.time()
    cmd = [sys.executable, "-m", "bench.bench_frameworks", "--faust-child", str(n)]
    child = Child(
        "faust agent",
        [*cmd, bootstrap, topic, datadir],
        OUT / "frameworks-faust.log",
        ["FAUST-DONE"],
    )
    try:
        await child.wait_mark("FAUST-DONE", limit_s)
        doc = _read_json(Path(datadir, "result.json"))
    finally:
        child.stop(10.0)
        shutil.rmtree(datadir, ignore_errors=True)
    return Timed(
        doc["last"] - doc["first"],
        doc["last"] - spawned_wall,
        doc["cpu_s"],
        {"events_seen": doc["seen"], "done_when": "N-th event parsed (no state, no commit)"},
    )


def quix_child(n: int, bootstrap: str, topic: str, datadir: str) -> None:
    """A quixstreams application doing the worker's per-event work with RocksDB state.

    Per event: ``meter.domain.parse``, the rate card, and -- for a counted session --
    the highest rate per (tenant, month, workload) in the state store (the message key
    is the tenant, so it is the state's prefix).  After the N-th event it stops, which
    commits its last checkpoint (state, changelog, offsets)."""
    from quixstreams import Application  # noqa: PLC0415 - only in the child

    from meter.domain import Event, parse  # noqa: PLC0415

    cards = load_ratecards()
    app = Application(
        broker_address=bootstrap,
        consumer_group=QUIX_GROUP,
        auto_offset_reset="earliest",
        state_dir=Path(datadir, "state"),
        processing_guarantee="at-least-once",
        loglevel="WARNING",
        # The worker's session timeout: the group join takes about half of it on Tansu
        # (22 s with librdkafka's default of 45 s).
        consumer_extra_config={"session.timeout.ms": SESSION_TIMEOUT_MS},
    )
    source = app.topic(topic, key_deserializer="bytes", value_deserializer="bytes")
    sdf = app.dataframe(source)
    tally = {"seen": 0, "new": 0, "raised": 0, "first": 0.0, "last": 0.0, "cpu0": 0.0}

    def rate(value: bytes) -> tuple[str, list[Any]] | None:
        if not tally["seen"]:
            tally["first"] = time.time()
            tally["cpu0"] = time.process_time()
            print("QUIX-FIRST", flush=True)
        tally["seen"] += 1
        if tally["seen"] >= n:
            tally["last"] = time.time()
            app.stop()  # ends the loop after this event, then commits the checkpoint
        event = parse(value)
        if event.__class__ is not Event:
            return None
        assert isinstance(event, Event)
        r = cards.rate(event)
        if r is None or event.result == "failed":
            return None
        return f"{event.month}\x1f{event.workload_type}\x1f{event.workload_id}", list(r)

    def dedupe(value: tuple[str, list[Any]], state: Any) -> None:
        key, r = value
        old = state.get(key)
        if old is None:
            state.set(key, r)
            tally["new"] += 1
        elif r > old:
            state.set(key, r)
            tally["raised"] += 1

    sdf = sdf.apply(rate)
    sdf = sdf.filter(lambda v: v is not None)
    sdf = sdf.update(dedupe, stateful=True)
    app.run()
    doc = {**tally, "run_returned": time.time(), "cpu_s": time.process_time() - tally["cpu0"]}
    _write_json(Path(datadir, "result.json"), doc)
    print("QUIX-DONE", flush=True)


async def quix_bench(
    settings: KafkaSettings, python: str, topic: str, ends: dict[int, int], limit_s: float
) -> Timed:
    datadir = tempfile.mkdtemp(prefix="meter-bench-quix-")
    n = sum(ends.values())
    cmd = [python, "-m", "bench.bench_frameworks", "--quix-child", str(n)]
    child = Child(
        "quixstreams app",
        [*cmd, settings.bootstrap, topic, datadir],
        OUT / "frameworks-quix.log",
        ["QUIX-FIRST", "QUIX-DONE"],
    )
    try:
        first = await child.wait_mark("QUIX-FIRST", 120)
        cpu0 = child.cpu_seconds()
        committed = await wait_committed(settings, QUIX_GROUP, topic, ends, limit_s, child)
        cpu1 = child.cpu_seconds()
        await child.wait_mark("QUIX-DONE", 60)
        doc = _read_json(Path(datadir, "result.json"))
    finally:
        child.stop(10.0)
        shutil.rmtree(datadir, ignore_errors=True)
    return Timed(
        committed - first,
        committed - child.started,
        cpu1 - cpu0,
        {
            "events_seen": doc["seen"],
            "state_changes": doc["new"] + doc["raised"],
            "processing_only_events_per_s": round(n / (doc["last"] - doc["first"])),
            "done_when": "group committed the end (last checkpoint: state, changelog, offsets)",
        },
    )


def quix_importable(python: str) -> str | None:
    """None when ``python`` imports quixstreams and meter, else why not."""
    try:
        probe = subprocess.run(
            [python, "-c", "import quixstreams, meter.domain; print(quixstreams.__version__)"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError as exc:
        return str(exc)
    if probe.returncode == 0:
        return None
    return (probe.stderr.strip().splitlines() or ["?"])[-1]


def quix_version(python: str) -> str:
    out = subprocess.run(
        [
            python,
            "-c",
            "import quixstreams, confluent_kafka; "
            "print(quixstreams.__version__, confluent_kafka.libversion()[0])",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    parts = out.stdout.split()
    return f"quixstreams {parts[0]}, librdkafka {parts[1]}" if len(parts) == 2 else "?"


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace, cmd: str) -> dict[str, Any]:
    OUT.mkdir(exist_ok=True)
    config = StreamConfig()
    t = config.topics
    res: dict[str, Any] = {"command": cmd, "broker": "embedded Tansu, memory-only storage"}
    with EmbeddedBroker(0) as broker:
        say(f"embedded broker (Tansu) on {broker.bootstrap}, pid {broker.pid}: MEMORY ONLY")
        settings = KafkaSettings(bootstrap=broker.bootstrap, client_id="meter-bench")
        parts = await ensure_topics(settings, config.topic_specs())
        say(f"generating {args.events:,} events")
        lines = list(generate(args.events))
        n = len(lines)
        rater = Rater(load_ratecards())
        for raw in lines:
            rater.feed(raw)
        expected = rater.ledger.usage()
        ends = await load_events(settings, t.jobs, lines)
        if sum(ends.values()) != n:
            raise RuntimeError(f"end offsets {ends} do not add up to {n}")
        say(f"loaded {n:,} events into {t.jobs} ({parts[t.jobs]} partitions)")
        res.update(
            events=n,
            partitions=parts[t.jobs],
            cpus=os.cpu_count(),
            expected=rater.tally.as_dict(),
        )
        limit = max(180.0, n / 1_000)

        runs = [await io_ceiling(settings, t.jobs, ends) for _ in range(2)]
        res["ceiling"] = {
            "events_per_s": round(n / min(runs)),
            "runs_s": [round(x, 3) for x in runs],
        }
        say(f"I/O ceiling: {res['ceiling']['events_per_s']:,} events/s")

        say("one meter worker replaying the topic")
        worker = await worker_replay(settings, expected, ends, limit)
        res["worker"] = worker.figures(n)
        say(f"worker: {res['worker']['events_per_s']:,} events/s")

        res["faust"] = None
        if not args.skip_faust:
            if importlib.util.find_spec("faust") is None:
                res["faust"] = {"skipped": "faust-streaming is not installed (extra `faust`)"}
            else:
                say("bare faust-streaming agent over the same topic")
                try:
                    res["faust"] = (await faust_bench(broker.bootstrap, t.jobs, n, limit)).figures(
                        n
                    )
                except (TimeoutError, RuntimeError) as exc:
                    res["faust"] = {"error": str(exc)}

        res["quix"] = None
        if not args.skip_quix:
            why = quix_importable(args.quix_python)
            if why is not None:
                res["quix"] = {
                    "skipped": f"{args.quix_python} cannot import quixstreams and meter ({why}); "
                    "pip install -e '.[quix]' in a venv and pass --quix-python"
                }
            else:
                say(f"quixstreams application ({quix_version(args.quix_python)}) over the topic")
                try:
                    q = await quix_bench(settings, args.quix_python, t.jobs, ends, limit)
                    res["quix"] = q.figures(n)
                    res["quix"]["version"] = quix_version(args.quix_python)
                    want = rater.tally.counted
                    if q.detail["state_changes"] != want:
                        res["quix"]["warning"] = (
                            f"{q.detail['state_changes']} state changes, the core counted {want}"
                        )
                except (TimeoutError, RuntimeError) as exc:
                    res["quix"] = {"error": str(exc)}

    w = res["worker"]["events_per_s"]
    res["ceiling"]["ratio_worker_to_it"] = round(w / res["ceiling"]["events_per_s"], 2)
    for name in ("faust", "quix"):
        other = res[name]
        if other and "events_per_s" in other:
            other["ratio_worker_to_it"] = round(w / other["events_per_s"], 2)
    return res


def render(res: dict[str, Any]) -> str:
    n = res["events"]
    rows = [
        ("command", res["command"]),
        ("events", f"{n:,} on {res['partitions']} partitions; {res['cpus']} CPUs"),
        ("broker", res["broker"]),
    ]
    w = res["worker"]
    rows.append(
        (
            "meter worker",
            f"{w['events_per_s']:,} events/s ({w['events_per_s_incl_start']:,} incl. start; "
            f"{w['cpu_us_per_event']} us CPU/event)",
        )
    )
    c = res["ceiling"]
    rows.append(
        (
            "aiokafka + orjson",
            f"{c['events_per_s']:,} events/s; worker/it {c['ratio_worker_to_it']:.2f}",
        )
    )
    for name, label in (("faust", "faust agent"), ("quix", "quixstreams")):
        f = res[name]
        if f is None:
            continue
        if "events_per_s" not in f:
            rows.append((label, f.get("skipped") or f"failed: {f.get('error')}"))
            continue
        rows.append(
            (
                label,
                f"{f['events_per_s']:,} events/s ({f['events_per_s_incl_start']:,} incl. start; "
                f"{f['cpu_us_per_event']} us CPU/event); worker/it {f['ratio_worker_to_it']:.2f}",
            )
        )
        if f.get("warning"):
            rows.append(("", f"WARNING: {f['warning']}"))
    width = max(len(k) for k, _ in rows)
    bar = "-" * 72
    return "\n".join([bar, *(f"{k:<{width}}  {v}" for k, v in rows), bar])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--faust-child"]:
        faust_child(int(argv[1]), argv[2], argv[3], argv[4])
        return 0
    if argv[:1] == ["--quix-child"]:
        quix_child(int(argv[1]), argv[2], argv[3], argv[4])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--skip-faust", action="store_true", help="do not time the faust agent")
    p.add_argument("--skip-quix", action="store_true", help="do not time the quixstreams app")
    p.add_argument(
        "--quix-python",
        default=sys.executable,
        metavar="EXE",
        help="the python that runs the quixstreams app (it needs pip install -e '.[quix]'; "
        "default: this one)",
    )
    args = p.parse_args(argv)
    cmd = "python -m bench.bench_frameworks " + " ".join(argv)

    def terminate(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through the finally blocks that stop the children

    signal.signal(signal.SIGTERM, terminate)
    try:
        res = asyncio.run(run(args, cmd.strip()))
    finally:
        for child in list(_CHILDREN):
            child.kill()
            child.stop()
    print(render(res))
    OUT.mkdir(exist_ok=True)
    (OUT / "frameworks.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"written to {OUT / 'frameworks.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
