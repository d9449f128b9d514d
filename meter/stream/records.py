"""What the streaming meter writes on its topics, as bytes.  Pure: no Kafka here.

- changelog: ``{"v": 1, "entries": [[tenant, month, type, workload, points, card, license], ...]}``;
  a session in a month's last days that also counts in the next month's 31-day window
  (license view) as ``{"v": 1, "tails": [[tenant, next month, type, ...], ...]}``
- usage: the record documented in ``schemas/usage-record.v1.schema.json``
- rejected: the original bytes untouched when they fit, else a bounded prefix, with the
  original headers; the reason and the source travel in bounded headers (:func:`dead_letter`)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from sys import intern
from typing import Any, Final

import orjson

from meter.domain import Rate, TenantMonth
from meter.errors import MeterError

CHANGELOG_VERSION: Final = 1
Entry = tuple[str, str, str, str, Rate]

# Header names on meter.jobs.rejected.
H_REASON: Final = "meter.reason"
H_CODE: Final = "meter.code"
H_TOPIC: Final = "meter.source.topic"
H_PARTITION: Final = "meter.source.partition"
H_OFFSET: Final = "meter.source.offset"
H_REJECTED_AT: Final = "meter.rejected_at"
H_ORIGINAL_SIZE: Final = "meter.original_size"
H_TRUNCATED: Final = "meter.truncated"
#: How many of the original message's headers were left off (only when some were).
H_HEADERS_DROPPED: Final = "meter.original_headers_dropped"
#: The class of the exception behind an ``internal_error`` (the caller passes it in ``extra``).
H_EXCEPTION: Final = "meter.exception"
#: At most this many bytes of UTF-8 in the reason header, and in each ``extra`` header.
MAX_REASON_BYTES: Final = 512
_ELLIPSIS: Final = b"..."


class ChangelogError(MeterError, ValueError):
    """A changelog record that this version of meter cannot read."""


#: A changelog record holds at most about this many bytes (well under Apache Kafka's
#: default 1 MiB message limit, whatever the ids in it).
CHANGELOG_RECORD_BYTES: Final = 256 * 1024
#: A changelog record holds at most this many entries.
CHANGELOG_RECORD_ENTRIES: Final = 2_000


def changelog_slices(
    entries: Sequence[Entry],
    event_ids: Mapping[int, str] | None = None,
    *,
    max_bytes: int = CHANGELOG_RECORD_BYTES,
    max_entries: int = CHANGELOG_RECORD_ENTRIES,
) -> Iterator[slice]:
    """Cut ``entries`` (with late events' ids by index) into changelog records that fit.

    Each slice holds at most ``max_entries`` entries and about ``max_bytes`` bytes once
    encoded (one entry larger than that still gets a record of its own)."""
    ids = event_ids or {}
    start, size = 0, 0
    for n, (t, _, w, i, r) in enumerate(entries):
        eid = ids.get(n)
        # A safe estimate: JSON escapes an ASCII character in at most 2 bytes (controls are
        # not allowed in ids), any other in at most 6 (\\uXXXX; UTF-8 needs at most 4).
        chars = len(t) + len(w) + len(i) + len(r[1]) + (len(eid) if eid else 0)
        wide = not (i.isascii() and r[1].isascii() and (eid is None or eid.isascii()))
        row = chars * (6 if wide else 2) + 64
        if n > start and (size + row > max_bytes or n - start >= max_entries):
            yield slice(start, n)
            start, size = n, 0
        size += row
    if start < len(entries):
        yield slice(start, len(entries))


def changelog_chunks(entries: Sequence[Entry], event_ids: Mapping[int, str]) -> Iterator[bytes]:
    """``entries`` as changelog records that each fit (:func:`changelog_slices`)."""
    if not event_ids and len(entries) <= CHANGELOG_RECORD_ENTRIES:
        # The common case: one record, encoded at once and measured, not estimated.
        raw = orjson.dumps(
            {
                "v": CHANGELOG_VERSION,
                "entries": [[t, m, w, i, r[0], r[1], r[2]] for t, m, w, i, r in entries],
            }
        )
        if len(raw) <= CHANGELOG_RECORD_BYTES:
            yield raw
            return
    for part in changelog_slices(entries, event_ids):
        ids = [event_ids.get(k) for k in range(part.start, part.stop)]
        yield encode_changelog(entries[part], ids)


def encode_changelog(entries: Sequence[Entry], event_ids: Sequence[str | None] = ()) -> bytes:
    """Ledger entries; a late change (to a closed month) carries its event id."""
    rows: list[list[object]] = []
    for n, (t, m, w, i, r) in enumerate(entries):
        eid = event_ids[n] if n < len(event_ids) else None
        row: list[object] = [t, m, w, i, r[0], r[1], r[2]]
        if eid is not None:
            row.append(eid)
        rows.append(row)
    return orjson.dumps({"v": CHANGELOG_VERSION, "entries": rows})


def encode_tails(entries: Sequence[Entry]) -> bytes:
    """Tail entries: ``(tenant, report month, type, workload, rate)`` of sessions in the last
    days of the month before the report month, which that month's 31-day window reaches."""
    return orjson.dumps(
        {
            "v": CHANGELOG_VERSION,
            "tails": [[t, m, w, i, r[0], r[1], r[2]] for t, m, w, i, r in entries],
        }
    )


def encode_firsts(month: str, groups: Iterable[tuple[str, str, list[str]]]) -> bytes:
    """Local state only: the workloads whose first month (the vendor's new-workload rule) is
    ``month``, as (tenant, type, workload ids) groups."""
    return orjson.dumps({"v": CHANGELOG_VERSION, "firsts": month, "groups": list(groups)})


def tail_chunks(entries: Sequence[Entry]) -> Iterator[bytes]:
    """``entries`` (tail entries) as changelog records that each fit."""
    for part in changelog_slices(entries):
        yield encode_tails(entries[part])


#: Workloads of one tenant, type and rate in a month: (tenant, type, rate, workload ids).
StateGroup = tuple[str, str, Rate, list[str]]


def encode_state(
    month: str, groups: Sequence[StateGroup], late: Sequence[tuple[str, str, str, str]] = ()
) -> bytes:
    """Local state only: ``month``'s entries grouped by (tenant, type, rate), each group's
    workload ids in one list (a month of a million workloads loads several times faster
    than as one entry per row), and ``(tenant, type, workload, event id)`` of late ones."""
    rates: dict[Rate, int] = {}
    rows = [[t, w, rates.setdefault(r, len(rates)), ids] for t, w, r, ids in groups]
    return orjson.dumps(
        {
            "v": CHANGELOG_VERSION,
            "state": month,
            "rates": [[r[0], r[1], r[2]] for r in rates],
            "groups": rows,
            "late": late,
        }
    )


#: A workload in a month's license report at close: (tenant, type, workload, rate, new).
LicenseFinal = tuple[str, str, str, Rate, bool]


def encode_license_final_chunk(
    month: str, rows: Iterable[LicenseFinal], history_start: str | None
) -> bytes:
    return orjson.dumps(
        {
            "v": CHANGELOG_VERSION,
            "license_final": month,
            "history_start": history_start,
            "entries": [[t, w, i, r[0], r[1], r[2], int(new)] for t, w, i, r, new in rows],
        }
    )


@dataclass
class ChangelogRecord:
    """One decoded changelog record: ledger entries, tail entries, a final snapshot chunk
    (of the calendar or the license view), or a close marker."""

    entries: list[Entry] = field(default_factory=list)
    event_ids: dict[int, str] = field(default_factory=dict)
    #: Tail entries (license view): the month is the report month whose window they reach.
    tails: list[Entry] = field(default_factory=list)
    final: str | None = None  # month of a final snapshot chunk
    final_entries: list[tuple[str, str, str, Rate]] = field(default_factory=list)
    license_final: str | None = None  # month of a license-view final snapshot chunk
    license_entries: list[LicenseFinal] = field(default_factory=list)
    history_start: str | None = None  # of a license-view final snapshot chunk
    closed: str | None = None  # month of a close marker
    #: Local state only (never on the topic): workloads whose first month is ``firsts``.
    firsts: str | None = None
    first_entries: list[tuple[str, str, str]] = field(default_factory=list)
    #: Local state only: a month's entries grouped by tenant, type and rate
    #: (:func:`encode_state`), and the late ones' event ids.
    state: str | None = None
    groups: list[StateGroup] = field(default_factory=list)
    late: list[tuple[str, str, str, str]] = field(default_factory=list)


_MONTH: Final = re.compile(r"[0-9]{4}-(?:0[1-9]|1[0-2])")
#: Months already seen to be well-formed (few; bounded anyway).
_GOOD_MONTHS: dict[str, str] = {}
#: One copy of each tenant id, workload type, card version and license read from the
#: changelog, and of each rate: a recovered ledger holds them once, as the live one does,
#: not once per entry (bounded: cleared when it outgrows any real fleet).
_SHARED: dict[str, str] = {}
_RATES: dict[Rate, Rate] = {}
_SHARED_MAX: Final = 1_000_000


def _month(value: object) -> str:
    good = _GOOD_MONTHS.get(value) if value.__class__ is str else None
    if good is None:
        if not isinstance(value, str) or _MONTH.fullmatch(value) is None or value < "0001":
            raise ChangelogError(f"not a month (YYYY-MM, 0001-01 to 9999-12): {value!r:.40}")
        if len(_GOOD_MONTHS) > 100_000:
            _GOOD_MONTHS.clear()
        good = _GOOD_MONTHS[value] = value
    return good


def shared(value: str) -> str:
    """The one copy of a tenant id, workload type, card version or license."""
    held = _SHARED.get(value)
    if held is None:
        if len(_SHARED) >= _SHARED_MAX:
            _SHARED.clear()
        held = _SHARED[value] = value
    return held


def _rate(points: object, card: object, lic: object) -> Rate:
    rate = (int(points), str(card), str(lic))  # type: ignore[call-overload]
    held = _RATES.get(rate)
    if held is None:
        if len(_RATES) >= _SHARED_MAX:
            _RATES.clear()
        held = _RATES[rate] = (rate[0], shared(rate[1]), shared(rate[2]))
    return held


def _ids(t: object, w: object, i: object) -> None:
    if t.__class__ is not str or w.__class__ is not str or i.__class__ is not str:
        raise ChangelogError(f"tenant, type and workload must be strings: {[t, w, i]!r:.80}")


def _group_ids(t: object, w: object, got: object) -> list[str]:
    """The workload ids of a (tenant, type, ids) group of local state, checked and interned."""
    if t.__class__ is not str or w.__class__ is not str or got.__class__ is not list:
        raise ChangelogError(f"malformed group of workloads: {[t, w]!r:.80}")
    assert isinstance(got, list)
    for i in got:
        if i.__class__ is not str:
            raise ChangelogError(f"workload ids must be strings: {i!r:.40}")
    return list(map(intern, got))


def read_changelog(raw: bytes) -> ChangelogRecord:
    """Decode one changelog record; anything malformed is a :class:`ChangelogError`.

    Tenant ids, months, workload types and rates come out shared (:func:`shared`), so
    a ledger rebuilt from the changelog is as small as the one built from events.  Workload
    ids come out interned: one string per workload, whatever months' rows and maps it is
    in (as :class:`~meter.domain.license.LicenseLedger` keeps them)."""
    try:
        doc = orjson.loads(raw)
        if doc.get("v") != CHANGELOG_VERSION:
            raise ChangelogError(f"unknown changelog version {doc.get('v')!r:.40}")
        rec = ChangelogRecord()
        if "closed" in doc:
            rec.closed = _month(doc["closed"])
        elif "final" in doc:
            rec.final = _month(doc["final"])
            append = rec.final_entries.append
            for t, w, i, p, c, lic in doc["entries"]:
                _ids(t, w, i)
                append(
                    (
                        shared(t),
                        shared(w),
                        intern(i),
                        _rate(p, c, lic),
                    )
                )
        elif "license_final" in doc:
            rec.license_final = _month(doc["license_final"])
            hs = doc.get("history_start")
            rec.history_start = None if hs is None else _month(hs)
            for t, w, i, p, c, lic, new in doc["entries"]:
                _ids(t, w, i)
                rec.license_entries.append(
                    (
                        shared(t),
                        shared(w),
                        intern(i),
                        _rate(p, c, lic),
                        bool(new),
                    )
                )
        elif "state" in doc:
            rec.state = _month(doc["state"])
            table = [_rate(p, c, lic) for p, c, lic in doc["rates"]]
            for t, w, ri, got in doc["groups"]:
                rec.groups.append((shared(t), shared(w), table[ri], _group_ids(t, w, got)))
            for t, w, i, eid in doc["late"]:
                _ids(t, w, i)
                rec.late.append((shared(t), shared(w), i, str(eid)))
        elif "firsts" in doc:
            rec.firsts = _month(doc["firsts"])
            for t, w, got in doc["groups"]:
                tenant, wtype = shared(t), shared(w)
                rec.first_entries.extend((tenant, wtype, i) for i in _group_ids(t, w, got))
        elif "tails" in doc:
            for t, m, w, i, p, c, lic in doc["tails"]:
                _ids(t, w, i)
                rec.tails.append(
                    (
                        shared(t),
                        _month(m),
                        shared(w),
                        intern(i),
                        _rate(p, c, lic),
                    )
                )
        else:
            entries = rec.entries
            for n, row in enumerate(doc["entries"]):
                t, m, w, i, p, c, lic = row[:7]
                _ids(t, w, i)
                entries.append(
                    (
                        shared(t),
                        _month(m),
                        shared(w),
                        intern(i),
                        _rate(p, c, lic),
                    )
                )
                if len(row) > 7:
                    rec.event_ids[n] = str(row[7])
        return rec
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ChangelogError):
            raise
        raise ChangelogError(f"malformed changelog record: {exc}") from exc


