"""Rate cards: points per workload type and license, versioned by effective date.

A rate card file is data the user can replace (``--ratecard FILE``).  It holds
one or more cards; each takes effect at 00:00 UTC of its ``effective`` date and
stays in effect until the next card's.  An event is rated by the card in effect
at its ``time``.  A malformed, overlapping or incomplete file is a
:class:`~meter.errors.RateCardError` at load time, never a silent zero.
"""

from __future__ import annotations

import bisect
import importlib.resources
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import orjson

from meter.domain.event import LICENSED_TYPES, LICENSES, WORKLOAD_TYPES, Event
from meter.domain.month import days_in_month
from meter.errors import RateCardError

#: What rating one event gives: ``(points, card_version, license)`` (license
#: ``""`` when the event had none).  Tuples order by points first, so ``max`` is
#: the "highest rate" rule; ties are broken by card version, then license.
Rate = tuple[int, str, str]


def rental_machine(rate: Rate) -> int:
    """1 if ``rate`` makes a workload a *rental machine*, else 0: charged at its tenant's
    rental license and consuming no points for it (a rental tenant's VM, workstation or
    server backup on the built-in card).  The vendor's license usage report "does not
    include rental machines"; meter counts them (``rental``) beside the others.  A rental
    tenant's replica costs what anyone's does, so it is not one; nor is a cloud type
    (rated without a license)."""
    return 1 if rate[0] == 0 and rate[2] == "rental" else 0


#: A strictly increasing map from the rate order into positive integers: a
#: usage record's ``revision`` is the sum of its workloads' heights, so it grows
#: whenever any workload's rate climbs (points, card version or license).
Height = Callable[[Rate], int]

_DATE: Final = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")
DEFAULT_RATECARD: Final = "default.json"


@dataclass(frozen=True)
class RateCard:
    version: str
    effective: str  # YYYY-MM-DD, 00:00 UTC
    rates: Mapping[str, Mapping[str | None, int]]
    description: str = ""
    _lookup: dict[tuple[str, str | None], Rate] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        for wtype, by_license in self.rates.items():
            for lic, points in by_license.items():
                self._lookup[(wtype, lic)] = (points, self.version, lic or "")

    def points(self, workload_type: str, license: str | None) -> int:
        return self._lookup[(workload_type, license)][0]


class RateCards:
    """The cards of one file, ordered by effective date."""

    def __init__(self, cards: Sequence[RateCard]) -> None:
        if not cards:
            raise RateCardError("rate card file holds no cards")
        self.cards: tuple[RateCard, ...] = tuple(sorted(cards, key=lambda c: c.effective))
        self._starts = [_ordinal(c.effective) for c in self.cards]
        self._single = self.cards[0]._lookup if len(self.cards) == 1 else None
        self._first = self._starts[0]
        heights = _Heights([r for c in self.cards for r in c._lookup.values()])
        #: ``height(rate)``: ``points + 2*rank + 2``, where rank is the rate's position
        #: among every rate these cards produce (every card, type and license, ``""``
        #: for an event without one), in the :data:`Rate` order.  Strictly increasing
        #: in that order, at least ``points + 1``, and never lower for a rate when
        #: cards are *added* to the file.  A rate no card produces gets the odd value
        #: between its neighbours.  A dict lookup, so it costs what a dict lookup does.
        self.height: Height = heights.__getitem__

    def card_at(self, date: int) -> RateCard | None:
        """The card in effect on a UTC date given as ``YYYYMMDD``."""
        i = bisect.bisect_right(self._starts, date)
        return self.cards[i - 1] if i else None

    def rate(self, event: Event) -> Rate | None:
        """Points and card version for an event; ``None`` before the first card."""
        if self._single is not None and event.date >= self._first:
            return self._single[(event.workload_type, event.license)]
        card = self.card_at(event.date)
        if card is None:
            return None
        return card._lookup[(event.workload_type, event.license)]

    @property
    def versions(self) -> tuple[str, ...]:
        return tuple(c.version for c in self.cards)

    def describe(self) -> list[dict[str, object]]:
        return [
            {"version": c.version, "effective": c.effective, "description": c.description}
            for c in self.cards
        ]


def points_height(rate: Rate) -> int:
    """The height without rate cards: ``points + 1``.

    Only weakly increasing (rates that differ in card version or license alone
    tie), so a ledger that publishes revisions takes :attr:`RateCards.height`.
    Summed over a tenant-month it is ``workloads + points``, the revision
    before heights came from the cards.
    """
    return rate[0] + 1


