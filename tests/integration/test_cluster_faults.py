"""A three-broker Apache Kafka cluster under faults, Jepsen-style.

Three KRaft nodes (``cluster.py``), every meter topic with 3 replicas and
``min.insync.replicas`` 2, every producer ``acks=all`` with idempotence (meter's own, and
the sender here).  Per test: two workers; September and October closed (reports on the
reports topic); November events flowing from a sender that resends a chunk whose send
failed (a resend is a duplicate, which the join ignores); then one fault.  After it:

- ``meter report`` equals ``meter rate`` over everything sent (tenant usage and the license
  view), so nothing was lost or doubled;
- over the whole usage and license topics no key's revision goes down, but for records a
  worker wrote before the fault ended that the broker appended after a newer one (a write held
  up by a cut link: counted, see ``_revision_drops``); equal revisions say the same; every
  key's last record carries its highest revision;
- the reports topic holds exactly what it held before the fault;
- every worker is ready again, and how long that took is measured (``Figures``, printed and
  written to ``tests/artifacts/cluster-faults.md``; the README's table comes from it).

One cluster serves the module (each test has its own topics and group, and leaves every node
running and in sync), so the module runs in one pytest-xdist process (``tests/conftest.py``).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from meter.kafka import KafkaSettings
from meter.sim.fleet import generate
from meter.stream.send import send_lines
from tests.integration import netns
from tests.integration.cluster import KafkaCluster
from tests.integration.conftest import _unavailable
from tests.integration.harness import (
    ARTIFACTS,
    TEST_NOW,
    Names,
    WorkerProcess,
    expected_usage,
    license_content,
    read_all,
    usage_content,
    wait_for_usage,
)
from tests.integration.kafka import KafkaUnavailableError, fetch_libs

pytestmark = pytest.mark.integration

#: The workers' session timeout (the harness's); a cut must outlive it.
SESSION_S = 6.0
#: A broker's session with the controller (``broker.session.timeout.ms`` in cluster.py).
BROKER_SESSION_S = 4.0


@dataclass
class Figures:
    """One row of the report."""

    fault: str
    did: str = ""
    ready_after_fault_s: float = 0.0
    ready_after_start_s: float = 0.0
    not_ready_s: list[float] = field(default_factory=list)
    lost: int = -1
    doubled: int = -1
    resent_chunks: int = 0
    late: int = 0  # records sent before the fault ended that landed after a newer revision
    phases: dict[str, float] = field(default_factory=dict)


RESULTS: list[Figures] = []


@pytest.fixture(scope="module")
def net() -> Iterator[netns.NetNs | None]:
    """The namespace a worker is cut off in; None where none can be made (then the cut test
    is skipped, and fails on CI)."""
    if netns.unavailable() is not None:
        yield None
        return
    with netns.NetNs() as ns:
        yield ns


@pytest.fixture(scope="module")
def cluster(net: netns.NetNs | None) -> Iterator[KafkaCluster]:
    try:
        libs = fetch_libs()
    except KafkaUnavailableError as exc:
        _unavailable(f"Apache Kafka unavailable: {exc}")
        raise  # unreachable: pytest.skip/fail raise
    host = net.host if net is not None else "127.0.0.1"
    with KafkaCluster(libs, ARTIFACTS, host=host) as c:
        yield c
    if RESULTS:
        table = f"{report_table(RESULTS)}\n{phase_table(RESULTS)}"
        (ARTIFACTS / "cluster-faults.md").write_text(table)
        print(f"\n{table}")  # the figures, also with -s


@pytest.fixture
def healed(cluster: KafkaCluster, net: netns.NetNs | None) -> Iterator[KafkaCluster]:
    """The cluster, left whole after the test: every node running and in sync, the link up."""
    yield cluster
    if net is not None:
        net.restore()
    for node in cluster.nodes:
        if node.alive:
            node.resume()
        else:
            cluster.restart(node)
    cluster.wait_in_sync()


def phase_table(rows: list[Figures]) -> str:
    """Where each test's time went, seconds from its workers' start."""
    names = list(dict.fromkeys(k for r in rows for k in r.phases))
    head = f"| fault | {' | '.join(names)} |\n|---|{'---|' * len(names)}\n"
    return head + "".join(
        f"| {r.fault} | {' | '.join(f'{r.phases.get(n, 0):.1f}' for n in names)} |\n" for r in rows
    )


def report_table(rows: list[Figures]) -> str:
    head = (
        "| fault | what meter did | ready again after the fault | not ready (per worker) "
        "| stale records delivered late | lost | doubled |\n|---|---|---|---|---|---|---|\n"
    )
    return head + "".join(
        f"| {r.fault} | {r.did} | {r.ready_after_fault_s:.1f} s "
        f"({r.ready_after_start_s:.1f} s after it began) "
        f"| {', '.join(f'{s:.1f} s' for s in r.not_ready_s)} | {r.late} | {r.lost} "
        f"| {r.doubled} |\n"
        for r in rows
    )


class ReadyWatch:
    """Polls every worker's /healthz every 0.2 s (1 s timeout; no answer is not ready) and
    keeps what each said when."""

    def __init__(self, workers: list[WorkerProcess]) -> None:
        self.urls = [f"{w.http_url()}/healthz" for w in workers]
        self.samples: list[list[tuple[float, bool]]] = [[] for _ in workers]
        self.reasons: dict[str, int] = {}  # why a worker said it was not ready: samples
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _ready(self, url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(resp.status == 200)
        except urllib.error.HTTPError as err:
            reason = str(orjson.loads(err.read()).get("reason"))
            reason = re.sub(r"\d+(\.\d+)?s\b", "Ns", reason)  # one line per kind
        except (urllib.error.URLError, OSError):
            reason = "no answer"
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        return False

    def _run(self) -> None:
        while not self._stop.is_set():
            for i, url in enumerate(self.urls):
                self.samples[i].append((time.monotonic(), self._ready(url)))
            self._stop.wait(0.2)

    def wait_all_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all(s and s[-1][1] for s in self.samples):
            assert time.monotonic() < deadline, f"not every worker ready in {timeout:.0f} s"
            time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def ready_for_good_at(self, since: float) -> float:
        """When the last worker turned ready for the last time after ``since``, or ``since``
        if none was seen not ready after it."""
        at = since
        for samples in self.samples:
            was_down = False
            for t, ready in samples:
                if t < since:
                    continue
                if not ready:
                    was_down = True
                elif was_down:
                    at, was_down = max(at, t), False
        return at

    def not_ready_seconds(self, since: float) -> list[float]:
        """Per worker, how long it was seen not ready after ``since`` (sample spacing)."""
        out = []
        for samples in self.samples:
            after = [(t, r) for t, r in samples if t >= since]
            out.append(sum(b[0] - a[0] for a, b in itertools.pairwise(after) if not a[1]))
        return out


class Sender(threading.Thread):
    """Sends ``lines`` in ``chunks`` chunks, 0.25 s apart, each with an idempotent ``acks=all``
    producer; a chunk whose send failed is sent again (counted in ``resent``)."""

    def __init__(self, settings: KafkaSettings, topic: str, lines: list[bytes], chunks: int):
        super().__init__(daemon=True)
        self.settings, self.topic = settings, topic
        size = len(lines) // chunks + 1
        self.chunks = [lines[i : i + size] for i in range(0, len(lines), size)]
        self.sent = 0
        self.resent = 0
        self.errors: list[str] = []

    def run(self) -> None:
        for chunk in self.chunks:
            while True:
                try:
                    asyncio.run(send_lines(self.settings, self.topic, chunk, idempotence=True))
                    break
                except Exception as exc:  # noqa: BLE001 - a broker down: send it again
                    self.resent += 1
                    self.errors.append(repr(exc))
                    time.sleep(0.5)
            self.sent += 1
            time.sleep(0.25)

    def wait_for(self, chunks: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.sent < chunks:
            assert self.is_alive(), f"the sender stopped after {self.sent} chunks"
            assert time.monotonic() < deadline, f"only {self.sent} chunks sent"
            time.sleep(0.05)


def meter(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "meter", *args], capture_output=True, timeout=120, check=False
    )


def _reports(settings: KafkaSettings, topic: str) -> dict[int, list[tuple[bytes, bytes]]]:
    """Every record of the reports topic, per partition, in offset order."""
    out: dict[int, list[tuple[bytes, bytes]]] = {}
    for r in read_all(settings, topic):
        out.setdefault(r.partition, []).append((r.key, r.value))  # type: ignore[attr-defined]
    return out


def _report_changes(
    before: dict[int, list[tuple[bytes, bytes]]], after: dict[int, list[tuple[bytes, bytes]]]
) -> str:
    """The records the reports topic gained (or lost) since ``before``, whole."""
    out = []
    for p in sorted(set(before) | set(after)):
        b, a = before.get(p, []), after.get(p, [])
        out += [f"+ [{p}] {k!r}: {v!r}" for k, v in a[len(b) :]]
        out += [f"- [{p}] {k!r}: {v!r}" for k, v in b[len(a) :]]
        out += [f"~ [{p}] {x!r} -> {y!r}" for x, y in zip(b, a, strict=False) if x != y]
    return "\n".join(out)


def _settled_reports(
    settings: KafkaSettings, topic: str, months: list[str]
) -> dict[int, list[tuple[bytes, bytes]]]:
    """The reports topic once every month's provider summary is on it and a read 1 s later
    finds nothing more: both workers close at the same moment, and each may publish the
    provider summary (the same record) once it sees every partition's summary."""
    want = {f"provider/{m}".encode() for m in months}
    deadline = time.monotonic() + 90
    last: dict[int, list[tuple[bytes, bytes]]] | None = None
    while True:
        now = _reports(settings, topic)
        if want <= {k for recs in now.values() for k, _ in recs} and now == last:
            return now
        assert time.monotonic() < deadline, f"the closes of {months} never settled"
        last = now
        time.sleep(1)


