"""The ``--license`` file (issue 19): what a bad one is called, and a running worker that
notices a changed, broken or deleted one.

Before: ``"licensed_points": 18446744073709551616`` was "got 1.8e19"; a valid 10 MB file
was "not valid JSON at column 1048577" (a capped read cut it); a file changed or deleted
under a running worker changed nothing and logged nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from datetime import date
from pathlib import Path

import orjson
import pytest

from meter.cli.common import watch_license
from meter.domain.license import (
    MAX_LICENSE_BYTES,
    MAX_LICENSED_POINTS,
    LicenseWatch,
    ProviderLicense,
    load_license,
)
from meter.errors import ConfigError

GOOD = b'{"licensed_points": 1000, "expires": "2027-06-30", "history_start": "2026-01"}'


def write(tmp_path: Path, raw: bytes) -> str:
    path = tmp_path / "license.json"
    path.write_bytes(raw)
    return str(path)


@pytest.mark.parametrize(
    ("written", "want"),
    [
        ("18446744073709551616", "licensed_points 18446744073709551616 is out of range: "
         f"allowed 0 to {MAX_LICENSED_POINTS}"),
        (str(10**30), f"licensed_points {10**30} is out of range"),
        (str(MAX_LICENSED_POINTS + 1), "is out of range"),
        ("-1", "licensed_points -1 is out of range: allowed 0 to"),
        ("1e19", "licensed_points must be a whole number >= 0, got 1e19"),
        ("1.5", "licensed_points must be a whole number >= 0, got 1.5"),
        ("1000.0", "licensed_points must be a whole number >= 0, got 1000.0"),
        ("NaN", "not valid JSON"),
        ("Infinity", "not valid JSON"),
    ],
)  # fmt: skip
def test_licensed_points_out_of_range_say_so_with_the_value_as_written(
    tmp_path: Path, written: str, want: str
) -> None:
    path = write(tmp_path, b'{"licensed_points": %s}' % written.encode())
    with pytest.raises(ConfigError) as caught:
        load_license(path)
    assert want in str(caught.value)
    assert "e+19" not in str(caught.value)


def test_the_largest_licensed_points_is_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, b'{"licensed_points": %d}' % MAX_LICENSED_POINTS)
    assert load_license(path).licensed_points == MAX_LICENSED_POINTS


def test_a_valid_but_huge_file_is_said_to_be_too_large_not_bad_json(tmp_path: Path) -> None:
    doc = {"licensed_points": 5, "comment": "x" * (10 * 1024 * 1024)}
    path = write(tmp_path, orjson.dumps(doc))
    with pytest.raises(ConfigError) as caught:
        load_license(path)
    message = str(caught.value)
    assert f"the file is larger than {MAX_LICENSE_BYTES} bytes" in message
    assert "JSON" not in message.split("larger", maxsplit=1)[0]
    assert "column" not in message


def test_a_file_of_exactly_the_cap_is_read(tmp_path: Path) -> None:
    head = b'{"licensed_points": 5, "comment": "'
    raw = head + b"x" * (MAX_LICENSE_BYTES - len(head) - 2) + b'"}'
    assert len(raw) == MAX_LICENSE_BYTES
    assert load_license(write(tmp_path, raw)).licensed_points == 5


# ------------------------------------------------------------------ LicenseWatch (pure)


def lic(points: int = 1000, expires: str | None = "2027-06-30", path: str = "L") -> ProviderLicense:
    return ProviderLicense(
        points, None if expires is None else date.fromisoformat(expires), path, "2026-01"
    )


def test_the_watch_reloads_a_valid_new_license_with_one_info_line() -> None:
    w = LicenseWatch("L", lic())
    assert w.seen(GOOD) is None  # the file it started from: nothing new
    assert w.seen(GOOD) is None
    new = GOOD.replace(b"1000", b"1500").replace(b"2027-06-30", b"2028-06-30")
    assert w.seen(new) == (
        logging.INFO,
        "license file L reloaded: 1000 points, expires 2027-06-30 -> 1500 points, "
        "expires 2028-06-30",
    )
    assert w.current == lic(1500, "2028-06-30")
    assert w.seen(new) is None  # once
    # Only the comment changed: the same license, nothing to say.
    assert w.seen(new[:-1] + b', "comment": "renewed"}') is None
    assert w.current == lic(1500, "2028-06-30")


@pytest.mark.parametrize(
    ("raw", "problem", "said"),
    [
        (b"{licensed_points: 5", None, "L: not valid JSON"),
        (b'{"licensed_points": 18446744073709551616, "history_start": "2026-01"}', None,
         "out of range"),
        (None, "L: cannot read license file: No such file or directory", "No such file"),
        (None, f"L: the file is larger than {MAX_LICENSE_BYTES} bytes", "larger than"),
        (b'{"licensed_points": 5, "history_start": "2025-01"}', None,
         "history_start 2025-01 differs from 2026-01"),
    ],
)  # fmt: skip
def test_a_broken_or_deleted_file_keeps_the_running_license_and_warns_once(
    raw: bytes | None, problem: str | None, said: str
) -> None:
    w = LicenseWatch("L", lic())
    assert w.seen(GOOD) is None
    got = w.seen(raw, problem)
    assert got is not None
    level, message = got
    assert level == logging.WARNING
    assert said in message
    assert message.startswith("license file L")
    assert "keeping the running license (1000 points, expires 2027-06-30)" in message
    assert w.current == lic()
    for _ in range(3):  # every later check of the same problem: silent
        assert w.seen(raw, problem) is None
    assert w.current == lic()
    # Fixed: back to the same license, said once; broken the same way again: warned again.
    assert w.seen(GOOD) == (
        logging.INFO,
        "license file L is valid again: 1000 points, expires 2027-06-30 (unchanged)",
    )
    got = w.seen(raw, problem)
    assert got is not None
    assert got[0] == logging.WARNING


def test_each_distinct_problem_is_warned_once() -> None:
    w = LicenseWatch("L", lic())
    first = w.seen(b"{")
    second = w.seen(b"[")
    assert first is not None
    assert second is not None
    assert first[1] != second[1]
    assert w.seen(b"[") is None
    assert w.current == lic()


# ------------------------------------------------------------------ the worker's loop


def test_the_worker_loop_applies_an_edited_file_and_warns_about_a_deleted_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, GOOD)
    applied: list[ProviderLicense] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        watch = LicenseWatch(path, load_license(path))
        task = asyncio.ensure_future(watch_license(watch, applied.append, stop, every=0.05))

        async def until(check: object) -> None:
            for _ in range(200):
                if callable(check) and check():
                    return
                await asyncio.sleep(0.02)
            raise AssertionError("not seen in 4 s")

        Path(path).write_bytes(GOOD.replace(b"1000", b"2000"))
        await until(lambda: applied and applied[-1].licensed_points == 2000)
        Path(path).unlink()
        await until(lambda: "No such file" in caplog.text)
        await asyncio.sleep(0.3)  # several more checks of the deleted file
        Path(path).write_bytes(GOOD.replace(b"1000", b"3000"))
        # SIGHUP checks at once (the timer is far off now).
        stop_timer = asyncio.Event()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        task = asyncio.ensure_future(watch_license(watch, applied.append, stop_timer, every=600))
        await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: applied and applied[-1].licensed_points == 3000)
        stop_timer.set()
        stop.set()
        await asyncio.wait_for(task, 5)

    with caplog.at_level(logging.INFO, logger="meter"):
        asyncio.run(scenario())
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1000 points, expires 2027-06-30 -> 2000 points" in m for m in infos)
    assert any("2000 points, expires 2027-06-30 -> 3000 points" in m for m in infos)
    assert len(warnings) == 1, warnings  # the deleted file, once for all its checks
    assert "keeping the running license (2000 points" in warnings[0]
    assert applied[-1].licensed_points == 3000
