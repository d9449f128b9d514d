"""Rating: raw bytes -> parse -> rate card -> ledger, with an outcome per input."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from meter.domain.event import (
    DEFAULT_MAX_EVENT_BYTES,
    Event,
    Rejected,
    excerpt,
    parse,
    parse_message,
)
from meter.domain.ledger import Ledger
from meter.domain.license import Key, LicenseLedger, license_ledger, tail_month
from meter.domain.ratecard import Rate, RateCards


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
        if event.result == "failed":
            tally.not_counted += 1
            return event
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