def _revision_drops(
    records: list[Any], content: Callable[[dict[str, Any]], object], sent_before_ms: int
) -> tuple[int, list[str]]:
    """Over a whole usage or license topic, in offset order (as ``revision_faults``): how many
    records went *down* in revision because they were delivered late, and every other fault.

    Delivered late: the lower record was made (its CreateTime, set when the producer took it)
    before ``sent_before_ms`` (the fault's end) and before the higher record it follows, i.e.
    a worker wrote it while it still held the partition, and the broker appended it only after
    the next owner's newer record (a write held up by a cut link, see the README, *A
    three-broker cluster under faults*).  Anything else that goes down, and two records of one
    revision that say different things, is a fault."""
    held: dict[bytes, tuple[int, object, int, int]] = {}
    late, faults = 0, []
    for rec in records:
        doc = orjson.loads(rec.value)
        said, rev = content(doc), doc["revision"]
        before = held.get(rec.key)
        if before is not None:
            b_rev, b_said, b_offset, b_ts = before
            if rev < b_rev and rec.timestamp < min(b_ts, sent_before_ms):
                late += 1
                continue
            if rev < b_rev:
                faults.append(f"{rec.key!r}: revision {b_rev} @{b_offset} -> {rev} @{rec.offset}")
            elif rev == b_rev and said != b_said:
                faults.append(f"{rec.key!r}: revision {rev} with different content @{rec.offset}")
        if before is None or rev >= before[0]:
            held[rec.key] = (rev, said, rec.offset, rec.timestamp)
    return late, faults


