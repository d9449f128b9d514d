"""``meter rate --jobs N``: a file rated in N processes prints what one process prints, byte
for byte, in every format."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import orjson
import pytest

import meter.cli.rate as rate_cli
from meter.cli import main
from meter.sim.fleet import generate
from tests.domain.events import line

HERE = Path(__file__).parent
TRICKY = (HERE / "tricky.jsonl").read_bytes()
FORMATS = ["csv", "json", "table", "vspc-csv"]


def rate(path: Path, *args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["rate", str(path), *args]) == 0
    return out.getvalue()


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let files of a few kilobytes be cut into parts."""
    monkeypatch.setattr(rate_cli, "MIN_BYTES_PER_JOB", 1)


def month_ends() -> bytes:
    """Sessions in the last days of months (tail entries of the next month's window), a
    license that changes (a rate that rises in a later part), and failed ones."""
    out = []
    for i, (time, lic, result) in enumerate(
        [
            ("2026-01-30T10:00:00Z", "rental", "success"),
            ("2026-01-31T23:30:00-01:00", "subscription", "success"),
            ("2026-02-27T10:00:00Z", "perpetual", "failed"),
            ("2026-03-31T10:00:00Z", "subscription", "warning"),
        ]
        * 3
    ):
        for w in range(3):
            out.append(line(time=time, license=lic, result=result, workload=f"w{w}", id=f"{i}"))
    return b"\n".join(out) + b"\n"


FILES = {
    "fleet": b"\n".join(
        generate(3000, seed=7, tenants=6, workloads=15, bad_share=0.05, dup_share=0.1)
    )
    + b"\n",
    "tricky": b"\xef\xbb\xbf" + TRICKY * 5,
    "crlf-long-blank": (TRICKY.replace(b"\n", b"\r\n") + b"\n \n" + b"x" * 70_000 + b"\n") * 3
    + TRICKY.rstrip(),
    "month-ends": month_ends() * 2 + b"{not json",
    # Ahead of the tests' clock (2026-12-05T00:00Z, + 1 h): 2099, and either side of the end
    # of the hour the limit falls in; each part's process must apply the same limit.
    "ahead": b"\n".join(
        line(time=t, workload=f"a{n % 4}", id=f"a{n}")
        for n, t in enumerate(
            [
                "2026-12-05T01:59:59Z",
                "2099-01-01T00:00:00Z",
                "2026-12-05T02:00:00Z",
                "2026-12-05T02:59:59+01:00",
                "2026-11-30T10:00:00Z",
            ]
            * 40
        )
    )
    + b"\n",
}


@pytest.mark.usefixtures("small_parts")
def test_every_part_holds_out_the_events_ahead_of_the_clock(tmp_path: Path) -> None:
    path = tmp_path / "ahead.jsonl"
    path.write_bytes(FILES["ahead"])
    (tmp_path / "clock").write_text("2026-12-05T00:00:00Z")
    for jobs in ("1", "3"):
        args = ["--format", "json", "--clock", str(tmp_path / "clock"), "--jobs", jobs]
        doc = orjson.loads(rate(path, *args, "--max-rejected", "1000"))
        assert doc["events"]["rejected"] == 80, jobs
        assert all("plus the clock-skew tolerance" in r["reason"] for r in doc["rejected"])
        assert {r["line"] % 5 for r in doc["rejected"]} == {2, 3}  # 2099 and 02:00Z
        off = orjson.loads(rate(path, *args, "--clock-skew", "off"))
        assert off["events"]["rejected"] == 0


@pytest.mark.usefixtures("small_parts")
@pytest.mark.parametrize("name", sorted(FILES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_any_number_of_jobs_prints_the_same(tmp_path: Path, name: str, fmt: str) -> None:
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(FILES[name])
    (tmp_path / "clock").write_text("2026-12-05T00:00:00Z")
    args = ["--format", fmt, "--clock", str(tmp_path / "clock"), "--max-rejected", "7"]
    one = rate(path, *args, "--jobs", "1")
    for jobs in ("2", "3", "7"):
        assert rate(path, *args, "--jobs", jobs) == one, f"--jobs {jobs}"


@pytest.mark.usefixtures("small_parts")
def test_the_rejected_listing_and_counts_are_global(tmp_path: Path) -> None:
    path = tmp_path / "tricky.jsonl"
    path.write_bytes(TRICKY * 4)
    (tmp_path / "clock").write_text("2026-12-05T00:00:00Z")
    for limit in ("0", "3", "16", "1000"):
        args = ["--format", "json", "--max-rejected", limit, "--clock", str(tmp_path / "clock")]
        assert rate(path, *args, "--jobs", "4") == rate(path, *args, "--jobs", "1")


def test_a_small_file_or_standard_input_takes_one_process(tmp_path: Path) -> None:
    path = tmp_path / "small.jsonl"
    path.write_bytes(TRICKY)
    assert rate(path, "--format", "csv", "--jobs", "4") == rate(path, "--format", "csv")


@pytest.mark.parametrize("value", ["0", "-2", "x"])
def test_jobs_must_be_a_positive_number(value: str) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main(["rate", "-", "--jobs", value])
    assert exc.value.code == 2
    assert "expected 1 or more" in err.getvalue()
