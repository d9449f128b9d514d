"""``meter send`` reads lines in bounded memory; oversized lines are named, not sent."""

from __future__ import annotations

import io
import tracemalloc

from meter.cli.stream import bounded_lines


def test_lines_within_the_limit_come_whole_and_longer_ones_as_their_size() -> None:
    data = b'{"a": 1}\n' + b"x" * 100 + b"\r\n" + b"y" * 10 + b"\n" + b"z" * 250 + b"\nlast"
    got = list(bounded_lines(io.BytesIO(data), max_bytes=20))
    assert got == [
        (1, b'{"a": 1}\n', 9),
        (2, None, 100),
        (3, b"y" * 10 + b"\n", 11),
        (4, None, 250),
        (5, b"last", 4),
    ]


def test_a_50_mb_line_is_read_in_pieces_never_held() -> None:
    class Zeros(io.RawIOBase):
        """50 MB of zero bytes and a newline, then one short line: made on the fly."""

        def __init__(self) -> None:
            self.data = [(50_000_000, 0), (1, 10), (3, -1)]  # (length, byte; -1: b"ok\n")

        def readable(self) -> bool:
            return True

        def readinto(self, b: memoryview) -> int:  # type: ignore[override]
            if not self.data:
                return 0
            left, byte = self.data[0]
            if byte < 0:
                self.data.pop(0)
                b[:3] = b"ok\n"
                return 3
            n = min(len(b), left)
            b[:n] = bytes([byte]) * n
            if left == n:
                self.data.pop(0)
            else:
                self.data[0] = (left - n, byte)
            return n

    tracemalloc.start()
    got = list(bounded_lines(io.BufferedReader(Zeros(), 8192), max_bytes=64 * 1024))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert got == [(1, None, 50_000_000), (2, b"ok\n", 3)]
    assert peak < 2_000_000, peak