def _not_ending_on_the_highest(records: list[Any]) -> list[str]:
    """Keys whose last record does not carry their highest revision: what a reader of the
    compacted topic's latest record per key would get wrong."""
    highest: dict[bytes, int] = {}
    last: dict[bytes, int] = {}
    for rec in records:
        rev = orjson.loads(rec.value)["revision"]
        highest[rec.key] = max(rev, highest.get(rec.key, rev))
        last[rec.key] = rev
    return [f"{k!r}: ends on revision {last[k]} of {h}" for k, h in highest.items() if last[k] < h]


def _dump(records: list[Any], path: Path) -> None:
    """A topic's records, one JSON line each with where and when, for a failure's reader."""
    with path.open("wb") as out:
        for r in records:
            doc = {"partition": r.partition, "offset": r.offset, "timestamp": r.timestamp,
                   "key": r.key.decode(), "value": orjson.loads(r.value)}  # fmt: skip
            out.write(orjson.dumps(doc) + b"\n")


async def _delete_topics(bootstrap: str, names: Names) -> None:
    jobs, usage, lic = names.jobs, names.usage, names.license
    topics = [jobs, f"{jobs}.by-tenant", f"{jobs}.ledger.changelog", f"{jobs}.ledger.snapshots",
              f"{jobs}.clock", usage, f"{usage}.corrections", lic, f"{lic}.corrections",
              names.rejected, names.reports]  # fmt: skip
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        await admin.delete_topics([t for t in topics if t in existing])
    except Exception as exc:  # noqa: BLE001 - only a saving; the test's verdict stands
        print(f"could not delete {topics}: {exc!r}")
    finally:
        await admin.close()


