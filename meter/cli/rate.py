"""``meter rate FILE``: rate JSON lines offline and print the usage report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from itertools import chain
from pathlib import Path
from typing import BinaryIO

from meter.cli.common import add_max_event_bytes_argument
from meter.domain import Event, Rater, Rejected, load_ratecards
from meter.domain.event import too_large
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

    A line is read at most ``rater.max_bytes`` (plus its terminator) at a time, so
    any input runs in bounded memory.  Lines are fed as read; one that is
    rejected gets a second look (:func:`_second_look`), which skips a blank line
    and judges a longer one whole, without ever holding it.
    """
    rejected: list[dict[str, object]] = []
    not_listed = 0
    feed = rater.feed
    limit = rater.max_bytes + 2  # the longest event and its "\r\n"
    first = stream.readline(limit + len(BOM))
    if first.startswith(BOM):
        first = first[len(BOM) :]  # RFC 8259 lets a parser ignore a BOM
    lines = iter(partial(stream.readline, limit), b"")
    for number, line in enumerate(chain((first,), lines) if first else lines, 1):
        result = feed(line)
        if result.__class__ is Rejected:
            second = _second_look(line, result, stream, limit, rater)
            if second is None:
                continue
            result = second
            if result.__class__ is Rejected:
                assert isinstance(result, Rejected)
                if len(rejected) < max_rejected:
                    rejected.append({"line": number, "reason": result.reason})
                else:
                    not_listed += 1
    return rejected, not_listed


def _second_look(
    line: bytes, result: Event | Rejected, stream: BinaryIO, limit: int, rater: Rater
) -> Event | Rejected | None:
    """A line the rater just rejected, judged again as a whole line.

    A blank line is no input (``None``).  A line longer than the limit was judged
    by its first piece, terminator included: it is read to its end in pieces that
    are dropped, then fed without its terminator if the event fits, else rejected
    as ``too_large`` with its full size.  In both cases the first verdict is
    taken back from the tally.  Any other rejection stands.
    """
    max_bytes = rater.max_bytes
    if len(line) <= max_bytes and line and not line.isspace():
        return result
    rater.tally.add("rejected", -1)  # the verdict on the first piece is taken back
    size, blank = rest_of_line(line, stream, limit)
    if blank:
        return None
    if size > max_bytes:
        return rater.reject(too_large(size, max_bytes))
    return rater.feed(line[:size])


def rest_of_line(first: bytes, stream: BinaryIO, limit: int) -> tuple[int, bool]:
    """Read the rest of the line that began with ``first`` in pieces of at most ``limit``
    bytes, holding none of them; return its size without the terminator, and whether it
    is blank (whitespace only)."""
    size = len(first)
    blank = first.isspace() or not first
    end = first[-2:]  # the line's last two bytes, for its terminator
    while not end.endswith(b"\n"):
        piece = stream.readline(limit)
        if not piece:
            break
        size += len(piece)
        blank = blank and piece.isspace()
        end = (end + piece[-2:])[-2:]
    if end.endswith(b"\n"):
        size -= 2 if end == b"\r\n" else 1
    return size, blank


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
