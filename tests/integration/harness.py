"""Driving the meter as a user does: real processes against a real broker."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from meter.broker import EmbeddedBroker
from meter.domain import Rater, UsageRow, load_ratecards
from meter.kafka import KafkaSettings, read_to_end
from meter.stream.send import send_lines
from meter.stream.usage import fold, read_corrections, read_usage, usage_rows
from tests.integration.kafka import KafkaBroker

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

#: The time every meter process of the integration tests runs at unless a test sets its own
#: ``--clock``: mid-November 2026, the month ``meter.sim.fleet.generate`` dates events in by
#: default, so no month is due to close while a test runs, whatever the date of the run.
TEST_NOW = "2026-11-20T12:00:00Z"


def pinned_clock(args: Iterable[str]) -> list[str]:
    """``--clock FILE`` at :data:`TEST_NOW` when ``args`` has no ``--clock`` of its own."""
    if "--clock" in args:
        return []
    ARTIFACTS.mkdir(exist_ok=True)
    clock = ARTIFACTS / "clock-test-now"
    if not clock.exists() or clock.read_text() != TEST_NOW:  # atomic: a worker may read it
        part = clock.with_name(f"{clock.name}.{os.getpid()}")
        part.write_text(TEST_NOW)
        part.replace(clock)
    return ["--clock", str(clock)]


def clock_check_off(args: Iterable[str]) -> list[str]:
    """``--clock-tolerance off`` when ``args`` set no tolerance of their own.

    The embedded broker assigns no time (it keeps the producer's timestamps, also on a
    LogAppendTime topic), so a worker alone on it has nothing to check its clock against
    and would hold every close; the tests pin their clocks in the past on purpose.  Tests
    of the clock check (``test_clock_check.py``) set their own tolerance."""
    return [] if "--clock-tolerance" in args else ["--clock-tolerance", "off"]


def report_rows(rows: Iterable[UsageRow]) -> list[dict[str, object]]:
    """Usage rows as ``meter report --format json`` shows their main fields."""
    return [
        {
            "month": u.month,
            "tenant_id": u.tenant_id,
            "workload_type": u.workload_type,
            "workloads": u.workloads,
            "points": u.points,
        }
        for u in rows
    ]


def expected_usage(lines: Iterable[bytes]) -> list[UsageRow]:
    r = Rater(load_ratecards())
    for line in lines:
        if line.strip():
            r.feed(line)
    return r.ledger.usage()


@dataclass
class Names:
    """Topic and group names unique to one test (the broker is shared)."""

    suffix: str
    jobs: str = ""
    usage: str = ""
    rejected: str = ""
    reports: str = ""
    license: str = ""
    group: str = ""
    extra: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.jobs = f"jobs-{self.suffix}"
        self.usage = f"usage-{self.suffix}"
        self.rejected = f"rejected-{self.suffix}"
        self.reports = f"reports-{self.suffix}"
        self.license = f"license-{self.suffix}"
        self.group = f"meter-{self.suffix}"

    def worker_args(self) -> list[str]:
        return [
            "--jobs-topic", self.jobs,
            "--usage-topic", self.usage,
            "--rejected-topic", self.rejected,
            "--reports-topic", self.reports,
            "--license-topic", self.license,
            "--group", self.group,
            "--session-timeout-ms", "6000",
            "--http-port", "0",
            *self.extra,
        ]  # fmt: skip


def audit_args(names: Names) -> list[str]:
    """``meter audit``'s topics of one test, and the history start its workers declared."""
    args = ["--jobs-topic", names.jobs, "--usage-topic", names.usage,
            "--license-topic", names.license]  # fmt: skip
    if "--history-start" in names.extra:
        at = names.extra.index("--history-start")
        args += names.extra[at : at + 2]
    return args


def audit_clean(out: bytes, names: Names) -> bool:
    """Whether ``meter audit`` found both views equal to the raw events."""
    return (
        f"0 difference(s) between the raw events and {names.usage} + corrections".encode() in out
        and f"0 difference(s) between the raw events and {names.license} + corrections".encode()
        in out
    )


