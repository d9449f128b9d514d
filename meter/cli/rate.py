"""``meter rate FILE``: rate JSON lines offline and print the usage report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from meter.domain import Rater, Rejected, load_ratecards
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
    """Feed every non-blank line; return (listed rejections, rejections not listed)."""
    rejected: list[dict[str, object]] = []
    not_listed = 0
    feed = rater.feed
    for number, line in enumerate(stream, 1):
        if number == 1 and line.startswith(BOM):
            line = line[3:]  # noqa: PLW2901 - RFC 8259 lets a parser ignore a BOM
        if line.isspace() or not line:
            continue
        result = feed(line)
        if result.__class__ is Rejected:
            assert isinstance(result, Rejected)
            if len(rejected) < max_rejected:
                rejected.append({"line": number, "reason": result.reason})
            else:
                not_listed += 1
    return rejected, not_listed


def run(args: argparse.Namespace) -> int:
    rater = Rater(load_ratecards(args.ratecard))
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
