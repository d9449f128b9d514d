"""A refused SASL handshake is one line and exit 2; the right password works.

Three brokers with authentication switched on:

- Apache Kafka (``secured_kafka``): SCRAM-SHA-256/512 users made at format time, PLAIN not
  offered, a SASL_SSL listener with a certificate from the test's own CA; the real
  answers to a wrong password, to a mechanism it does not offer and to a CA meter does not
  trust (its ACLs: ``test_acls.py``);

- the embedded Tansu with ``--authentication``: SCRAM only, and with memory storage it
  refuses every login (``e=unknown-user``, which aiokafka turns into ``KeyError: 'v'``) and
  closes the connection on a PLAIN handshake;
- a plain embedded Tansu behind :class:`~tests.kafka.sasl_front.SaslFront`, which refuses
  bad credentials the way Apache Kafka does (SaslAuthenticate error 58, which aiokafka
  turns into "Unable to bootstrap") and accepts good ones, for the round trip.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from meter.broker import EmbeddedBroker
from tests.integration.conftest import SECURED_USERS
from tests.integration.harness import ARTIFACTS, Names, WorkerProcess, expected_usage, report_rows
from tests.integration.kafka import Acl as KafkaAcl
from tests.integration.kafka import KafkaBroker, create_acls, delete_acls
from tests.kafka.sasl_front import MECHANISMS, SaslFront
from tests.loopback import reserve_port

pytestmark = pytest.mark.integration

PASSWORD = "correct-horse-9"
WRONG = "battery-staple-7"
BOUND_S = 10.0  # a refusal is reported within this, never retried forever
TRICKY = Path(__file__).resolve().parents[1] / "cli" / "tricky.jsonl"


@pytest.fixture(scope="module")
def tansu_auth() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(authentication=True) as broker:
        yield broker


@pytest.fixture(scope="module")
def front() -> Iterator[SaslFront]:
    port = reserve_port()
    with (
        EmbeddedBroker(advertised_port=port) as broker,
        SaslFront({"alice": PASSWORD}, target_port=broker.port, listen_port=port) as sasl,
    ):
        yield sasl


def meter(
    tmp_path: Path,
    bootstrap: str,
    mechanism: str,
    password: str,
    *args: str,
    stdin: bytes = b"",
    timeout: float = 60,
    protocol: str = "SASL_PLAINTEXT",
) -> tuple[subprocess.CompletedProcess[bytes], float]:
    secret = tmp_path / f"pw-{os.urandom(4).hex()}"
    secret.write_text(password)
    secret.chmod(0o600)
    flags = ["--broker", bootstrap, "--security-protocol", protocol]
    flags += ["--sasl-mechanism", mechanism, "--sasl-username", "alice"]
    flags += ["--sasl-password-file", str(secret)]
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "meter", *args, *flags],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return out, time.monotonic() - started


COMMANDS = [
    pytest.param(["report"], id="report"),
    pytest.param(["send", "-"], id="send"),
    pytest.param(["audit", "--month", "2026-11"], id="audit"),
]


def assert_one_line(
    out: subprocess.CompletedProcess[bytes], elapsed: float, mechanism: str, ending: str
) -> None:
    everything = out.stdout + out.stderr
    assert out.returncode == 2, everything.decode()[-2000:]
    assert elapsed < BOUND_S
    assert WRONG.encode() not in everything
    assert out.stdout == b""
    lines = out.stderr.decode().splitlines()
    assert lines == [lines[0]], lines
    assert lines[0].startswith(f"meter: authentication failed: SASL {mechanism} as user 'alice' ")
    assert lines[0].endswith(ending)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_tansu_refuses_scram(
    tansu_auth: EmbeddedBroker, tmp_path: Path, mechanism: str, command: list[str]
) -> None:
    """Reproduced before: ``KeyError: 'v'`` and a traceback."""
    out, elapsed = meter(
        tmp_path, tansu_auth.bootstrap, mechanism, WRONG, *command, stdin=b'{"x": 1}\n'
    )
    assert_one_line(
        out,
        elapsed,
        mechanism,
        f"rejected by {tansu_auth.bootstrap}: unknown user (check the user name)",
    )


@pytest.mark.parametrize("command", COMMANDS[:2])
def test_tansu_closes_plain(tansu_auth: EmbeddedBroker, tmp_path: Path, command: list[str]) -> None:
    """Tansu 0.6.0 offers no PLAIN: it closes the connection at the handshake."""
    out, elapsed = meter(tmp_path, tansu_auth.bootstrap, "PLAIN", WRONG, *command)
    assert_one_line(
        out,
        elapsed,
        "PLAIN",
        f"was refused: {tansu_auth.bootstrap} closed the connection at the SASL handshake "
        "(does it offer PLAIN?)",
    )


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_a_kafka_like_broker_refuses_a_wrong_password(
    front: SaslFront, tmp_path: Path, mechanism: str, command: list[str]
) -> None:
    """Reproduced before for PLAIN: only "Unable to bootstrap"."""
    out, elapsed = meter(tmp_path, front.bootstrap, mechanism, WRONG, *command)
    assert_one_line(
        out, elapsed, mechanism, f"was rejected by {front.bootstrap} (check the password)"
    )


def test_the_right_password_works(front: SaslFront, tmp_path: Path) -> None:
    """A worker, ``meter send`` and ``meter report`` through SASL, one mechanism each."""
    lines = [line for line in TRICKY.read_bytes().splitlines(keepends=True) if line.strip()]
    thirds = [b"".join(lines[i::3]) for i in range(3)]
    want = report_rows(expected_usage(lines))
    suffix = os.urandom(4).hex()
    topics = ["--jobs-topic", f"jobs-{suffix}", "--usage-topic", f"usage-{suffix}"]
    ARTIFACTS.mkdir(exist_ok=True)
    secret = tmp_path / "worker-pw"
    secret.write_text(PASSWORD)
    secret.chmod(0o600)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (ARTIFACTS / "auth-worker.log").open("wb") as wlog:
        worker = subprocess.Popen(
            [
                sys.executable, "-m", "meter", "worker", *topics,
                "--rejected-topic", f"rejected-{suffix}", "--reports-topic", f"reports-{suffix}",
                "--group", f"meter-{suffix}", "--session-timeout-ms", "6000", "--http-port", "0",
                "--broker", front.bootstrap, "--security-protocol", "SASL_PLAINTEXT",
                "--sasl-mechanism", "SCRAM-SHA-512", "--sasl-username", "alice",
                "--sasl-password-file", str(secret),
            ],
            stdout=wlog, stderr=wlog, env=env,
        )  # fmt: skip
        try:
            for mechanism, part in zip(MECHANISMS, thirds, strict=True):
                sent, _ = meter(
                    tmp_path, front.bootstrap, mechanism, PASSWORD,
                    "send", "-", "--topic", f"jobs-{suffix}", stdin=part,
                )  # fmt: skip
                assert sent.returncode == 0, sent.stderr.decode()[-2000:]
                assert b"sent " in sent.stderr
            rows: dict[str, object] = {}
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                for mechanism in MECHANISMS:
                    out, _ = meter(
                        tmp_path, front.bootstrap, mechanism, PASSWORD,
                        "report", "--format", "json", "--topic", f"usage-{suffix}",
                    )  # fmt: skip
                    assert out.returncode == 0, out.stderr.decode()[-2000:]
                    rows[mechanism] = orjson.loads(out.stdout)["usage"]
                if all(r == want for r in rows.values()):
                    break
                time.sleep(0.5)
            assert rows == dict.fromkeys(MECHANISMS, want)
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(40) == 0
    assert {m for m, _ in front.accepted} == set(MECHANISMS)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
def test_a_worker_with_a_wrong_password_says_so_once_and_stays_not_ready(
    front: SaslFront, tmp_path: Path, mechanism: str
) -> None:
    """The worker retries with backoff (fixing the secret is enough), logs the refusal
    once as one line, and /healthz says why it is not ready."""
    a_worker_refused(front.bootstrap, tmp_path, mechanism)


def a_worker_refused(bootstrap: str, tmp_path: Path, mechanism: str) -> None:
    secret = tmp_path / "worker-pw"
    secret.write_text(WRONG)
    secret.chmod(0o600)
    names = Names(os.urandom(5).hex())
    names.extra = [
        "--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", mechanism,
        "--sasl-username", "alice", "--sasl-password-file", str(secret),
    ]  # fmt: skip
    worker = WorkerProcess(bootstrap, names, f"wrong-{mechanism}")
    try:
        status, body = worker.health()
        deadline = time.monotonic() + 30
        while "authentication failed" not in str(body.get("reason")):
            assert time.monotonic() < deadline, (status, body, worker.log())
            time.sleep(0.5)
            status, body = worker.health()
        assert status == 503
        assert f"SASL {mechanism} as user 'alice'" in str(body["reason"])
        time.sleep(4)  # several retries
        log = worker.log()
        assert worker.proc.poll() is None, log
        assert log.count("authentication failed") == 1, log
        assert WRONG not in log
        assert "Traceback" not in log
        assert "KeyError" not in log
        assert worker.metric('meter_problem{problem="connecting"}') == 1.0
    finally:
        assert worker.terminate() == 0, worker.log()
        worker.close()


# ---------------------------------------------------------------- Apache Kafka


@pytest.mark.parametrize(
    ("mechanism", "command"),
    [
        pytest.param("SCRAM-SHA-256", ["send", "-"], id="SCRAM-SHA-256-send"),
        pytest.param("SCRAM-SHA-512", ["report"], id="SCRAM-SHA-512-report"),
        pytest.param("SCRAM-SHA-256", ["audit", "--month", "2026-11"], id="SCRAM-SHA-256-audit"),
    ],
)
def test_apache_kafka_refuses_a_wrong_password(
    secured_kafka: KafkaBroker, tmp_path: Path, mechanism: str, command: list[str]
) -> None:
    out, elapsed = meter(
        tmp_path, secured_kafka.bootstrap, mechanism, WRONG, *command, stdin=b'{"x": 1}\n'
    )
    assert_one_line(
        out, elapsed, mechanism, f"was rejected by {secured_kafka.bootstrap} (check the password)"
    )


def test_apache_kafka_does_not_offer_plain(secured_kafka: KafkaBroker, tmp_path: Path) -> None:
    out, elapsed = meter(tmp_path, secured_kafka.bootstrap, "PLAIN", WRONG, "report")
    assert_one_line(
        out,
        elapsed,
        "PLAIN",
        f"is not offered by {secured_kafka.bootstrap} (it offers: SCRAM-SHA-512, SCRAM-SHA-256)",
    )


@pytest.mark.parametrize(
    ("mechanism", "protocol"), [("SCRAM-SHA-256", "SASL_PLAINTEXT"), ("SCRAM-SHA-512", "SASL_SSL")]
)
def test_apache_kafka_accepts_the_right_password_over_sasl_and_tls(
    secured_kafka: KafkaBroker, tmp_path: Path, mechanism: str, protocol: str
) -> None:
    """``meter report`` logs in with each mechanism on each listener (its ACLs: Read)."""
    kafka = secured_kafka
    assert kafka.tls is not None
    usage, lic = f"usage-{os.urandom(4).hex()}", f"license-{os.urandom(4).hex()}"
    names = [usage, f"{usage}.corrections", lic, f"{lic}.corrections"]
    acls = [KafkaAcl("User:alice", "topic", name, "Read") for name in names]
    tls = protocol == "SASL_SSL"
    bootstrap = kafka.tls_bootstrap if tls else kafka.bootstrap
    extra = ["--ssl-cafile", str(kafka.tls.cafile)] if tls else []
    create_acls(kafka.admin_bootstrap, acls)
    try:
        out, _ = meter(
            tmp_path, bootstrap, mechanism, SECURED_USERS["alice"],
            "report", "--format", "json", "--topic", usage, "--license-topic", lic, *extra,
            protocol=protocol,
        )  # fmt: skip
    finally:
        delete_acls(kafka.admin_bootstrap, acls)
    assert out.returncode == 0, out.stderr.decode()
    assert orjson.loads(out.stdout)["usage"] == []


def test_a_broker_certificate_meter_does_not_trust_is_one_line(
    secured_kafka: KafkaBroker, tmp_path: Path
) -> None:
    """Without ``--ssl-cafile`` the test CA is unknown: the TLS handshake fails, said once
    (before: aiokafka's ERROR "Unable connect to ..." and "Unable to bootstrap")."""
    out, elapsed = meter(
        tmp_path, secured_kafka.tls_bootstrap, "SCRAM-SHA-512", SECURED_USERS["alice"],
        "send", "-", stdin=b'{"x": 1}\n', protocol="SASL_SSL",
    )  # fmt: skip
    assert out.returncode == 2, (out.stdout + out.stderr).decode()
    assert out.stdout == b""
    lines = out.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"meter: TLS handshake with {secured_kafka.tls_bootstrap} failed: certificate verify failed"
    ), lines
    assert elapsed < BOUND_S


