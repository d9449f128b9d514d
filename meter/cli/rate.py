"""``meter rate FILE``: rate JSON lines offline and print the usage report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import BinaryIO

from meter.domain import Event, Rater, Rejected, load_ratecards
from meter.domain.event import DEFAULT_MAX_EVENT_BYTES, too_large
from meter.errors import InputError
from meter.report import FORMATS, UsageReport, render

BOM = b"\xef\xbb\xbf"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rate",
        help="rate a file of job events (JSON lines) and print the usage report",
        description="Read job events as JSON lines from FILE (or - for standard input), "
        "rate them by the rate card and print the usage per month, tenant and workload type.",
    )
    p.add_argument("file", metavar="FILE", help="JSON lines file, or - for standard input")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format")
    p.add_argument("--ratecard", metavar="FILE", help="rate card file (default: built-in)")
    p.add_argument("--month", help="only report this month (YYYY-MM)")
    p.add_argument("--tenant", help="only report this tenant")
    p.add_argument(
        "--max-rejected",
        type=int,
        default=100,
        metavar="N",
        help="list at most N rejected lines (the rest are counted) [100]",
    )
    add_max_event_bytes_argument(p)
    p.set_defaults(func=run)


def add_max_event_bytes_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-event-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_EVENT_BYTES,
        metavar="N",
        help="reject larger events as too_large [%(default)s]",
    )


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"not a positive number of bytes: {text!r}")
    return n


@contextmanager
def open_input(name: str) -> Iterator[BinaryIO]:
    if name == "-":
        yield sys.stdin.buffer
        return
    try:
        f = Path(name).open("rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror or exc}") from exc
    try:
        yield f
    finally:
        f.close()


def rate_stream(
    stream: BinaryIO, rater: Rater, max_rejected: int
) -> tuple[list[dict[str, object]], int]:
    """Feed every non-blank line; return (listed rejections, rejections not listed).

    A line is read at most ``rater.max_bytes`` (plus its terminator) at a time: a
    longer one is rejected as ``too_large`` and skipped to its newline without
    ever being held whole, so any input runs in bounded memory.
    """
    rejected: list[dict[str, object]] = []
    not_listed = 0
    feed = rater.feed
    max_bytes = rater.max_bytes
    limit = max_bytes + 2  # the longest event and its "\r\n"
    for number, line in enumerate(iter(partial(stream.readline, limit), b""), 1):
        if number == 1 and line.startswith(BOM):
            line = line[3:]  # noqa: PLW2901 - RFC 8259 lets a parser ignore a BOM
        if len(line) > max_bytes:
            long = _long_line(line, stream, limit, rater)
            if long is None:
                continue
            result = long
        elif line.isspace() or not line:
            continue
        else:
            result = feed(line)
        if result.__class__ is Rejected:
            assert isinstance(result, Rejected)
            if len(rejected) < max_rejected:
                rejected.append({"line": number, "reason": result.reason})
            else:
                not_listed += 1
    return rejected, not_listed


def _long_line(head: bytes, stream: BinaryIO, limit: int, rater: Rater) -> Event | Rejected | None:
    """A line that may not fit (``head`` is its first piece): fed without its
    terminator if the event fits, else rejected after reading the rest of the line
    in pieces and dropping them.  ``None`` for a blank line (skipped, as short ones)."""
    size = len(head)
    blank = head.isspace()
    end = head[-2:]  # the line's last two bytes, for its terminator
    while not end.endswith(b"\n"):
        piece = stream.readline(limit)
        if not piece:
            break
        size += len(piece)
        blank = blank and piece.isspace()
        end = (end + piece[-2:])[-2:]
    if blank:
        return None
    if end.endswith(b"\n"):
        size -= 2 if end == b"\r\n" else 1
    if size > rater.max_bytes:
        return rater.reject(too_large(size, rater.max_bytes))
    return rater.feed(head[:size])


def run(args: argparse.Namespace) -> int:
    rater = Rater(load_ratecards(args.ratecard), max_bytes=args.max_event_bytes)
    try:
        with open_input(args.file) as stream:
            rejected, not_listed = rate_stream(stream, rater, max(args.max_rejected, 0))
    except OSError as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"cannot read {args.file}: {exc.strerror or exc}") from exc
    report = UsageReport(
        usage=rater.ledger.usage(month=args.month, tenant_id=args.tenant),
        tally=rater.tally,
        rejected=rejected,
        rejected_not_listed=not_listed,
    )
    sys.stdout.write(render(report, args.format))
    return 0
