"""``meter rate`` on any input: one outcome per line, bounded memory, a size limit per line."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter.cli import main
from meter.domain import Rater, load_ratecards
from meter.domain.event import DEFAULT_MAX_EVENT_BYTES
from meter.stream.send import strip_line
from tests.domain.events import line, mutated_events, valid_events
from tests.integration.harness import report_rows

CARDS = load_ratecards()


def rate_json(path: Path, *args: str) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["rate", str(path), "--format", "json", *args]) == 0
    doc: dict[str, Any] = orjson.loads(out.getvalue())
    return doc


def lines_of(data: bytes) -> list[bytes]:
    """The lines as ``meter rate`` sees them: split after each newline, terminators kept."""
    out = data.split(b"\n")
    lines = [x + b"\n" for x in out[:-1]]
    return [*lines, out[-1]] if out[-1] else lines


def expected(data: bytes, max_bytes: int) -> Rater:
    """What meter rate must count, worked out the plain way on lines held whole."""
    rater = Rater(CARDS, max_bytes=max_bytes)
    for number, ln in enumerate(lines_of(data), 1):
        if number == 1 and ln.startswith(b"\xef\xbb\xbf"):
            ln = ln[3:]  # noqa: PLW2901
        if not ln or ln.isspace():
            continue
        rater.feed(strip_line(ln))
    return rater


def usage(rater: Rater) -> list[dict[str, Any]]:
    return report_rows(rater.ledger.usage())


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    st.lists(
        st.one_of(
            valid_events(),
            mutated_events,
            st.binary(max_size=200),
            st.sampled_from([b"", b" ", b"\r", b"\xef\xbb\xbf", b" " * 400]),
        ),
        max_size=25,
    ),
    st.sampled_from([b"\n", b"\r\n"]),
    st.sampled_from([150, 260, 300, DEFAULT_MAX_EVENT_BYTES]),
)
def test_any_file_every_line_one_outcome_totals_of_the_valid_lines(
    items: list[bytes], newline: bytes, max_bytes: int
) -> None:
    data = newline.join(items)
    want = expected(data, max_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.jsonl"
        path.write_bytes(data)
        doc = rate_json(path, "--max-event-bytes", str(max_bytes), "--max-rejected", "0")
    assert doc["events"] == want.tally.as_dict()
    assert doc["usage"] == usage(want)
    assert doc["rejected_not_listed"] == want.tally.rejected


def test_an_oversized_line_is_rejected_and_never_held(tmp_path: Path) -> None:
    big = line(time="x" * 5_000_000)  # the 5 MB event with a bad time
    path = tmp_path / "big.jsonl"
    path.write_bytes(line() + b"\n" + big + b"\r\n" + line(workload="vm-2") + b"\n")
    tracemalloc.start()
    try:
        doc = rate_json(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"peak {peak} bytes while reading a {len(big)}-byte line"
    assert doc["events"] == {
        "read": 3,
        "counted": 2,
        "duplicate": 0,
        "not_counted": 0,
        "rejected": 1,
    }
    assert doc["rejected"] == [
        {"line": 2, "reason": f"event is {len(big)} bytes; the limit is {DEFAULT_MAX_EVENT_BYTES}"}
    ]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b""])
def test_the_line_limit_is_the_event_without_its_terminator(tmp_path: Path, newline: bytes) -> None:
    ok = line(workload="w" * 50)
    limit = len(ok)
    path = tmp_path / "edge.jsonl"
    longer = line(workload="w" * 51)
    blank = b" " * (limit * 3)
    path.write_bytes(longer + newline + blank + newline + newline + ok + newline)
    doc = rate_json(path, "--max-event-bytes", str(limit))
    if newline == b"":  # one line: all of it
        assert doc["events"]["rejected"] == 1
        return
    assert doc["events"]["read"] == 2  # the long blank line is skipped like a short one
    assert doc["events"]["counted"] == 1
    assert doc["rejected"] == [
        {"line": 1, "reason": f"event is {limit + 1} bytes; the limit is {limit}"}
    ]


def test_a_long_line_that_fits_is_rated(tmp_path: Path) -> None:
    ok = line(workload="w" * 50)
    path = tmp_path / "fits.jsonl"
    # With "\r\n" the line is 2 bytes longer than the limit but the event is not.
    path.write_bytes(ok + b"\r\n" + b"\xef\xbb\xbf")
    doc = rate_json(path, "--max-event-bytes", str(len(ok)))
    assert doc["events"]["counted"] == 1
    assert doc["events"]["rejected"] == 1  # a BOM alone, not on line 1, is not JSON


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5"])
def test_max_event_bytes_must_be_a_positive_number(value: str) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main(["rate", "-", "--max-event-bytes", value])
    assert exc.value.code == 2
    assert "expected a whole number above 0" in err.getvalue()


def rss_kib(pid: int) -> int:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_dev_zero_runs_in_bounded_memory() -> None:
    # One endless line: meter rate reads it in pieces and never holds it (it grew to
    # 2.8 GB in 8 s before).  It can never end, so it is stopped after a while.  Its memory
    # is sampled as it passes amounts read, not at times: on a busy machine it reads slower.
    proc = subprocess.Popen(
        [sys.executable, "-m", "meter", "rate", "/dev/zero"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stats = Path(f"/proc/{proc.pid}/io")
    try:
        samples = []
        deadline = time.monotonic() + 300
        for mark in (20_000_000, 40_000_000, 60_000_000, 80_000_000, 100_000_000):
            while int(stats.read_text().split()[1]) < mark:  # rchar
                assert proc.poll() is None, f"meter rate /dev/zero exited {proc.returncode}"
                assert time.monotonic() < deadline, f"read {stats.read_text().split()[1]} bytes"
                time.sleep(0.05)
            samples.append(rss_kib(proc.pid))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert max(samples) < 150_000, samples
    assert max(samples[1:]) - min(samples[1:]) < 10_000, samples  # no growth


def test_a_huge_line_on_stdin(tmp_path: Path) -> None:
    data = line() + b"\n" + b"[" * 3_000_000 + b"\n" + line(workload="vm-2") + b"\n"
    out = subprocess.run(
        [sys.executable, "-m", "meter", "rate", "-", "--format", "json"],
        input=data,
        capture_output=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert out.returncode == 0, out.stderr
    doc = orjson.loads(out.stdout)
    assert doc["events"]["counted"] == 2
    assert doc["rejected"] == [
        {"line": 2, "reason": f"event is 3000000 bytes; the limit is {DEFAULT_MAX_EVENT_BYTES}"}
    ]


@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_a_bom_does_not_count_toward_the_first_lines_limit(tmp_path: Path, extra: int) -> None:
    ok = line(workload="w" * 50)
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + ok + b"\r\n" + line(workload="vm-2") + b"\n")
    doc = rate_json(path, "--max-event-bytes", str(len(ok) + extra))
    assert doc["events"]["read"] == 2
    assert doc["events"]["counted"] == (2 if extra >= 0 else 1)
    if extra < 0:
        assert doc["rejected"] == [
            {"line": 1, "reason": f"event is {len(ok)} bytes; the limit is {len(ok) - 1}"}
        ]


def test_blank_lines_of_any_length_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "blank.jsonl"
    path.write_bytes(b"\n \n\t\r\n" + b" " * 1000 + b"\n" + line() + b"\n" + b" " * 1000)
    doc = rate_json(path, "--max-event-bytes", "300")
    assert doc["events"]["read"] == 1
    assert doc["events"]["counted"] == 1
