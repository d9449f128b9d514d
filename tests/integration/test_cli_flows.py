"""The command shapes a user (and the outside check) drives, end to end."""

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

import orjson
import pytest

from tests.integration.harness import ARTIFACTS, TEST_NOW, expected_usage, pinned_clock, report_rows
from tests.integration.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

TRICKY = Path(__file__).resolve().parents[1] / "cli" / "tricky.jsonl"


def meter(*args: str) -> list[str]:
    """A meter command line; the commands that run a worker run at the tests' pinned time."""
    clock = pinned_clock(args) if args[0] in {"worker", "run", "demo"} else []
    return [sys.executable, "-m", "meter", *args, *clock]


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
            page = wait_for_line(ARTIFACTS / "cli-worker.log", r"status page on (http://\S+/)")
            with urllib.request.urlopen(page, timeout=5) as resp:
                assert resp.headers["Content-Type"].startswith("text/html")
            for month in sorted({r["month"] for r in want}):
                assert api_usage(page, month) == [r for r in want if r["month"] == month]
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


def wait_for_line(path: Path, pattern: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while not (m := re.search(pattern, path.read_text(errors="replace"))):
        assert time.monotonic() < deadline, f"{pattern!r} not in {path}"
        time.sleep(0.1)
    return m[1]


def api_usage(page: str, month: str, timeout: float = 30.0) -> list[object]:
    """The page's usage rows of ``month`` once they stop changing (the view tails a topic)."""
    deadline = time.monotonic() + timeout
    last: list[object] | None = None
    while True:
        with urllib.request.urlopen(f"{page}api/usage?month={month}", timeout=5) as resp:
            rows = orjson.loads(resp.read())["usage"]
        if rows == last or time.monotonic() > deadline:
            return rows
        last = rows
        time.sleep(0.5)


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