def _also(cluster: KafkaCluster, node: Any, group: str) -> str:
    """ ", the group's coordinator" when ``node`` is where the workers heartbeat."""
    return ", the group's coordinator" if cluster.coordinator(group) == node.node_id else ""


def _wait(check: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _rows(doc: dict[str, Any]) -> dict[tuple[str, str, str], tuple[int, int]]:
    return {
        (r["month"], r["tenant_id"], r["workload_type"]): (r["workloads"], r["points"])
        for r in doc["usage"]
    }


def _license_rows(doc: dict[str, Any]) -> dict[str, object]:
    """The license view per month: its rows and totals (not its status or when it was made:
    `meter rate` calls a month final by the host's clock, the workers by their pinned one)."""
    return {m["month"]: (m["rows"], m["totals"]) for m in doc["license_usage"]["months"]}


def _lost_and_doubled(rated: dict[str, Any], reported: dict[str, Any]) -> tuple[int, int]:
    """Workloads `meter rate` counts that the report lacks, and ones it counts too often."""
    want, got = _rows(rated), _rows(reported)
    lost = sum(max(0, w - got.get(k, (0, 0))[0]) for k, (w, _) in want.items())
    doubled = sum(max(0, g - want.get(k, (0, 0))[0]) for k, (g, _) in got.items())
    return lost, doubled


def _counter(w: WorkerProcess, name: str) -> float:
    try:
        return w.metric(name) or 0.0
    except (urllib.error.URLError, OSError):
        return 0.0


def _what_meter_did(workers: list[WorkerProcess], before: list[dict[str, float]]) -> str:
    names = {
        "meter_write_retries_total": "batch writes retried",
        "meter_partitions_fenced_total": "home partitions fenced",
        "meter_rebalances_total": "rebalances",
    }
    parts = []
    for metric, label in names.items():
        n = sum(_counter(w, metric) - b[metric] for w, b in zip(workers, before, strict=True))
        parts.append(f"{n:.0f} {label}")
    return ", ".join(parts)


def drill(
    cluster: KafkaCluster,
    unique: str,
    tmp_path: Path,
    fault_name: str,
    fault: Callable[[list[WorkerProcess], dict[str, float]], str],
    *,
    seed: int,
    wraps: tuple[tuple[list[str], list[str]], ...] = (([], []), ([], [])),
) -> Figures:
    """Two workers (each started under ``wraps[i] = (command prefix, extra args)``), two
    months closed, November flowing, ``fault(workers, at)`` (it returns what it did, once the
    fault is over, and may set ``at["began"]`` and ``at["ended"]``, monotonic times, where
    looking things up took time around them); then every check of the module docstring."""
    clock = tmp_path / "clock"
    clock.write_text("2026-11-02T00:00:00Z")  # October (and September) open while sent
    names = Names(unique)
    names.extra = ["--replication-factor", "3", "--min-insync-replicas", "2",
                   "--clock", str(clock)]  # fmt: skip
    settings = KafkaSettings(bootstrap=cluster.bootstrap)
    early = list(generate(600, seed=seed, month="2026-10", tenants=20, workloads=25))
    november = list(generate(6000, seed=seed + 1, tenants=60, workloads=100))
    random.Random(seed).shuffle(november)
    lines = early + november
    workers = [
        WorkerProcess(cluster.bootstrap, names, f"w{i}", wrap=wrap, extra=extra)
        for i, (wrap, extra) in enumerate(wraps)
    ]
    watch: ReadyWatch | None = None
    figures = Figures(fault_name)
    try:
        t0 = time.monotonic()
        for w in workers:
            w.wait_for_log("took home partitions", timeout=90)
        figures.phases["workers up"] = time.monotonic() - t0
        asyncio.run(send_lines(settings, names.jobs, early + november[:500], idempotence=True))
        wait_for_usage(
            settings, names.usage, expected_usage(early + november[:500]), workers=workers
        )
        clock.write_text(TEST_NOW)  # September and October are due
        closed = sorted({r.month for r in expected_usage(early)})
        reports_before = _settled_reports(settings, names.reports, closed)
        figures.phases["months closed"] = time.monotonic() - t0
        watch = ReadyWatch(workers)
        watch.wait_all_ready(30)
        before = [{m: _counter(w, m) for m in (
            "meter_write_retries_total", "meter_partitions_fenced_total", "meter_rebalances_total",
        )} for w in workers]  # fmt: skip

        sender = Sender(settings, names.jobs, november[500:], chunks=30)
        sender.start()
        sender.wait_for(8)
        at = {"began": time.monotonic()}
        figures.did = fault(workers, at)
        began, ended = at["began"], at.get("ended", time.monotonic())
        ended_ms = int((time.time() - (time.monotonic() - ended)) * 1000)
        sender.join(180)
        assert not sender.is_alive(), "the sender never finished"
        figures.phases["fault over"] = ended - t0
        figures.phases["all sent"] = time.monotonic() - t0
        figures.resent_chunks = sender.resent

        wait_for_usage(settings, names.usage, expected_usage(lines), timeout=180, workers=workers)
        figures.phases["totals right"] = time.monotonic() - t0
        watch.wait_all_ready(120)
        time.sleep(1)  # a last sample of every worker after the totals
        watch.stop()
        ready_at = watch.ready_for_good_at(began)
        figures.ready_after_fault_s = max(0.0, ready_at - ended)
        figures.ready_after_start_s = ready_at - began
        figures.not_ready_s = watch.not_ready_seconds(began)
        did = _what_meter_did(workers, before)
        if watch.reasons:
            did += "; not ready: " + "; ".join(sorted(watch.reasons))
        figures.did = f"{figures.did}; {did}; {sender.resent} chunks resent by the sender"

        # `meter report` equals `meter rate` over everything sent, both views.
        events = tmp_path / "events.jsonl"
        events.write_bytes(b"\n".join(lines) + b"\n")
        rated = meter("rate", str(events), "--format", "json")
        reported = meter("report", "--broker", cluster.bootstrap, "--topic", names.usage,
                         "--license-topic", names.license, "--format", "json")  # fmt: skip
        assert rated.returncode == 0, rated.stderr.decode()
        assert reported.returncode == 0, reported.stderr.decode()
        rate_doc, report_doc = orjson.loads(rated.stdout), orjson.loads(reported.stdout)
        figures.lost, figures.doubled = _lost_and_doubled(rate_doc, report_doc)
        assert _rows(report_doc) == _rows(rate_doc)
        assert _license_rows(report_doc) == _license_rows(rate_doc)
        assert (figures.lost, figures.doubled) == (0, 0)

        # Revisions never go down; equal revisions say the same; the closes stand.
        for topic, content in ((names.usage, usage_content), (names.license, license_content)):
            records = read_all(settings, topic)
            late, faults = _revision_drops(records, content, sent_before_ms=ended_ms)
            figures.late += late
            faults += _not_ending_on_the_highest(records)
            if faults:
                _dump(records, ARTIFACTS / f"{topic}.jsonl")
            assert faults == [], f"{topic}: {faults[:5]} (records: tests/artifacts/{topic}.jsonl)"
        reports_after = _reports(settings, names.reports)
        assert reports_after == reports_before, _report_changes(reports_before, reports_after)
        for w in workers:
            assert "Traceback" not in w.log(), w.log()[-4000:]
        figures.phases["checked"] = time.monotonic() - t0
    finally:
        if watch is not None:
            watch.stop()
        for w in workers:
            w.resume()
            w.terminate()
            w.close()
        # Fewer partitions for the next tests' restarts to bring in sync.
        asyncio.run(_delete_topics(cluster.bootstrap, names))
    RESULTS.append(figures)
    return figures


def test_sigkill_of_the_leader_of_a_jobs_and_a_changelog_partition(
    healed: KafkaCluster, unique: str, tmp_path: Path
) -> None:
    cluster = healed
    jobs = f"jobs-{unique}"

    def fault(workers: list[WorkerProcess], at: dict[str, float]) -> str:
        jobs_leaders = cluster.leaders(jobs)
        changelog_leaders = cluster.leaders(f"{jobs}.ledger.changelog")
        # Round-robin placement: with 4 partitions on 3 nodes every node leads one of each.
        victim = next(
            n for n in cluster.nodes
            if n.node_id in jobs_leaders.values() and n.node_id in changelog_leaders.values()
        )  # fmt: skip
        led = [p for p, n in jobs_leaders.items() if n == victim.node_id]
        logged = [p for p, n in changelog_leaders.items() if n == victim.node_id]
        also = _also(cluster, victim, f"meter-{unique}")
        at["began"] = time.monotonic()
        victim.kill()
        return (f"SIGKILL node {victim.node_id}, leader of {jobs}{led} and of the changelog"
                f"{logged}{also}; it stays down until the checks are done")  # fmt: skip

    figures = drill(cluster, unique, tmp_path, "SIGKILL the leader of a jobs and a changelog "
                    "partition", fault, seed=201)  # fmt: skip
    assert figures.lost == figures.doubled == 0


def test_a_broker_paused_past_its_session(
    healed: KafkaCluster, unique: str, tmp_path: Path
) -> None:
    cluster = healed

    def fault(workers: list[WorkerProcess], at: dict[str, float]) -> str:
        # The hardest broker to lose for a while: the group's coordinator, if it is not the
        # active controller (that is the last test), else a partition leader.
        controller = cluster.active_controller()
        jobs_leaders = cluster.leaders(f"jobs-{unique}")
        coordinator = cluster.coordinator(f"meter-{unique}")
        victim = min(
            (n for n in cluster.nodes
             if n is not controller and n.node_id in jobs_leaders.values()),
            key=lambda n: n.node_id != coordinator,
        )  # fmt: skip
        also = _also(cluster, victim, f"meter-{unique}")
        at["began"] = time.monotonic()
        victim.pause()
        time.sleep(BROKER_SESSION_S * 2)
        victim.resume()
        return (f"SIGSTOP node {victim.node_id} (a leader{also}, not the active controller) for "
                f"{BROKER_SESSION_S * 2:.0f} s, then SIGCONT")  # fmt: skip

    drill(cluster, unique, tmp_path, "SIGSTOP a broker past its session", fault, seed=203)


def test_a_worker_cut_off_from_the_cluster_past_its_session(
    healed: KafkaCluster, net: netns.NetNs | None, unique: str, tmp_path: Path
) -> None:
    if net is None:
        _unavailable(f"no network namespace: {netns.unavailable()}")
        return
    ns = net
    cut_s = SESSION_S + 4

    def fault(workers: list[WorkerProcess], at: dict[str, float]) -> str:
        ns.cut()
        time.sleep(cut_s)
        ns.restore()
        return (f"the link of worker w1's namespace down for {cut_s:.0f} s (its session "
                f"{SESSION_S:.0f} s), then up")  # fmt: skip

    inside = (ns.wrap, ["--http-host", ns.inside])
    drill(healed, unique, tmp_path, "a worker cut off past its session", fault, seed=205,
          wraps=(([], []), inside))  # fmt: skip


def test_a_rolling_restart_of_all_three_brokers(
    healed: KafkaCluster, unique: str, tmp_path: Path
) -> None:
    cluster = healed

    def fault(workers: list[WorkerProcess], at: dict[str, float]) -> str:
        took = []
        for node in cluster.nodes:
            t0 = time.monotonic()
            node.stop()
            cluster.restart(node)  # back, and every partition in sync, before the next
            took.append(time.monotonic() - t0)
        return ("SIGTERM each node in turn, started again and every partition back in sync "
                f"before the next ({', '.join(f'{t:.0f}' for t in took)} s each)")  # fmt: skip

    drill(cluster, unique, tmp_path, "a rolling restart of the three brokers", fault, seed=207)


def test_the_active_controller_killed(healed: KafkaCluster, unique: str, tmp_path: Path) -> None:
    cluster = healed

    def fault(workers: list[WorkerProcess], at: dict[str, float]) -> str:
        victim = killed[0] = cluster.active_controller()
        also = _also(cluster, victim, f"meter-{unique}")
        at["began"] = time.monotonic()
        victim.kill()
        return (
            f"SIGKILL node {victim.node_id}, the active controller (and a broker: combined "
            f"mode{also}); it stays down until the checks are done"
        )

    killed = [cluster.nodes[0]]
    figures = drill(cluster, unique, tmp_path, "the active controller killed", fault, seed=209)
    epoch = killed[0].active_epoch()
    new = [n for n in cluster.nodes if n.alive and n.active_epoch() > epoch]
    assert new, "no node became the active controller"
    figures.did = figures.did.replace("; it stays", f"; node {new[0].node_id} took over; it stays")
