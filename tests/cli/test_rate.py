"""``meter rate`` end to end, as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from meter.cli import main
from tests.domain.events import line

HERE = Path(__file__).parent
TRICKY = HERE / "tricky.jsonl"

# Worked out by hand from the rules in the README, one comment per case in tricky.jsonl.
EXPECTED_USAGE = [
    ("2026-10", "acme", "vm", 1, 0),  # rental VM seen 2026-11-01T01:30+02:00 = October UTC
    ("2026-11", "acme", "replica", 1, 10),  # same id as vm-1, replicated: its own workload
    ("2026-11", "acme", "vm", 2, 10),  # vm-1 (5) + vm-4 rental->subscription (5); vm-3 failed
    ("2026-11", "globex", "cloud_database", 1, 11),
    ("2026-11", "globex", "cloud_file_share", 1, 11),  # warning counts
    ("2026-11", "globex", "cloud_vm", 1, 11),  # no license needed
    ("2026-11", "globex", "cloud_vpc", 1, 0),  # zero points, still a workload
    ("2026-11", "globex", "server", 2, 7),  # perpetual 7 + rental 0
    ("2026-11", "globex", "vm", 1, 0),  # vm-1 again, other tenant, rental
    ("2026-11", "globex", "workstation", 1, 3),  # success + failed = one workload
    ("2026-11", "initech", "vm", 1, 5),  # failed in October, success in November
    ("2026-12", "initech", "replica", 1, 10),  # 2026-11-30T23:30-01:00 = December; rental pays
]
EXPECTED_REJECTED_LINES = list(range(22, 37))


def run_meter(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "meter", *args], input=stdin, capture_output=True, timeout=60
    )


def test_tricky_file_gives_the_totals_the_rules_say() -> None:
    out = run_meter("rate", str(TRICKY), "--format", "json")
    assert out.returncode == 0, out.stderr
    doc = orjson.loads(out.stdout)
    usage = [
        (u["month"], u["tenant_id"], u["workload_type"], u["workloads"], u["points"])
        for u in doc["usage"]
    ]
    assert usage == EXPECTED_USAGE
    assert doc["events"] == {
        "read": 34,
        "counted": 15,
        "duplicate": 1,
        "not_counted": 3,
        "rejected": 15,
    }
    assert [r["line"] for r in doc["rejected"]] == EXPECTED_REJECTED_LINES
    reasons = {r["line"]: r["reason"] for r in doc["rejected"]}
    assert reasons[24] == "data.license: missing (required for workload_type vm)"
    assert reasons[25].startswith("time: ")
    assert reasons[26].startswith("data.tenant_id: ")
    assert reasons[29].startswith("data.workload_id: ")
    assert reasons[34].startswith("data.license: ")
    assert doc["rejected_not_listed"] == 0


def test_stdin_csv_and_table() -> None:
    data = TRICKY.read_bytes()
    csv_out = run_meter("rate", "-", "--format", "csv", stdin=data)
    assert csv_out.returncode == 0
    rows = csv_out.stdout.decode().splitlines()
    assert rows[0] == "month,tenant_id,workload_type,workloads,points"
    assert rows[1:] == [",".join(map(str, r)) for r in EXPECTED_USAGE]
    table = run_meter("rate", str(TRICKY))
    text = table.stdout.decode()
    # One TOTAL per month, derived from the rows above: months are not added into one.
    totals = [ln.split() for ln in text.splitlines() if " TOTAL " in ln]
    months = sorted({r[0] for r in EXPECTED_USAGE})
    assert totals == [
        [m, "TOTAL",
         str(sum(r[3] for r in EXPECTED_USAGE if r[0] == m)),
         str(sum(r[4] for r in EXPECTED_USAGE if r[0] == m))]
        for m in months
    ]  # fmt: skip
    assert [t[2:] for t in totals] == [["1", "0"], ["12", "68"], ["1", "10"]]
    assert "rejected line 24: data.license: missing" in text


def test_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    out = run_meter("rate", str(tmp_path / "missing.jsonl"))
    assert out.returncode == 2
    assert b"cannot read" in out.stderr
    assert b"missing.jsonl" in out.stderr
    assert out.stdout == b""


def test_rejections_are_capped_with_a_count(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b"nope\n" * 5 + line() + b"\n")
    assert main(["rate", str(f), "--format", "json", "--max-rejected", "2"]) == 0
    doc = orjson.loads(capsysbinary.readouterr().out)
    assert [r["line"] for r in doc["rejected"]] == [1, 2]
    assert doc["rejected_not_listed"] == 3
    assert doc["events"]["rejected"] == 5
    assert doc["usage"][0]["points"] == 5


def test_crlf_bom_and_blank_lines(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    f = tmp_path / "win.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + line() + b"\r\n\r\n" + line(workload="vm-2") + b"\r\n")
    assert main(["rate", str(f), "--format", "json"]) == 0
    doc = orjson.loads(capsysbinary.readouterr().out)
    assert doc["events"]["read"] == 2
    assert doc["usage"][0]["workloads"] == 2


def test_custom_ratecard_and_filters(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    card = tmp_path / "card.json"
    rates = {
        t: {"rental": 1, "subscription": 2, "perpetual": 3}
        for t in ["vm", "replica", "workstation", "server"]
    }
    rates |= {t: 4 for t in ["cloud_vm", "cloud_database", "cloud_file_share", "cloud_vpc"]}
    card.write_bytes(
        orjson.dumps({"ratecards": [{"version": "t-1", "effective": "2026-01-01", "rates": rates}]})
    )
    assert (
        main(
            [
                "rate",
                str(TRICKY),
                "--ratecard",
                str(card),
                "--format",
                "json",
                "--month",
                "2026-11",
                "--tenant",
                "acme",
            ]
        )
        == 0
    )
    doc = orjson.loads(capsysbinary.readouterr().out)
    assert [(u["workload_type"], u["workloads"], u["points"]) for u in doc["usage"]] == [
        ("replica", 1, 2),
        ("vm", 2, 4),
    ]


def test_bad_ratecard_is_a_clear_error(tmp_path: Path) -> None:
    card = tmp_path / "card.json"
    card.write_text('{"ratecards": [{"version": "x", "effective": "2026-01-01", "rates": {}}]}')
    out = run_meter("rate", str(TRICKY), "--ratecard", str(card))
    assert out.returncode == 2
    assert b"missing workload type(s) vm" in out.stderr
