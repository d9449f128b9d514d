"""Least-privilege ACLs on Apache Kafka (SASL SCRAM, StandardAuthorizer, a TLS listener).

With the ACLs :mod:`meter.stream.acls` lists (the README's "Access control" table), a
worker, ``meter send``, ``meter report`` and ``meter audit`` do their work, each as its own
user, over SASL_SSL.  With one ACL taken away (one of each kind: a group, Read, Write,
Create, DescribeConfigs, on topics read at start, during recovery and while running), the
command or the worker says which operation on which resource was denied, in one line,
once; the command exits 2 and the worker is not ready.

Kafka only: the embedded broker has no authorizer (nor a working SCRAM login, see
``test_auth.py``).  One secured broker serves the module (``secured_kafka``).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from meter.kafka import KafkaSettings
from meter.stream.acls import Acl, role_acls
from meter.stream.config import Topics
from tests.domain.events import line
from tests.integration.conftest import SECURED_USERS
from tests.integration.harness import (
    Names,
    WorkerProcess,
    audit_args,
    audit_clean,
    expected_usage,
    read_all,
    report_rows,
    send,
)
from tests.integration.kafka import Acl as KafkaAcl
from tests.integration.kafka import KafkaBroker, create_acls, delete_acls

pytestmark = pytest.mark.integration

TRICKY = Path(__file__).resolve().parents[1] / "cli" / "tricky.jsonl"
#: Which user plays which role.
USERS = {"worker": "worker", "send": "sender", "report": "reporter", "audit": "auditor"}
#: A worker retries a refusal after 0.5 s, then 1 s later...: watched this long, it retried.
WATCH_S = 2.5


def topics_of(names: Names) -> Topics:
    """The topics a worker started with ``names.worker_args()`` uses."""
    return Topics.derived(names.jobs, names.usage, names.rejected, names.reports, names.license)


def for_kafka(role: str, acls: list[Acl]) -> list[KafkaAcl]:
    user = f"User:{USERS[role]}"
    return [KafkaAcl(user, a.resource, a.name, a.operation) for a in acls]


@contextmanager
def granted(kafka: KafkaBroker, acls: list[KafkaAcl]) -> Iterator[None]:
    create_acls(kafka.admin_bootstrap, acls)
    try:
        yield
    finally:
        delete_acls(kafka.admin_bootstrap, acls)


def sasl(kafka: KafkaBroker, role: str, tmp_path: Path, *, tls: bool = False) -> list[str]:
    """The flags of ``role``'s user, over SASL_SSL (with the test CA) or SASL_PLAINTEXT."""
    user = USERS[role]
    secret = tmp_path / f"{user}.pw"
    secret.write_text(SECURED_USERS[user])
    secret.chmod(0o600)
    flags = ["--sasl-mechanism", "SCRAM-SHA-512", "--sasl-username", user]
    flags += ["--sasl-password-file", str(secret)]
    if tls:
        assert kafka.tls is not None
        return ["--broker", kafka.tls_bootstrap, "--security-protocol", "SASL_SSL",
                "--ssl-cafile", str(kafka.tls.cafile), *flags]  # fmt: skip
    return ["--broker", kafka.bootstrap, "--security-protocol", "SASL_PLAINTEXT", *flags]


def meter(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "meter", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
    )


