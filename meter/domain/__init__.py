"""The pure core: event contract, rate cards, monthly ledger, rating.

Imports nothing but the standard library, msgspec and orjson.  Kafka, faust,
Prometheus and the CLI are adapters around it.
"""

from meter.domain.event import (
    EVENT_TYPE,
    LICENSED_TYPES,
    LICENSES,
    REJECTION_CODES,
    RESULTS,
    WORKLOAD_TYPES,
    Event,
    Rejected,
    future_time,
    parse,
    parse_message,
)
from meter.domain.ledger import (
    COUNTED,
    DUPLICATE,
    NOT_COUNTED,
    OUTCOMES,
    REJECTED,
    Ledger,
    TenantMonth,
    UsageRow,
)
from meter.domain.ratecard import (
    Height,
    Rate,
    RateCard,
    RateCards,
    load_ratecards,
    parse_ratecards,
    points_height,
)
from meter.domain.rating import Rater, Tally

__all__ = [
    "COUNTED",
    "DUPLICATE",
    "EVENT_TYPE",
    "LICENSED_TYPES",
    "LICENSES",
    "NOT_COUNTED",
    "OUTCOMES",
    "REJECTED",
    "REJECTION_CODES",
    "RESULTS",
    "WORKLOAD_TYPES",
    "Event",
    "Height",
    "Ledger",
    "Rate",
    "RateCard",
    "RateCards",
    "Rater",
    "Rejected",
    "Tally",
    "TenantMonth",
    "UsageRow",
    "future_time",
    "load_ratecards",
    "parse",
    "parse_message",
    "parse_ratecards",
    "points_height",
]