def decode_changelog(raw: bytes) -> list[Entry]:
    """The ledger entries of a changelog record (none for snapshot chunks and markers)."""
    return read_changelog(raw).entries


def usage_key(tenant_id: str, month: str) -> bytes:
    return f"{tenant_id}/{month}".encode()


def usage_record(tm: TenantMonth, updated_at: str, **extra: Any) -> dict[str, Any]:
    """A tenant-month's usage record: O(workload types and card versions), never
    O(workloads) (the ledger keeps the totals as it changes)."""
    totals = tm.totals
    usage: dict[str, dict[str, int]] = {}
    workloads = points = 0
    for wtype in sorted(totals):
        n, p, rental = totals[wtype]
        usage[wtype] = {"workloads": n, "points": p, "rental_workloads": rental}
        workloads += n
        points += p
    cards = tm.ratecards
    doc: dict[str, Any] = {
        "tenant_id": tm.tenant_id,
        "month": tm.month,
        "revision": tm.revision,
        "usage": usage,
        "workloads": workloads,
        "points": points,
        "ratecard": ",".join(cards),
        "ratecards": cards,
        "updated_at": updated_at,
    }
    if extra:
        doc.update(extra)
    return doc


def encode_usage(tm: TenantMonth, updated_at: str, **extra: Any) -> bytes:
    return orjson.dumps(usage_record(tm, updated_at, **extra))