def test_a_worker_with_a_wrong_password_on_apache_kafka_says_so_once_and_stays_not_ready(
    secured_kafka: KafkaBroker, tmp_path: Path
) -> None:
    a_worker_refused(secured_kafka.bootstrap, tmp_path, "SCRAM-SHA-512")


def test_a_worker_that_does_not_trust_the_broker_certificate_says_so_once_and_stays_not_ready(
    secured_kafka: KafkaBroker, tmp_path: Path
) -> None:
    secret = tmp_path / "worker-pw"
    secret.write_text(SECURED_USERS["alice"])
    secret.chmod(0o600)
    names = Names(os.urandom(5).hex())
    names.extra = [
        "--security-protocol", "SASL_SSL", "--sasl-mechanism", "SCRAM-SHA-512",
        "--sasl-username", "alice", "--sasl-password-file", str(secret),
    ]  # fmt: skip
    worker = WorkerProcess(secured_kafka.tls_bootstrap, names, "untrusted")
    try:
        deadline = time.monotonic() + 30
        status, body = worker.health()
        while "TLS handshake" not in str(body.get("reason")):
            assert time.monotonic() < deadline, (status, body, worker.log())
            time.sleep(0.3)
            status, body = worker.health()
        assert status == 503
        assert "certificate verify failed" in str(body["reason"])
        time.sleep(2.5)  # it retries after 0.5 s and 1 s more, and must not say it again
        log = worker.log()
        assert worker.proc.poll() is None, log
        assert log.count("TLS handshake") == 1, log
        assert "Traceback" not in log
        assert "Unable connect" not in log
    finally:
        assert worker.terminate() == 0, worker.log()
        worker.close()
