"""Rating: raw bytes -> parse -> rate card -> ledger, with an outcome per input.

Two ways in, with the same outcomes: :meth:`Rater.feed` takes one event (the streaming
worker's path), :meth:`Rater.feed_block` many JSON lines at once (``meter rate``'s path:
many lines decoded in one call, and only a line the batch cannot vouch for is judged on
its own, by :meth:`Rater.feed_line`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import msgspec

from meter.domain.event import (
    _GOOD_TENANTS,
    DEFAULT_MAX_EVENT_BYTES,
    BatchEvent,
    BatchRefused,
    Event,
    Rejected,
    decode_lines,
    excerpt,
    future_time,
    parse,
    parse_message,
    too_large,
)
from meter.domain.ledger import Cell, Ledger
from meter.domain.license import Key, LicenseLedger, license_ledger, tail_month
from meter.domain.month import _TAILS, TimeError, utc_hour, utc_month
from meter.domain.ratecard import Rate, RateCards

#: Bytes of JSON lines decoded in one call by :meth:`Rater.feed_block`: small enough that a
#: batch refused for one bad line costs little to decode again, large enough that the
#: call's cost is spread over ~50 events.
BATCH_BYTES: Final = 16 * 1024
#: Never a card's date: :meth:`Rater.feed_block` then asks the cards for every event.
_NO_DATE: Final = 10**9
#: No ``not_after`` (``YYYYMMDDHH``): an hour of a day after every date.
_NO_LIMIT: Final = 10**11
#: :func:`~meter.domain.month.utc_month`'s cache with the next month whose 31-day window
#: the date reaches (:func:`~meter.domain.license.tail_month`): (month, date, next or None),
#: by the same key (date, hour, zone).
_WHEN: dict[str, tuple[str, int, str | None]] = {}
_WHEN_MAX: Final = 200_000


#: Tenant ids found valid, each the one string the ledger keeps for it (bounded).
_NAMES: dict[str, str] = {}


def _name(tenant: str, good: set[str]) -> str | None:
    """``tenant`` if parse has found it valid (now kept in :data:`_NAMES`), else ``None``."""
    if tenant not in good:
        return None
    if len(_NAMES) >= 100_000:
        _NAMES.clear()
    _NAMES[tenant] = tenant
    return tenant


def _when(time: str) -> tuple[str, int, str | None] | None:
    """``(month, date, tail month)`` of an RFC 3339 time, cached; ``None`` if invalid."""
    try:
        month, date = utc_month(time)
    except TimeError:
        return None
    hit = (month, date, tail_month(date))
    tail = _TAILS.get(time[13:])  # utc_month has just put it there (unless it was cleared)
    if tail is not None:
        if len(_WHEN) >= _WHEN_MAX:
            _WHEN.clear()
        _WHEN[time[:13] + tail] = hit
    return hit


@dataclass
class Tally:
    """How many inputs had each outcome.  ``read`` is their sum."""

    counted: int = 0
    duplicate: int = 0
    not_counted: int = 0
    rejected: int = 0

    @property
    def read(self) -> int:
        return self.counted + self.duplicate + self.not_counted + self.rejected

    def add(self, outcome: str, n: int = 1) -> None:
        setattr(self, outcome, getattr(self, outcome) + n)

    def as_dict(self) -> dict[str, int]:
        return {
            "read": self.read,
            "counted": self.counted,
            "duplicate": self.duplicate,
            "not_counted": self.not_counted,
            "rejected": self.rejected,
        }


@dataclass
class Rated:
    """What a :class:`Rater` rated, as plain data: its ledger's entries, its tail entries,
    the lower rates its entries were counted at before (:attr:`Rater.raised`), its tally."""

    cells: dict[Cell, dict[str, Rate]]
    tails: dict[Key, Rate]
    raised: dict[Key, list[Rate]]
    tally: Tally


@dataclass
class Rater:
    """Feeds raw events into a ledger and keeps the tally.

    Every input has exactly one outcome, whatever its bytes: ``tally.read`` is
    the number of :meth:`feed` and :meth:`reject` calls.
    """

    cards: RateCards
    ledger: Ledger = field(default_factory=Ledger)
    tally: Tally = field(default_factory=Tally)
    #: Larger events are rejected as ``too_large``.
    max_bytes: int = DEFAULT_MAX_EVENT_BYTES
    #: Sessions in a month's last days, for the next month's 31-day window (license view):
    #: (tenant, next month, type, workload) -> highest rate.
    tails: dict[Key, Rate] = field(default_factory=dict)
    #: For a part of an input rated apart from the parts before it (``meter rate --jobs``):
    #: an entry's lower rates it was counted at, in turn, before its rate now; ``None``: not
    #: kept.  :meth:`join_after` needs them to tell which of the part's counted events the
    #: parts before it had already counted.
    raised: dict[Key, list[Rate]] | None = None
    #: Events dated after this UTC hour (``YYYYMMDDHH``: ``meter rate``'s clock plus the
    #: clock-skew tolerance) are rejected as ``future_time`` (:func:`future_time`);
    #: ``None``: no limit.
    not_after: int | None = None
    _fast_table: tuple[object, dict[tuple[str, object], Rate]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def feed(
        self, raw: bytes | str, headers: Sequence[tuple[str, bytes | None]] | None = None
    ) -> Event | Rejected:
        """Rate one raw event.  Returns the parsed event or why it was rejected.

        With a Kafka message's ``headers``, the message is read in either CloudEvents
        content mode (:func:`parse_message`)."""
        if headers:
            event = parse_message(raw, headers, self.max_bytes)
        else:
            event = parse(raw, self.max_bytes)
        tally = self.tally
        if event.__class__ is Rejected:
            tally.rejected += 1
            return event
        assert isinstance(event, Event)
        cards = self.cards
        if cards._single is not None and event.date >= cards._first:
            rate: Rate | None = cards._single[(event.workload_type, event.license)]
        else:
            rate = cards.rate(event)
        if rate is None:
            tally.rejected += 1
            return no_ratecard(event, self.cards)
        if self.not_after is not None:
            ahead = future_time(event, self.not_after)
            if ahead is not None:
                tally.rejected += 1
                return ahead
        if event.result == "failed":
            tally.not_counted += 1
            return event
        if self.raised is not None:
            flat = (event.tenant_id, event.month, event.workload_type, event.workload_id)
            old = self.ledger.rate(*flat)
            if old is not None and rate > old:
                self.raised.setdefault(flat, []).append(old)
        if self.ledger.add(
            event.tenant_id, event.month, event.workload_type, event.workload_id, rate
        ):
            tally.counted += 1
        else:
            tally.duplicate += 1
        if event.date % 100 >= 29:  # only a month's last days reach the next month's window
            nxt = tail_month(event.date)
            if nxt is not None:
                key = (event.tenant_id, nxt, event.workload_type, event.workload_id)
                old = self.tails.get(key)
                if old is None or rate > old:
                    self.tails[key] = rate
        return event

    def feed_line(self, line: bytes) -> Event | Rejected | None:
        """Rate one line of a JSON lines input, terminator included (``meter rate``).

        A blank line is no input (``None``).  A line longer than :attr:`max_bytes` is
        judged without its terminator (``\\n`` or ``\\r\\n``): rejected as ``too_large``
        with its size if the event is still longer, else fed.
        """
        if not line or line.isspace():
            return None
        max_bytes = self.max_bytes
        if len(line) <= max_bytes:
            return self.feed(line)
        size = len(line)
        if line.endswith(b"\n"):
            size -= 2 if line.endswith(b"\r\n") else 1
        if size > max_bytes:
            return self.reject(too_large(size, max_bytes))
        return self.feed(line[:size])

    def feed_block(self, block: bytes, number: int = 1) -> tuple[list[tuple[int, Rejected]], int]:
        """Rate the lines of ``block`` (whole lines: each but maybe the last ends in
        ``\\n``), numbered from ``number``; return the rejections with their numbers, and
        how many lines there were.

        The outcome of every line, the tally and the ledger are what :meth:`feed_line` of
        each line in turn gives; this is only faster.  The lines are decoded ~50 at a time
        (:func:`~meter.domain.event.decode_lines`) and rated in one loop; a batch that
        cannot be vouched for is split around the line it suspects, and that line, like
        any event the loop has a doubt about, is fed on its own.
        """
        rejected: list[tuple[int, Rejected]] = []
        first = number
        end = len(block)
        span = min(BATCH_BYTES, self.max_bytes)
        pos = 0
        while pos < end:
            # The last newline within ``span`` bytes: then no line of the batch is longer
            # than ``max_bytes``.  A line longer than that is fed on its own.
            cut = block.rfind(b"\n", pos, pos + span) + 1
            if cut == 0:
                if end - pos <= span:
                    cut = end  # the input's last line, without a newline
                else:
                    cut = block.find(b"\n", pos) + 1 or end
                    self._one(block[pos:cut], number, rejected)
                    number += 1
                    pos = cut
                    continue
            number += self._batch(block[pos:cut] if pos or cut < end else block, number, rejected)
            pos = cut
        return rejected, number - first

    def _one(self, line: bytes, number: int, rejected: list[tuple[int, Rejected]]) -> None:
        result = self.feed_line(line)
        if result.__class__ is Rejected:
            assert isinstance(result, Rejected)
            rejected.append((number, result))

    def _batch(self, batch: bytes, number: int, rejected: list[tuple[int, Rejected]]) -> int:
        """Rate the whole lines of ``batch`` (none longer than ``max_bytes``), in order;
        return how many there were."""
        try:
            events = decode_lines(batch)
        except BatchRefused as refused:
            lines = batch.count(b"\n") + (not batch.endswith(b"\n"))
            if lines == 1:
                self._one(batch, number, rejected)
                return 1
            # Split around the suspect (or the middle): the lines before it, it alone,
            # the lines after it.  Each step judges one line alone, so it ends.
            k = refused.line
            if k is None or not 0 <= k < lines:
                k = lines // 2
            start = 0
            for _ in range(k):
                start = batch.index(b"\n", start) + 1
            stop = batch.find(b"\n", start) + 1 or len(batch)
            if k:
                self._batch(batch[:start], number, rejected)
            self._one(batch[start:stop], number + k, rejected)
            if k + 1 < lines:
                self._batch(batch[stop:], number + k + 1, rejected)
            return lines
        self._rate(events, batch, number, rejected)
        return len(events)

    def _rate(
        self,
        events: list[tuple[BatchEvent]],
        batch: bytes,
        number: int,
        rejected: list[tuple[int, Rejected]],
    ) -> None:
        """The hot loop: every event decoded from ``batch``, one line each, in order.

        What :func:`parse` checks beyond the batch decoder's types is checked here (the
        tenant id's characters and the workload id's control characters only when a
        ledger entry is new: an entry already there was checked when it came), and an
        event with any doubt about it is fed alone, by its line, in its turn.
        """
        cards = self.cards
        single = cards._single
        if single is not None:
            table = self._table(single)
            first = cards._first
        else:
            table, first = {}, _NO_DATE
        table_get = table.get
        ledger = self.ledger
        cells_get = ledger.cells.get
        cell = ledger.cell
        tails = self.tails
        tails_get = _TAILS.get
        when_get = _WHEN.get
        good = _GOOD_TENANTS
        names = _NAMES
        names_get = names.get
        # A control character reaches a decoded string only escaped (the batch is ASCII, and
        # JSON allows none of U+0000..U+001F raw) or as a raw DEL (0x7F, which JSON allows):
        # without a backslash and a DEL byte, no workload id holds one.
        plain = batch.find(b"\\") == -1 and batch.find(b"\x7f") == -1
        raised = self.raised
        # Events dated after the limit's hour are judged alone (future_time, in feed); only
        # those on the limit's day need their hour.
        limit = _NO_LIMIT if self.not_after is None else self.not_after
        limit_day = limit // 100
        # New entries are put into their ledger cells at once (later events look them up)
        # and into their tenant-months' totals once a batch (Ledger.index_new), or before
        # any line is fed alone.
        new: list[tuple[Cell, Rate]] = []
        counted = duplicate = not_counted = 0
        rate: Rate | None
        for (event,) in events:
            t = event.time
            # utc_month's two caches, inlined: the part after the hour (validated) gives
            # the rest of the key of the date, hour and zone.
            tail = tails_get(t[13:])
            if tail is None or (hit := when_get(t[:13] + tail)) is None:
                hit = _when(t)
                if hit is None:
                    self._alone(event, events, batch, number, rejected, new)
                    continue
            month, date, nxt = hit
            if date >= limit_day and (date > limit_day or utc_hour(t, date) > limit):
                self._alone(event, events, batch, number, rejected, new)
                continue
            data = event.data
            lic = data.license
            wtype = data.workload_type
            tenant = data.tenant_id
            wid = data.workload_id
            if data.result != "failed":
                held = cells_get((tenant, month, wtype))
                old = None if held is None else held.get(wid)
                if old is not None and old[2] == lic and date >= first:
                    # Most events: a workload already counted at this license's rate (one
                    # card: the same type and license give the same rate).
                    duplicate += 1
                    rate = old
                else:
                    if date >= first:
                        rate = table_get((wtype, lic))
                    else:
                        rate = self._rate_at(date, wtype, lic)
                    if rate is None:  # no rate card, or a license missing
                        self._alone(event, events, batch, number, rejected, new)
                        continue
                    if old is None:
                        # A tenant id checked once is kept, one string for all its entries.
                        name = names_get(tenant)
                        if name is None:
                            name = _name(tenant, good)
                        if name is None or not (plain or wid.isprintable()):
                            self._alone(event, events, batch, number, rejected, new)
                            continue
                        if held is None:
                            held = cell(name, month, wtype)
                        held[wid] = rate
                        new.append(((name, month, wtype), rate))
                        counted += 1
                    elif rate > old:
                        if raised is not None:
                            raised.setdefault((tenant, month, wtype, wid), []).append(old)
                        if new:
                            ledger.index_new(new)
                            new.clear()
                        ledger.add(tenant, month, wtype, wid, rate)
                        counted += 1
                    else:
                        duplicate += 1
                if nxt is not None:  # a session in the next month's 31-day window
                    key = (tenant, nxt, wtype, wid)
                    prev = tails.get(key)
                    if prev is None or rate > prev:
                        tails[key] = rate
            else:
                rate = table_get((wtype, lic)) if date >= first else self._rate_at(date, wtype, lic)
                if (
                    rate is not None
                    and (tenant in names or tenant in good)
                    and (plain or wid.isprintable())
                ):
                    not_counted += 1
                else:
                    self._alone(event, events, batch, number, rejected, new)
        if new:
            ledger.index_new(new)
        tally = self.tally
        tally.counted += counted
        tally.duplicate += duplicate
        tally.not_counted += not_counted

    def _alone(
        self,
        event: BatchEvent,
        events: list[tuple[BatchEvent]],
        batch: bytes,
        number: int,
        rejected: list[tuple[int, Rejected]],
        new: list[tuple[Cell, Rate]],
    ) -> None:
        """Feed the line ``event`` came from on its own (it is rare: found by identity),
        once the ledger holds the ``new`` entries whole."""
        if new:
            self.ledger.index_new(new)
            new.clear()
        k = next(i for i, (e,) in enumerate(events) if e is event)
        start = 0
        for _ in range(k):
            start = batch.index(b"\n", start) + 1
        stop = batch.find(b"\n", start) + 1 or len(batch)
        self._one(batch[start:stop], number + k, rejected)

    def _table(self, single: dict[tuple[str, str | None], Rate]) -> dict[tuple[str, object], Rate]:
        """The single card's rates by (type, license as decoded: ``UNSET`` when absent)."""
        if self._fast_table is None or self._fast_table[0] is not single:
            table: dict[tuple[str, object], Rate] = {
                (wtype, msgspec.UNSET if lic is None else lic): rate
                for (wtype, lic), rate in single.items()
            }
            self._fast_table = (single, table)
        return self._fast_table[1]

    def _rate_at(self, date: int, wtype: str, lic: object) -> Rate | None:
        """The rate of an event on ``date`` when there is more than one card (or the date
        is before the only one); ``None`` before the first card or for a type that needs
        a license and has none."""
        card = self.cards.card_at(date)
        if card is None:
            return None
        return card._lookup.get((wtype, None if lic is msgspec.UNSET else lic))  # type: ignore[arg-type]

    def rated(self) -> Rated:
        """What was rated, as plain data (for another process to :meth:`join_after`)."""
        return Rated(self.ledger.cells, self.tails, self.raised or {}, self.tally)

    def join_after(self, later: Rated) -> None:
        """Join what another rater rated from the part of the input right after this one's,
        as if this rater had gone on to rate it: the ledger and tails joined, the tallies
        added, and each event ``later`` counted at a rate this rater had already counted
        (at that rate or higher) taken as the duplicate it is."""
        ledger = self.ledger
        raised = later.raised
        again = 0
        new: list[tuple[Cell, Rate]] = []
        higher: list[tuple[str, str, str, str, Rate]] = []
        for key, theirs in later.cells.items():
            held = ledger.cell(*key)
            tenant, month, wtype = key
            for wid, rate in theirs.items():
                old = held.get(wid)
                if old is None:
                    held[wid] = rate
                    new.append((key, rate))
                    continue
                if rate > old:
                    higher.append((tenant, month, wtype, wid, rate))
                else:
                    again += 1
                if raised:
                    lower = raised.get((tenant, month, wtype, wid))
                    if lower:
                        again += sum(1 for r in lower if r <= old)
        ledger.index_new(new)
        for entry in higher:
            ledger.add(*entry)
        tails = self.tails
        for tkey, rate in later.tails.items():
            prev = tails.get(tkey)
            if prev is None or rate > prev:
                tails[tkey] = rate
        t, u = self.tally, later.tally
        t.counted += u.counted - again
        t.duplicate += u.duplicate + again
        t.not_counted += u.not_counted
        t.rejected += u.rejected

    def license_view(self, history_start: str | None = None) -> LicenseLedger:
        """The license view (vendor rules) of what was fed; it shares this rater's ledger."""
        return license_ledger(self.ledger, self.tails.items(), history_start)

    def reject(self, rejection: Rejected) -> Rejected:
        """Count an input rejected before it could be fed (e.g. a line too long to read)."""
        self.tally.rejected += 1
        return rejection


def no_ratecard(event: Event, cards: RateCards) -> Rejected:
    if event.date == 0:
        return Rejected(
            "no_ratecard",
            f"time: {excerpt(event.time)} is outside the years 0001 to 9999 in UTC; "
            "no rate card covers it",
        )
    first = cards.cards[0]
    return Rejected(
        "no_ratecard",
        f"time: {excerpt(event.time)} is before the first rate card ({first.version!r}, "
        f"effective {first.effective})",
    )