def test_with_the_listed_acls_every_role_works_over_tls(
    secured_kafka: KafkaBroker, tmp_path: Path
) -> None:
    """Worker, send, report and audit, each as its own user with only its ACLs, over
    SASL_SSL: the report equals ``meter rate``'s, October closes, the audit is clean."""
    kafka = secured_kafka
    names = Names(os.urandom(4).hex())
    topics = topics_of(names)
    lines = [ln for ln in TRICKY.read_bytes().splitlines(keepends=True) if ln.strip()]
    want = report_rows(expected_usage(lines))
    acls = [a for role in USERS for a in for_kafka(role, role_acls(role, topics, names.group))]
    with granted(kafka, acls):
        names.extra = [*sasl(kafka, "worker", tmp_path, tls=True)[2:],
                       "--state-dir", str(tmp_path / "state")]  # fmt: skip
        worker = WorkerProcess(kafka.tls_bootstrap, names, "acl-all")
        try:
            worker.wait_for_log("worker started")
            sender = sasl(kafka, "send", tmp_path, tls=True)
            sent = meter("send", "-", "--topic", names.jobs, *sender, stdin=b"".join(lines))
            assert sent.returncode == 0, sent.stderr.decode()
            deadline = time.monotonic() + 90
            rows: object = None
            while rows != want:
                assert time.monotonic() < deadline, (rows, worker.log()[-3000:])
                out = meter("report", "--format", "json", "--topic", names.usage,
                            "--license-topic", names.license,
                            *sasl(kafka, "report", tmp_path, tls=True))  # fmt: skip
                assert out.returncode == 0, out.stderr.decode()
                rows = orjson.loads(out.stdout)["usage"]
                time.sleep(0.3 if rows != want else 0)
            deadline = time.monotonic() + 60
            while True:
                audit = meter("audit", "--month", "2026-10", *audit_args(names),
                              *sasl(kafka, "audit", tmp_path, tls=True))  # fmt: skip
                if audit.returncode == 0 and audit_clean(audit.stdout, names):
                    break
                assert time.monotonic() < deadline, (audit.stdout + audit.stderr).decode()
                time.sleep(0.5)
            status, body = worker.health()
            assert status == 200, body
            log = worker.log()
            assert "not authorized" not in log
            assert "Traceback" not in log
        finally:
            assert worker.terminate() == 0, worker.log()[-3000:]
            worker.close()


def _one(acls: list[KafkaAcl], topics: Topics, resource: str, name: str, op: str) -> KafkaAcl:
    """The ACL ``op`` on ``resource`` ``name`` (``name`` an attribute of ``topics``, or the
    group) from ``acls``."""
    real = getattr(topics, name, name)
    found = [a for a in acls if (a.resource, a.name, a.operation) == (resource, real, op)]
    assert len(found) == 1, (resource, real, op, acls)
    return found[0]


# One of each kind, refused where the worker meets it: at start (Create, DescribeConfigs,
# and Describe: a topic it only writes is invisible without Write), joining the group,
# reading input, recovering, closing a month, writing its source of truth (which halts
# it: a write that can never succeed).  (resource, name, ACL taken away, operation said)
WORKER_CASES = [
    pytest.param("topic", "rejected", "Create", "Create", id="create-rejected"),
    pytest.param("topic", "changelog", "DescribeConfigs", "DescribeConfigs", id="describeconfigs"),
    pytest.param("topic", "usage", "Write", "Describe", id="write-usage"),
    pytest.param("group", "group", "Read", "Read", id="read-group"),
    pytest.param("topic", "by_tenant", "Read", "Read", id="read-by-tenant"),
    pytest.param("topic", "changelog", "Read", "Read", id="read-changelog"),
    pytest.param("topic", "reports", "Write", "Write", id="write-reports"),
    pytest.param("topic", "changelog", "Write", "Write", id="write-changelog"),
]


