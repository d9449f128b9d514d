"""``meter rate FILE``: rate JSON lines offline and print the usage report.

Two views of the same events (see :mod:`meter.domain.license`):

- **tenant usage** (calendar month): ``--format csv`` is only this; ``json`` has it as
  ``usage`` and ``table`` prints it first, as before.
- **license usage** (vendor rules: the 31-day window, new workloads free in their first
  month): ``--format vspc-csv`` is only this (:mod:`meter.report.license`); ``json``
  adds it as ``license_usage`` and ``table`` prints it after the tenant usage.

A month's license report is ``running`` until the month closes (``now`` >=
:func:`~meter.domain.close.closes_at`: 00:00 UTC on the 3rd day of the next month, when
the streaming meter closes it) and ``final`` after.  ``now`` is the system clock, or
``--clock FILE`` as for the other commands.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from itertools import chain
from pathlib import Path
from typing import BinaryIO

from meter.cli.common import add_max_event_bytes_argument, clock_from, month_arg
from meter.domain import Event, Rater, Rejected, load_ratecards
from meter.domain.close import is_closed
from meter.domain.event import too_large
from meter.domain.license import LicenseLedger, LicenseRow, ProviderLicense, load_license
from meter.errors import InputError
from meter.report import FORMATS, UsageReport, render
from meter.report.license import (
    MonthInfo,
    license_section,
    license_table,
    month_info,
    render_license_csv,
)
from meter.report.render import TENANT_USAGE_TITLE

BOM = b"\xef\xbb\xbf"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rate",
        help="rate a file of job events (JSON lines) and print the usage report",
        description="Read job events as JSON lines from FILE (or - for standard input), "
        "rate them by the rate card and print the usage per month, tenant and workload type "
        "(tenant usage, calendar month) and the license usage by the vendor's rules.",
    )
    p.add_argument("file", metavar="FILE", help="JSON lines file, or - for standard input")
    p.add_argument(
        "--format",
        choices=(*FORMATS, "vspc-csv"),
        default="table",
        help="output format: table (both views), json (both), csv (tenant usage), "
        "vspc-csv (the vendor's license usage report) [table]",
    )
    p.add_argument("--ratecard", metavar="FILE", help="rate card file (default: built-in)")
    p.add_argument("--month", type=month_arg, help="only report this month (YYYY-MM)")
    p.add_argument("--tenant", help="only report this tenant")
    p.add_argument(
        "--max-rejected",
        type=int,
        default=100,
        metavar="N",
        help="list at most N rejected lines (the rest are counted) [100]",
    )
    p.add_argument(
        "--history-start",
        type=month_arg,
        metavar="YYYY-MM",
        help="first month of meter's history: it has no new workloads (what ran before is "
        "unknown, so all are billed) [the earliest month in the data]",
    )
    p.add_argument(
        "--license",
        metavar="FILE",
        help='the provider\'s license, JSON: {"licensed_points": N, "expires": "YYYY-MM-DD"}; '
        "used points are shown against it [none declared]",
    )
    p.add_argument(
        "--clock",
        metavar="FILE",
        help="for drills and tests: read the current time (RFC 3339) from FILE instead of "
        "the system clock; it decides which months are final",
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
    cards = load_ratecards(args.ratecard)
    license = load_license(args.license) if args.license else None
    rater = Rater(cards, max_bytes=args.max_event_bytes)
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
    if args.format == "csv":
        sys.stdout.write(render(report, "csv"))
        return 0
    view = rater.license_view(args.history_start)
    rows = view.rows(month=args.month, tenant_id=args.tenant)
    infos = license_months(view, args, clock_from(args.clock)(), license, rows)
    if args.format == "vspc-csv":
        sys.stdout.write(render_license_csv(rows, infos, cards))
    elif args.format == "json":
        report.extra.update(license_section(rows, infos))
        sys.stdout.write(render(report, "json"))
    else:
        sys.stdout.write(f"{TENANT_USAGE_TITLE}\n\n")
        sys.stdout.write(render(report, args.format))
        sys.stdout.write("\n")
        sys.stdout.write(license_table(rows, infos))
    return 0


def month_status(month: str, now: datetime) -> str:
    """``final`` once ``month`` has closed (as the streaming meter closes it), else ``running``."""
    return "final" if is_closed(month, now) else "running"


def license_months(
    view: LicenseLedger,
    args: argparse.Namespace,
    now: datetime,
    license: ProviderLicense | None,
    rows: list[LicenseRow],
) -> list[MonthInfo]:
    """What each reported month's license report is: ``--month``, else every month
    with rows."""
    months = [args.month] if args.month else sorted({r.month for r in rows})
    return [month_info(view, m, month_status(m, now), now, license, args.tenant) for m in months]
