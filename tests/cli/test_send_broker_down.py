"""``meter send`` with no broker: one error line, exit 2, nothing left unclosed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TRICKY = Path(__file__).resolve().parent / "tricky.jsonl"


def test_send_with_the_broker_down_is_one_clean_error() -> None:
    # Nothing listens on port 9 (discard).
    out = subprocess.run(
        [sys.executable, "-m", "meter", "send", str(TRICKY), "--broker", "127.0.0.1:9"],
        capture_output=True,
        timeout=60,
    )
    err = out.stderr.decode()
    assert out.returncode == 2, err
    assert "meter: error: Kafka: " in err
    assert "Unclosed" not in err
    assert "Traceback" not in err
    assert err.endswith("\n")
    assert out.stdout == b""