@pytest.mark.parametrize(("resource", "name", "operation", "said_operation"), WORKER_CASES)
def test_a_worker_missing_one_acl_says_which_once_and_is_not_ready(
    secured_kafka: KafkaBroker,
    tmp_path: Path,
    resource: str,
    name: str,
    operation: str,
    said_operation: str,
) -> None:
    kafka = secured_kafka
    names = Names(os.urandom(4).hex())
    topics = topics_of(names)
    acls = for_kafka("worker", role_acls("worker", topics, names.group))
    missing = _one(acls, topics, resource, names.group if name == "group" else name, operation)
    said = f"denies user 'worker' {said_operation} on {resource} '{missing.name}'"
    admin = KafkaSettings(bootstrap=kafka.admin_bootstrap)
    with granted(kafka, [a for a in acls if a != missing]):
        names.extra = sasl(kafka, "worker", tmp_path)[2:]
        worker = WorkerProcess(kafka.bootstrap, names, f"acl-{operation}-{name}")
        try:
            deadline = time.monotonic() + 60
            fed = False
            while said not in worker.log():
                assert time.monotonic() < deadline, worker.log()[-3000:]
                assert worker.proc.poll() is None, worker.log()[-3000:]
                if not fed and "worker started" in worker.log():
                    # Events (one of October, which closes) and a line that is no event.
                    fed = True
                    send(admin, names.jobs, [
                        line(tenant="acme", workload="w1", time="2026-10-15T10:00:00Z"),
                        line(tenant="globex", workload="w2", time="2026-11-15T10:00:00Z"),
                        b"not an event",
                    ])  # fmt: skip
                time.sleep(0.2)
            if name == "reports":
                # Every home partition closes October; none of them may make it ready
                # while meter.reports lacks their receipts.
                while worker.log().count("closed 2026-10 on home partition") < 4:
                    assert time.monotonic() < deadline, worker.log()[-3000:]
                    time.sleep(0.2)
            time.sleep(WATCH_S)  # it retries meanwhile, and must not say it again
            status, body = worker.health()
            log = worker.log()
            assert worker.proc.poll() is None, log
            assert status == 503, body
            assert said in str(body["reason"]), body
            refusals = [ln for ln in log.splitlines() if "not authorized" in ln]
            assert len(refusals) == 1, refusals
            assert re.search(r" ERROR meter\.stream\.worker: ", refusals[0]), refusals
            assert "Traceback" not in log
            assert "Authorization failed" not in log
            assert "TopicAuthorizationFailedError" not in log
            assert "GroupAuthorizationFailedError" not in log
            assert worker.metric('meter_problem{problem="not_authorized"}') == 1.0
            if name == "reports":
                # Adding the ACL is enough: the worker gets on with it, the closes' receipts
                # included.
                with granted(kafka, [missing]):
                    deadline = time.monotonic() + 60
                    while worker.health()[0] != 200:
                        assert time.monotonic() < deadline, worker.log()[-3000:]
                        time.sleep(0.3)
                    if name == "reports":
                        summaries = {
                            rec.key  # type: ignore[attr-defined]
                            for rec in read_all(admin, names.reports)
                        }
                        assert {f"partition/2026-10/{n}".encode() for n in range(4)} <= summaries
        finally:
            assert worker.terminate() == 0, worker.log()[-3000:]
            worker.close()


COMMAND_CASES = [
    pytest.param("send", "jobs", "Write", id="send-write-jobs"),
    pytest.param("report", "corrections", "Read", id="report-read-corrections"),
    pytest.param("audit", "jobs", "Read", id="audit-read-jobs"),
]


@pytest.mark.parametrize(("role", "name", "operation"), COMMAND_CASES)
def test_a_command_missing_one_acl_says_which_in_one_line(
    secured_kafka: KafkaBroker, tmp_path: Path, role: str, name: str, operation: str
) -> None:
    kafka = secured_kafka
    names = Names(os.urandom(4).hex())
    topics = topics_of(names)
    asyncio.run(_create(kafka, [topics.jobs, topics.usage, topics.corrections, topics.license,
                               topics.license_corrections]))  # fmt: skip
    acls = for_kafka(role, role_acls(role, topics, names.group))
    missing = _one(acls, topics, "topic", name, operation)
    args = {
        "send": ["send", "-", "--topic", names.jobs],
        "report": ["report", "--topic", names.usage, "--license-topic", names.license],
        "audit": ["audit", "--month", "2026-10", *audit_args(names)],
    }[role]
    with granted(kafka, [a for a in acls if a != missing]):
        started = time.monotonic()
        out = meter(*args, *sasl(kafka, role, tmp_path), stdin=line(tenant="acme") + b"\n")
        elapsed = time.monotonic() - started
    assert out.returncode == 2, (out.stdout + out.stderr).decode()
    lines = out.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    # Without Read, a topic cannot be described either: a reader may be refused that first.
    ops = {operation, "Describe"} if operation == "Read" else {operation}
    assert any(
        lines[0].startswith(f"meter: not authorized: {kafka.bootstrap} denies user "
                            f"'{USERS[role]}' {op} on topic '{missing.name}'")
        for op in ops
    ), lines  # fmt: skip
    assert elapsed < 30


async def _create(kafka: KafkaBroker, topics: list[str]) -> None:
    """The topics a command works on, made by the administrator."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.admin_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, 1, 1) for t in topics])
    finally:
        await admin.close()
