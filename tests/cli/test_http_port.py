"""A taken --http-port is an error, never a silent move to another port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time


def test_a_busy_http_port_is_one_line_and_exit_2() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        # Nothing listens on port 9: the HTTP server starts before any broker is tried.
        out = subprocess.run(
            [sys.executable, "-m", "meter", "--log-level", "WARNING", "worker",
             "--broker", "127.0.0.1:9", "--http-port", str(port)],
            capture_output=True,
            timeout=30,
        )  # fmt: skip
        took = time.monotonic() - started
    assert out.returncode == 2, out.stderr.decode()
    lines = out.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"meter: error: cannot serve HTTP on 127.0.0.1:{port}: "), lines
    assert "--http-port" in lines[0]
    assert took < 15, f"took {took:.1f}s"