class WorkerProcess:
    """``meter worker`` as a child process, logging to tests/artifacts/."""

    def __init__(
        self,
        bootstrap: str,
        names: Names,
        tag: str,
        *,
        prelude: str = "",
        extra: Iterable[str] = (),
        wrap: Iterable[str] = (),
    ) -> None:
        """``prelude``: Python run in the worker process before meter starts (fault injection);
        ``wrap``: a command the worker runs under, e.g. ``ip netns exec NAME`` (which execs, so
        ``proc`` is still the worker)."""
        ARTIFACTS.mkdir(exist_ok=True)
        self.log_path = ARTIFACTS / f"worker-{names.suffix}-{tag}.log"
        self._log = self.log_path.open("wb")
        launcher = (
            ["-c", f"{prelude}\nimport sys\nfrom meter.cli import main\nsys.exit(main())", "worker"]
            if prelude
            else ["-m", "meter", "worker"]
        )
        args = [*names.worker_args(), *extra]
        self.proc = subprocess.Popen(
            [
                *wrap,
                sys.executable,
                *launcher,
                "--broker",
                bootstrap,
                *args,
                *pinned_clock(args),
                *clock_check_off(args),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged within {timeout}s:\n{self.log()}")
            time.sleep(0.1)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def http_url(self, timeout: float = 60.0) -> str:
        """Where the worker serves /metrics and /healthz (it logs it at start)."""
        self.wait_for_log("Prometheus metrics on http://", timeout)
        m = re.search(r"Prometheus metrics on (http://[0-9.:]+)/metrics", self.log())
        assert m is not None, self.log()
        return m[1]

    def health(self) -> tuple[int, dict[str, object]]:
        """``(status, body)`` of GET /healthz."""
        try:
            with urllib.request.urlopen(f"{self.http_url()}/healthz", timeout=5) as resp:
                return resp.status, orjson.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, orjson.loads(err.read())

    def metric(self, sample: str) -> float | None:
        """A sample's value from GET /metrics; ``sample`` as exposed, labels included."""
        with urllib.request.urlopen(f"{self.http_url()}/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(sample + " "):
                    return float(line.rsplit(" ", 1)[1])
        return None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 40.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def send(settings: KafkaSettings, topic: str, lines: Iterable[bytes]) -> int:
    return asyncio.run(send_lines(settings, topic, lines))


def current_usage(settings: KafkaSettings, topic: str) -> list[UsageRow]:
    """What the usage topic says now: records with their corrections folded in."""

    async def read() -> dict[str, dict[str, object]]:
        return fold(
            await read_usage(settings, topic),
            await read_corrections(settings, f"{topic}.corrections"),
        )

    try:
        return usage_rows(asyncio.run(read()))  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - topic not created yet
        return []


def wait_for_usage(
    settings: KafkaSettings,
    topic: str,
    expected: list[UsageRow],
    timeout: float = 90.0,
    workers: Iterable[WorkerProcess] = (),
) -> list[UsageRow]:
    deadline = time.monotonic() + timeout
    got: list[UsageRow] = []
    while time.monotonic() < deadline:
        got = current_usage(settings, topic)
        if got == expected:
            return got
        for w in workers:
            if w.proc.poll() is not None:
                raise AssertionError(f"worker exited {w.proc.returncode}:\n{w.log()}")
        time.sleep(0.5)
    diff = sorted(set(got) ^ set(expected), key=lambda r: (r.month, r.tenant_id, r.workload_type))
    logs = "\n".join(w.log()[-3000:] for w in workers)
    raise AssertionError(f"usage never matched; differing rows: {diff[:20]}\n{logs}")


def read_all(settings: KafkaSettings, topic: str) -> list[object]:
    return list(asyncio.run(read_to_end(settings, topic)))


def usage_content(doc: dict[str, Any]) -> object:
    """What a usage record says, for :func:`revision_faults` (not when it was published)."""
    return (doc["usage"], doc["workloads"], doc["points"], doc["ratecards"])


def license_content(doc: dict[str, Any]) -> object:
    """What a license record says, for :func:`revision_faults` (its status goes from running
    to final at the close with the same revision and the same figures)."""
    return (
        doc["history_start"], doc["usage"], doc["workloads"], doc["new_workloads"],
        doc["rental_workloads"], doc["points"], doc["new_points"],
    )  # fmt: skip


def revision_faults(
    records: Iterable[object], content: Callable[[dict[str, Any]], object] = usage_content
) -> list[str]:
    """Over a whole usage (or, with :func:`license_content`, license) topic, in offset order:
    every key's revision never goes down, and two records of a key with the same revision say
    the same."""
    held: dict[bytes, tuple[int, object, int]] = {}
    faults = []
    for rec in records:
        doc = orjson.loads(rec.value)  # type: ignore[attr-defined]
        key = rec.key  # type: ignore[attr-defined]
        said = content(doc)
        rev = doc["revision"]
        before = held.get(key)
        if before is not None:
            if rev < before[0]:
                faults.append(f"{key!r}: revision {before[0]} @{before[2]} -> {rev} @{rec.offset}")  # type: ignore[attr-defined]
            elif rev == before[0] and said != before[1]:
                faults.append(f"{key!r}: revision {rev} with different content @{rec.offset}")  # type: ignore[attr-defined]
        if before is None or rev >= before[0]:
            held[key] = (rev, said, rec.offset)  # type: ignore[attr-defined]
    return faults


def _uvarint(buf: bytes, at: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = buf[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def _compact_string(buf: bytes, at: int) -> tuple[str, int]:
    n, at = _uvarint(buf, at)
    return ("", at) if n == 0 else (buf[at : at + n - 1].decode(), at + n - 1)


def tansu_leader(bootstrap: str, group: str) -> str | None:
    """The leader the embedded broker names for a classic ``group``: Tansu 0.6 answers
    ConsumerGroupDescribe (v0) with the leader as ``assignor_name``.  None when the broker
    answers an error (Apache Kafka: a classic group is not a consumer-protocol group)."""
    import socket
    import struct

    host, port = bootstrap.split(",", maxsplit=1)[0].rsplit(":", 1)
    g = group.encode()
    body = bytes([2, len(g) + 1]) + g + b"\x00\x00"  # one group id, no operations, no tags
    client = b"meter-test"
    header = struct.pack(">hhih", 69, 0, 1, len(client)) + client + b"\x00"
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.settimeout(5)
        sock.sendall(struct.pack(">i", len(header) + len(body)) + header + body)
        buf = b""
        while len(buf) < 4 or len(buf) < 4 + struct.unpack(">i", buf[:4])[0]:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            buf += chunk
    at = 8  # size, correlation id
    _, at = _uvarint(buf, at)  # header tags
    at += 4  # throttle time
    _, at = _uvarint(buf, at)  # groups
    (error,) = struct.unpack(">h", buf[at : at + 2])
    if error:
        return None
    at += 2
    for _field in ("error message", "group id", "state"):
        _, at = _compact_string(buf, at)
    leader, _ = _compact_string(buf, at + 8)  # after the two epochs
    return leader


def group_state(bootstrap: str, group: str) -> tuple[str, list[str]]:
    """``(state, member ids)`` from DescribeGroups."""
    from aiokafka.admin import AIOKafkaAdminClient

    async def describe() -> tuple[str, list[str]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            (response,) = await admin.describe_consumer_groups([group])
            (described,) = response.groups
            return str(described[2]), [str(m[0]) for m in described[5]]
        finally:
            await admin.close()

    return asyncio.run(describe())


def own_broker(
    like: object, tag: str, *, port: int = 0, advertised_port: int = 0
) -> EmbeddedBroker | KafkaBroker:
    """A broker of ``like``'s kind (the test's ``broker``) for one test to stop, kill or
    restart; not started.  ``port``/``advertised_port`` as :class:`EmbeddedBroker` takes them
    (advertise a proxy's port to run every connection through it)."""
    if isinstance(like, KafkaBroker):
        log = ARTIFACTS / f"kafka-{tag}.log"
        return KafkaBroker(like.libs, log, port=port, advertised_port=advertised_port)
    return EmbeddedBroker(port, advertised_port=advertised_port or None)


def restarted_empty(broker: EmbeddedBroker | KafkaBroker) -> EmbeddedBroker | KafkaBroker:
    """``broker`` restarted on its port with nothing: the embedded broker's every restart
    (memory only), Apache Kafka's restart on a fresh disk (formatted anew, new cluster id)."""
    if isinstance(broker, KafkaBroker):
        broker.restart(wipe=True)
        return broker
    port = broker.port
    broker.stop()
    return EmbeddedBroker(port).start()
