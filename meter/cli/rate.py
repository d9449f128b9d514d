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
import gc
import itertools
import multiprocessing
import os
import stat
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from meter.cli.common import (
    HISTORY_START_HELP,
    add_clock_skew_argument,
    add_max_event_bytes_argument,
    clock_from,
    history_start,
    month_arg,
)
from meter.domain import Rater, load_ratecards
from meter.domain.close import is_closed
from meter.domain.event import not_after, skew_ms, too_large
from meter.domain.license import LicenseLedger, LicenseRow, ProviderLicense, load_license
from meter.domain.rating import Rated
from meter.errors import InputError
from meter.report import FORMATS, UsageReport, render
from meter.report.license import (
    MonthInfo,
    license_section,
    license_table,
    month_infos,
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
        help=HISTORY_START_HELP,
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
    p.add_argument(
        "--jobs",
        type=jobs_arg,
        default=None,
        metavar="N",
        help="rate a file in N processes, one part of it each, and join them (the output is "
        "the same for any N; standard input and files under 8 MiB take one) [all cores]",
    )
    add_clock_skew_argument(p, "the clock (--clock)")
    add_max_event_bytes_argument(p)
    p.set_defaults(func=run)


def jobs_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid number of jobs {text!r:.40}: expected 1 or more")
    return value


def cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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


#: Bytes read at a time: many events, each block rated in one call (:meth:`Rater.feed_block`).
CHUNK = 128 << 10
#: Files smaller than this are rated in one process whatever ``--jobs`` says.
MIN_BYTES_PER_JOB = 8 << 20


@dataclass(frozen=True, slots=True)
class LongLine:
    """A line longer than the read limit, read to its end without being held."""

    size: int  # without its terminator
    blank: bool


def read_blocks(
    stream: BinaryIO, limit: int, size: int | None = None, *, bom: bool = True
) -> Iterator[bytes | LongLine]:
    """The input as blocks of whole lines (each ends in a newline, but the input's last line
    may not) of about :data:`CHUNK` bytes, and every line longer than ``limit`` as a
    :class:`LongLine` in its place.  Reads at most ``size`` bytes (``None``: to the end);
    ``bom``: a UTF-8 byte order mark at the start is dropped (RFC 8259 lets a parser ignore
    it).  Holds at most about ``CHUNK + limit`` bytes, whatever the input."""
    left = size

    def read() -> bytes:
        nonlocal left
        if left is None:
            return stream.read(CHUNK)
        piece = stream.read(min(CHUNK, left))
        left -= len(piece)
        return piece

    carry = read()
    if bom and carry.startswith(BOM):
        carry = carry[len(BOM) :]
    while True:
        chunk = read()
        data = carry + chunk if chunk else carry
        cut = data.rfind(b"\n") + 1 if chunk else len(data)
        if cut:
            yield data[:cut] if cut < len(data) else data
        carry = data[cut:]
        if len(carry) > limit:
            # A line longer than the limit: read on to its end in pieces, holding none.
            length, blank, end = len(carry), carry.isspace(), carry[-2:]
            carry = b""
            while piece := read():
                nl = piece.find(b"\n") + 1
                head = piece[:nl] if nl else piece
                length += len(head)
                blank = blank and head.isspace()
                end = (end + head[-2:])[-2:]
                if nl:
                    carry = piece[nl:]
                    break
            if end.endswith(b"\n"):
                length -= 2 if end == b"\r\n" else 1
            yield LongLine(length, blank)
        if not chunk and not carry:
            return


@dataclass
class Rejections:
    """The rejected lines to list (line number, reason), at most ``limit``; the rest counted."""

    limit: int
    listed: list[tuple[int, str]] = field(default_factory=list)
    not_listed: int = 0

    def add(self, number: int, reason: str) -> None:
        if len(self.listed) < self.limit:
            self.listed.append((number, reason))
        else:
            self.not_listed += 1

    def extend(self, other: Rejections, offset: int) -> None:
        """``other``'s rejections after this one's, its lines numbered from ``offset + 1``."""
        for number, reason in other.listed:
            self.add(number + offset, reason)
        self.not_listed += other.not_listed

    def as_report(self) -> tuple[list[dict[str, object]], int]:
        return [{"line": n, "reason": r} for n, r in self.listed], self.not_listed


def rate_stream(
    stream: BinaryIO,
    rater: Rater,
    max_rejected: int,
    size: int | None = None,
    *,
    bom: bool = True,
) -> tuple[Rejections, int]:
    """Rate every non-blank line (at most ``size`` bytes); return the rejections and the
    number of lines read.

    A line is never held longer than ``rater.max_bytes`` (plus its terminator): a longer
    one is read to its end in pieces and rejected as ``too_large`` with its full size
    (skipped if blank), so any input runs in bounded memory.
    """
    rejections = Rejections(max_rejected)
    number = 1
    max_bytes = rater.max_bytes
    for item in read_blocks(stream, max_bytes + 2, size, bom=bom):
        if item.__class__ is bytes:
            assert isinstance(item, bytes)
            rejected, lines = rater.feed_block(item, number)
            for n, rejection in rejected:
                rejections.add(n, rejection.reason)
            number += lines
        else:
            assert isinstance(item, LongLine)
            if not item.blank:
                rejections.add(number, rater.reject(too_large(item.size, max_bytes)).reason)
            number += 1
    return rejections, number - 1


def rate_input(name: str, rater: Rater, max_rejected: int, jobs: int) -> Rejections:
    """Rate the file ``name`` (``-``: standard input) into ``rater``: in ``jobs`` processes
    when it is a regular file of at least :data:`MIN_BYTES_PER_JOB` bytes a process."""
    with open_input(name) as stream:
        if name != "-" and jobs > 1:
            info = os.fstat(stream.fileno())
            jobs = min(jobs, info.st_size // MIN_BYTES_PER_JOB)
            if stat.S_ISREG(info.st_mode) and jobs > 1:
                return rate_parts(stream, name, rater, max_rejected, jobs, info.st_size)
        return rate_stream(stream, rater, max_rejected)[0]


def split_points(stream: BinaryIO, size: int, parts: int) -> list[int]:
    """Offsets that cut a file of ``size`` bytes into at most ``parts`` ranges of whole
    lines, about equal: 0, each line start nearest after ``size * i / parts``, ``size``."""
    points = [0]
    for i in range(1, parts):
        target = size * i // parts
        if target <= points[-1]:
            continue
        stream.seek(target - 1)
        at = target - 1
        while piece := stream.read(CHUNK):
            nl = piece.find(b"\n")
            if nl != -1:
                at += nl + 1
                break
            at += len(piece)
        if points[-1] < at < size:
            points.append(at)
    stream.seek(0)
    return [*points, size]


def rate_parts(
    stream: BinaryIO, name: str, rater: Rater, max_rejected: int, jobs: int, size: int
) -> Rejections:
    """Rate a regular file in parts of whole lines, each in its own process (this one takes
    the first), and join the results in the file's order: the ledger is a join, so the
    state is the one rating it whole gives; the tallies, the rejected lines' numbers and
    the listing of the first ``max_rejected`` are too (:meth:`Rater.join_after`)."""
    points = split_points(stream, size, jobs)
    ranges = list(itertools.pairwise(points))
    context = multiprocessing.get_context("fork" if "fork" in _METHODS else None)
    with ProcessPoolExecutor(len(ranges) - 1, mp_context=context) as pool:
        later: list[Future[tuple[Rated, Rejections, int]]] = [
            pool.submit(_rate_range, name, start, stop, rater, max_rejected)
            for start, stop in ranges[1:]
        ]
        rejections, lines = rate_stream(stream, rater, max_rejected, ranges[0][1])
        for future in later:
            rated, theirs, count = future.result()
            rater.join_after(rated)
            rejections.extend(theirs, lines)
            lines += count
    return rejections


_METHODS = multiprocessing.get_all_start_methods()


def _rate_range(
    name: str, start: int, stop: int, like: Rater, max_rejected: int
) -> tuple[Rated, Rejections, int]:
    """In a worker process: rate bytes ``start`` to ``stop`` of the file ``name`` with the
    settings of ``like`` (its cards and limits; sent before it rated anything)."""
    gc.disable()
    rater = Rater(like.cards, max_bytes=like.max_bytes, raised={}, not_after=like.not_after)
    with Path(name).open("rb") as stream:
        stream.seek(start)
        rejections, lines = rate_stream(stream, rater, max_rejected, stop - start, bom=False)
    return rater.rated(), rejections, lines


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
    now = clock_from(args.clock)()
    limit = not_after(int(now.timestamp() * 1000), skew_ms(args.clock_skew))
    rater = Rater(cards, max_bytes=args.max_event_bytes, not_after=limit)
    # The ledger holds millions of tuples and makes no cycles: a collector pass over it
    # every few thousand allocations would cost more than the rating.
    gc.disable()
    try:
        rejections = rate_input(args.file, rater, max(args.max_rejected, 0), args.jobs or cores())
    except OSError as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"cannot read {args.file}: {exc.strerror or exc}") from exc
    finally:
        gc.enable()
    rejected, not_listed = rejections.as_report()
    report = UsageReport(
        usage=rater.ledger.usage(month=args.month, tenant_id=args.tenant),
        tally=rater.tally,
        rejected=rejected,
        rejected_not_listed=not_listed,
    )
    if args.format == "csv":
        sys.stdout.write(render(report, "csv"))
        return 0
    view = rater.license_view(history_start(args, license))
    rows = view.rows(month=args.month, tenant_id=args.tenant)
    infos = license_months(view, args, now, license, rows)
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
    return month_infos(view, {m: month_status(m, now) for m in months}, now, license, args.tenant)