def dead_letter(
    raw: bytes,
    reason: str,
    code: str,
    topic: str,
    partition: int,
    offset: int,
    rejected_at: str,
    *,
    max_bytes: int,
    extra: Sequence[tuple[str, bytes]] = (),
    original_headers: Iterable[tuple[str, bytes | None]] = (),
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The value and headers of one message on the dead-letter topic, bounded whatever ``raw`` is.

    The value is ``raw`` itself when it has at most ``max_bytes`` bytes, else its
    first ``max_bytes`` bytes with ``meter.original_size`` and ``meter.truncated:
    true`` headers (the original stays on its source topic for that topic's
    retention).  The headers are the original message's first (``original_headers``,
    in order, each whole, while they total at most ``max_bytes``; the rest are left
    off and counted in ``meter.original_headers_dropped``; a null value is written
    empty, as aiokafka writes it), then meter's, so a reader that keeps the last of
    a name sees meter's.  The reason, and each ``extra`` header, hold at most
    :data:`MAX_REASON_BYTES` bytes, cut on a UTF-8 character boundary.  So value plus
    headers stay under twice ``max_bytes`` + about 1 KiB (+ the key, which the
    caller writes).
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    headers: list[tuple[str, bytes]] = []
    room, dropped = max_bytes, 0
    for k, v in original_headers:
        kept = v or b""
        size = len(k.encode()) + len(kept)
        if not dropped and size <= room:
            headers.append((k, kept))
            room -= size
        else:
            dropped += 1
    headers += rejected_headers(reason, code, topic, partition, offset, rejected_at)
    value = raw
    if len(raw) > max_bytes:
        value = raw[:max_bytes]
        headers += [(H_ORIGINAL_SIZE, str(len(raw)).encode()), (H_TRUNCATED, b"true")]
    if dropped:
        headers.append((H_HEADERS_DROPPED, str(dropped).encode()))
    headers += [(k, _cut(v, MAX_REASON_BYTES)) for k, v in extra]
    return value, headers


