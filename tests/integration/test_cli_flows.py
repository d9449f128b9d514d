"""The command shapes a user (and the outside check) drives, end to end.

``meter broker`` then worker, send and report, with every default: on the embedded broker
(``meter broker``) and on an Apache Kafka node of the test's own (the defaults name the
topics and the group, so the shared broker is not used).  ``meter demo`` starts the
embedded broker itself: it runs on Tansu alone."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import IO

import orjson
import pytest

from tests.integration.conftest import BrokerHandle
from tests.integration.harness import (
    ARTIFACTS,
    TEST_NOW,
    expected_usage,
    own_broker,
    pinned_clock,
    report_rows,
)
from tests.integration.kafka import KafkaBroker
from tests.integration.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.brokers("tansu", "kafka")]

TRICKY = Path(__file__).resolve().parents[1] / "cli" / "tricky.jsonl"


def meter(*args: str) -> list[str]:
    """A meter command line; the commands that run a worker run at the tests' pinned time."""
    clock = pinned_clock(args) if args[0] in {"worker", "run", "demo"} else []
    return [sys.executable, "-m", "meter", *args, *clock]


def _meter_broker(
    port: int, log: IO[bytes], path: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """``meter broker --port PORT``, once it listens (its stderr to ``log``, at ``path``)."""
    broker = subprocess.Popen(meter("broker", "--port", str(port)), stderr=log, env=env)
    deadline = time.monotonic() + 20
    while b"listening on" not in path.read_bytes():
        assert time.monotonic() < deadline, "broker did not start"
        assert broker.poll() is None
        time.sleep(0.1)
    assert b"MEMORY ONLY" in path.read_bytes()
    return broker


def test_broker_worker_send_report(broker: BrokerHandle, unique: str) -> None:
    is_kafka = isinstance(broker, KafkaBroker)
    port = TcpProxy.reserve_port()
    bootstrap = f"127.0.0.1:{port}"
    ARTIFACTS.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # One pair of logs per run: the two brokers' runs may go at once (pytest-xdist).
    broker_log = ARTIFACTS / f"cli-broker-{unique}.log"
    worker_log = ARTIFACTS / f"cli-worker-{unique}.log"
    with broker_log.open("wb") as blog, worker_log.open("wb") as wlog:
        kafka = own_broker(broker, unique, port=port).start() if is_kafka else None
        process = None if is_kafka else _meter_broker(port, blog, broker_log, env)
        worker = None
        try:
            worker = subprocess.Popen(
                meter("worker", "--broker", bootstrap, "--http-port", "0", "--status-page"),
                stdout=wlog,
                stderr=wlog,
                env=env,
            )
            sent = subprocess.run(
                meter("send", str(TRICKY), "--broker", bootstrap),
                capture_output=True,
                check=True,
                timeout=60,
            )
            assert b"sent 34 messages" in sent.stderr
            want = report_rows(expected_usage(TRICKY.read_bytes().splitlines()))
            deadline = time.monotonic() + 60
            rows = None
            while time.monotonic() < deadline:
                out = subprocess.run(
                    meter("report", "--broker", bootstrap, "--format", "json"),
                    capture_output=True,
                    timeout=60,
                )
                if out.returncode == 0:
                    rows = orjson.loads(out.stdout)["usage"]
                    if rows == want:
                        break
                time.sleep(0.5)
            assert rows == want
            # The worker serves the status page too, with the same figures per month.
            page = wait_for_line(worker_log, r"status page on (http://\S+/)")
            with urllib.request.urlopen(page, timeout=5) as resp:
                assert resp.headers["Content-Type"].startswith("text/html")
            for month in sorted({r["month"] for r in want}):
                of_month: list[object] = [r for r in want if r["month"] == month]
                assert api_usage(page, month, of_month) == of_month
        finally:
            if worker is not None:
                worker.send_signal(signal.SIGTERM)
                assert worker.wait(40) == 0
            if process is not None:
                process.send_signal(signal.SIGTERM)
                assert process.wait(20) == 0
            if kafka is not None:
                kafka.stop()
    # A clean start: where the metrics are is said once.  On the embedded broker the
    # expected fallback is one INFO line; Apache Kafka takes the idempotent producer.
    log = worker_log.read_text()
    assert "InitProducerIdRequest" not in log
    errors = [line for line in log.splitlines() if " ERROR " in line]
    if is_kafka:
        # A fresh Apache Kafka has no __consumer_offsets yet: aiokafka logs this at most
        # once while Kafka creates it, and the join then succeeds (the README's broker table).
        first_group = "ERROR aiokafka.consumer.group_coordinator: Group Coordinator Request"
        assert len(errors) <= 1 and all(first_group in e for e in errors), log
    else:
        assert errors == [], log
    idempotence = log.count("INFO meter.stream.worker: broker does not support idempotent")
    assert idempotence == (0 if is_kafka else 1), log
    assert log.count("metrics on http://") == 1, log


def wait_for_line(path: Path, pattern: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while not (m := re.search(pattern, path.read_text(errors="replace"))):
        assert time.monotonic() < deadline, f"{pattern!r} not in {path}"
        time.sleep(0.1)
    return m[1]


def api_usage(page: str, month: str, want: list[object], timeout: float = 30.0) -> list[object]:
    """The page's usage rows of ``month`` once they are ``want``, or the last ones seen at
    ``timeout`` (the view tails a topic: two equal reads can both be from before it read
    anything, which failed once on a fresh clone)."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"{page}api/usage?month={month}", timeout=5) as resp:
            rows: list[object] = orjson.loads(resp.read())["usage"]
        if rows == want or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


# Tansu alone: meter demo starts the embedded broker itself.
def test_demo_runs_and_agrees_with_rate() -> None:
    out = subprocess.run(
        meter("demo", "--events", "3000", "--rate", "3000", "--exit"),
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    text = out.stdout.decode()
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    assert "TOTAL" in text
    assert "equal `meter rate` over the same events" in text
    assert "equals `meter rate --format vspc-csv` over the same events" in text
    assert b"MEMORY ONLY" in out.stderr
    # The pinned clock's month, and the one before for new workloads, with a license.
    now = datetime.fromisoformat(TEST_NOW)
    this = f"{now.year:04d}-{now.month:02d}"
    assert f"LICENSE USAGE (vendor rules) {this} \u2014 running" in text
    lines = text[text.index(f"LICENSE USAGE (vendor rules) {this}") :].splitlines()
    new = int(next(x for x in lines if x.startswith("ALL TYPES")).split()[3])
    assert new > 0, "no new workloads in the demo's month"
    assert re.search(r"license: used \d+ of licensed \d+ points", text)


# Tansu alone: meter demo starts the embedded broker itself.
def test_demo_keeps_its_status_page_up_until_sigterm(tmp_path: Path) -> None:
    out, err = tmp_path / "demo.out", tmp_path / "demo.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        demo = subprocess.Popen(
            meter("demo", "--events", "600", "--rate", "3000"),
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            page = wait_for_line(err, r"status page stays up on (http://\S+/)", timeout=120)
            assert "equal `meter rate`" in out.read_text()
            time.sleep(1)
            assert demo.poll() is None, err.read_text()[-3000:]
            with urllib.request.urlopen(page, timeout=5) as resp:
                assert resp.status == 200
            with urllib.request.urlopen(f"{page}healthz", timeout=5) as resp:
                assert resp.status == 200  # the worker is still up, holding its partitions
            with urllib.request.urlopen(f"{page}api/usage", timeout=5) as resp:
                assert orjson.loads(resp.read())["usage"]
            demo.send_signal(signal.SIGTERM)
            assert demo.wait(40) == 0, err.read_text()[-3000:]
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait(10)
