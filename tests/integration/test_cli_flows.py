"""The command shapes a user (and the outside check) drives, end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from tests.integration.harness import ARTIFACTS, expected_usage
from tests.integration.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

TRICKY = Path(__file__).resolve().parents[1] / "cli" / "tricky.jsonl"


def meter(*args: str, **kw: object) -> list[str]:
    return [sys.executable, "-m", "meter", *args]


def test_broker_worker_send_report(tmp_path: Path) -> None:
    port = TcpProxy.reserve_port()
    bootstrap = f"127.0.0.1:{port}"
    ARTIFACTS.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (
        (ARTIFACTS / "cli-broker.log").open("wb") as blog,
        (ARTIFACTS / "cli-worker.log").open("wb") as wlog,
    ):
        broker = subprocess.Popen(meter("broker", "--port", str(port)), stderr=blog, env=env)
        worker = None
        try:
            deadline = time.monotonic() + 20
            while b"listening on" not in (ARTIFACTS / "cli-broker.log").read_bytes():
                assert time.monotonic() < deadline, "broker did not start"
                assert broker.poll() is None
                time.sleep(0.1)
            assert b"MEMORY ONLY" in (ARTIFACTS / "cli-broker.log").read_bytes()
            worker = subprocess.Popen(
                meter("worker", "--broker", bootstrap, "--http-port", "0"),
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
            want = [
                {
                    "month": u.month,
                    "tenant_id": u.tenant_id,
                    "workload_type": u.workload_type,
                    "workloads": u.workloads,
                    "points": u.points,
                }
                for u in expected_usage(TRICKY.read_bytes().splitlines())
            ]
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
        finally:
            if worker is not None:
                worker.send_signal(signal.SIGTERM)
                assert worker.wait(40) == 0
            broker.send_signal(signal.SIGTERM)
            assert broker.wait(20) == 0
    # A clean start on the embedded broker: the expected fallback is one INFO line, and
    # where the metrics are is said once.
    log = (ARTIFACTS / "cli-worker.log").read_text()
    assert "InitProducerIdRequest" not in log
    assert "ERROR" not in log, log
    assert log.count("INFO meter.stream.worker: broker does not support idempotent") == 1, log
    assert log.count("metrics on http://") == 1, log


def test_demo_runs_and_agrees_with_rate() -> None:
    out = subprocess.run(
        meter("demo", "--events", "3000", "--rate", "3000"),
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    text = out.stdout.decode()
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    assert "TOTAL" in text
    assert "equal `meter rate` over the same events" in text
    assert b"MEMORY ONLY" in out.stderr