def rejected_headers(
    reason: str, code: str, topic: str, partition: int, offset: int, rejected_at: str
) -> list[tuple[str, bytes]]:
    """The dead-letter headers; the reason is cut to :data:`MAX_REASON_BYTES` bytes."""
    return [
        (H_REASON, bounded_text(reason, MAX_REASON_BYTES)),
        (H_CODE, code.encode()),
        (H_TOPIC, topic.encode()),
        (H_PARTITION, str(partition).encode()),
        (H_OFFSET, str(offset).encode()),
        (H_REJECTED_AT, rejected_at.encode()),
    ]


def bounded_text(text: str, max_bytes: int) -> bytes:
    """``text`` as UTF-8 in at most ``max_bytes`` bytes; a cut one ends in ``...``.

    Never raises: a lone surrogate becomes ``?``.  Reads at most ``max_bytes + 1``
    characters of ``text``, however long it is.
    """
    raw = text[: max_bytes + 1].encode("utf-8", "replace")
    if len(raw) <= max_bytes:
        return raw
    if max_bytes < len(_ELLIPSIS):
        return _cut(raw, max_bytes)
    return _cut(raw, max_bytes - len(_ELLIPSIS)) + _ELLIPSIS


def _cut(raw: bytes, max_bytes: int) -> bytes:
    """At most ``max_bytes`` of ``raw``, never ending inside a UTF-8 character."""
    if len(raw) <= max_bytes:
        return raw
    end = max_bytes
    while end > 0 and raw[end] & 0xC0 == 0x80:  # a continuation byte: the cut splits a character
        end -= 1
    return raw[:end]


def headers_dict(headers: Iterable[tuple[str, bytes]]) -> dict[str, str]:
    return {k: v.decode("utf-8", "replace") for k, v in headers}