class _Heights(dict[Rate, int]):
    """Height of every rate the cards can produce; any other rate is placed between them."""

    def __init__(self, known: Sequence[Rate]) -> None:
        self.known = sorted(set(known))
        super().__init__((r, r[0] + 2 * i + 2) for i, r in enumerate(self.known))

    def __missing__(self, rate: Rate) -> int:
        # A rate no loaded card produces (a card since removed, in an old changelog):
        # an odd step between its neighbours, not stored, so the map stays bounded.
        return rate[0] + 2 * bisect.bisect_left(self.known, rate) + 1


def _ordinal(date: str) -> int:
    return int(date[0:4]) * 10000 + int(date[5:7]) * 100 + int(date[8:10])


def load_ratecards(path: str | Path | None = None) -> RateCards:
    """Load a rate card file; ``None`` loads the card shipped with the package."""
    if path is None:
        raw = importlib.resources.files("meter.ratecards").joinpath(DEFAULT_RATECARD).read_bytes()
        where = f"<built-in {DEFAULT_RATECARD}>"
    else:
        where = str(path)
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise RateCardError(f"{where}: cannot read rate card file: {exc.strerror}") from exc
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RateCardError(f"{where}: not valid JSON: {exc}") from exc
    return parse_ratecards(doc, where)


def parse_ratecards(doc: object, where: str = "<rate cards>") -> RateCards:
    """Validate a decoded rate card document; every problem names its place."""
    if not isinstance(doc, dict) or not isinstance(doc.get("ratecards"), list):
        raise RateCardError(f"{where}: expected an object with a 'ratecards' list")
    cards: list[RateCard] = []
    seen_versions: set[str] = set()
    seen_dates: dict[str, str] = {}
    for i, item in enumerate(doc["ratecards"]):
        at = f"{where}: ratecards[{i}]"
        if not isinstance(item, dict):
            raise RateCardError(f"{at}: expected an object")
        version = item.get("version")
        if not isinstance(version, str) or not version.strip():
            raise RateCardError(f"{at}.version: missing or not a non-empty string")
        if version in seen_versions:
            raise RateCardError(f"{at}.version: {version!r} appears twice")
        seen_versions.add(version)
        effective = item.get("effective")
        if not isinstance(effective, str) or not _valid_date(effective):
            raise RateCardError(f"{at}.effective: expected a date YYYY-MM-DD, got {effective!r}")
        if effective in seen_dates:
            raise RateCardError(
                f"{at}.effective: {effective} overlaps card {seen_dates[effective]!r}, "
                "which takes effect the same day"
            )
        seen_dates[effective] = version
        rates = item.get("rates")
        if not isinstance(rates, dict):
            raise RateCardError(f"{at}.rates: expected an object")
        _exactly(f"{at}.rates", rates, WORKLOAD_TYPES, "workload type")
        table: dict[str, dict[str | None, int]] = {}
        for wtype in WORKLOAD_TYPES:
            table[wtype] = _rates_for(f"{at}.rates.{wtype}", wtype, rates[wtype])
        description = item.get("description", "")
        if not isinstance(description, str):
            raise RateCardError(f"{at}.description: expected a string")
        cards.append(RateCard(version, effective, table, description))
    return RateCards(cards)


def _rates_for(at: str, wtype: str, spec: object) -> dict[str | None, int]:
    if _is_points(spec):
        assert isinstance(spec, int)
        flat: dict[str | None, int] = dict.fromkeys(LICENSES, spec)
        if wtype not in LICENSED_TYPES:
            flat[None] = spec  # license is optional for these types
        return flat
    if not isinstance(spec, dict):
        raise RateCardError(f"{at}: expected points (an integer >= 0) or an object by license")
    _exactly(at, spec, LICENSES, "license type")
    out: dict[str | None, int] = {}
    for lic in LICENSES:
        if not _is_points(spec[lic]):
            raise RateCardError(f"{at}.{lic}: expected points (an integer >= 0), got {spec[lic]!r}")
        out[lic] = spec[lic]
    if wtype not in LICENSED_TYPES:
        # No license given: charge the highest, never silently zero.
        out[None] = max(out.values())
    return out


def _exactly(at: str, given: dict[str, object], allowed: tuple[str, ...], what: str) -> None:
    """``given`` must have every key of ``allowed`` and no other."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise RateCardError(f"{at}: unknown {what}(s) {', '.join(unknown)}")
    missing = [k for k in allowed if k not in given]
    if missing:
        raise RateCardError(f"{at}: missing {what}(s) {', '.join(missing)}")


def _is_points(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _valid_date(value: str) -> bool:
    m = _DATE.fullmatch(value)
    if m is None:
        return False
    y, mo, d = int(m[1]), int(m[2]), int(m[3])
    return y >= 1 and 1 <= mo <= 12 and 1 <= d <= days_in_month(y, mo)
