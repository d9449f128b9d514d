"""May a month close now?  This host's clock, checked against time from outside it.

A month close is the one irreversible act of the meter, so no host clock decides it
alone.  The worker measures how far its clock is from one or more *references* — the
broker's time (the LogAppendTime it stamps on a heartbeat the worker writes) or, on a
broker that assigns no time, the clocks of the other workers of the group — as
*offsets*: this host's time minus the reference's, positive when this host is ahead.
:func:`close_clock` turns them into a verdict:

- **off** (no tolerance): closes follow this host's clock alone, as before.
- **unknown** (no reference measured, or none recently): closes are held.  Nothing
  says this clock is right, and a close cannot be taken back.
- **ahead** (some reference is behind this host by more than the tolerance): held.  A
  host whose clock runs ahead would finalise a month that is still running.
- **behind** (some reference is ahead by more than the tolerance, none behind): closes
  go on by this host's clock, which only makes them late (the safe side).  Alert: the
  clock is wrong all the same.
- **ok**: closes go on.

Where they go on, the time they are decided at is the *earliest* of this host's clock
and every reference (``host_now - max(0, offsets)``): a month closes once every clock
says it is due, never on the word of the one running fastest.  Pure: nothing here reads
a clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

#: How far this host's clock may be from the reference before closes are held.
DEFAULT_CLOCK_TOLERANCE: Final = timedelta(minutes=5)

State = Literal["ok", "ahead", "behind", "unknown", "off"]
STATES: Final[tuple[State, ...]] = ("ok", "ahead", "behind", "unknown", "off")


@dataclass(frozen=True, slots=True)
class ClockVerdict:
    """What the clock check says about closing months now."""

    #: The time due months are decided at; ``None`` while closes are held.
    now: datetime | None
    state: State
    #: The largest disagreement, this host minus the reference (positive: ahead);
    #: ``None`` when there is no reference.
    skew: timedelta | None
    #: One line for logs and /healthz.
    reason: str

    @property
    def held(self) -> bool:
        return self.now is None


def close_clock(
    host_now: datetime,
    offsets: Iterable[timedelta],
    tolerance: timedelta | None,
    source: str = "the reference clock",
) -> ClockVerdict:
    """Whether months may close now, given this host's time, its ``offsets`` from the
    references (host minus reference) and the ``tolerance`` (``None``: no check)."""
    held = list(offsets)
    skew = max(held, key=abs) if held else None
    if tolerance is None:
        return ClockVerdict(
            host_now, "off", skew, "clock check off (--clock-tolerance off): closes follow "
            "this host's clock alone",
        )  # fmt: skip
    if skew is None:
        return ClockVerdict(
            None, "unknown", None,
            f"month close held: no time from {source} to check this host's clock against",
        )  # fmt: skip
    ahead, behind = max(held), min(held)
    if ahead > tolerance:
        return ClockVerdict(
            None, "ahead", ahead,
            f"month close held: this host's clock is {span(ahead)} ahead of {source} "
            f"(tolerance {span(tolerance)}); fix the host's clock (NTP), usage still counts",
        )  # fmt: skip
    try:
        now = host_now - max(ahead, timedelta(0))
    except OverflowError:
        now = datetime.min.replace(tzinfo=UTC)
    if behind < -tolerance:
        return ClockVerdict(
            now, "behind", behind,
            f"this host's clock is {span(-behind)} behind {source} (tolerance "
            f"{span(tolerance)}): months close that much late; fix the host's clock (NTP)",
        )  # fmt: skip
    return ClockVerdict(
        now, "ok", skew, f"this host's clock is within {span(tolerance)} of {source}"
    )


def span(d: timedelta) -> str:
    """A duration for people: ``152d 3h``, ``4m 10s``, ``0.3s``."""
    s = abs(d.total_seconds())
    sign = "-" if d < timedelta(0) else ""
    if s < 60:
        return f"{sign}{s:.1f}s"
    days, rest = divmod(int(s), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{sign}{days}d {hours}h"
    if hours:
        return f"{sign}{hours}h {minutes}m"
    return f"{sign}{minutes}m {seconds}s"


def broker_offset(host_sent: datetime, host_acked: datetime, broker_time: datetime) -> timedelta:
    """This host's offset from the broker: the broker stamped its time somewhere between
    the send and the acknowledgement, so compare it with their midpoint."""
    return host_sent + (host_acked - host_sent) / 2 - broker_time


def peer_offset(host_read: datetime, peer_time: datetime) -> timedelta:
    """This host's offset from another worker whose heartbeat, stamped ``peer_time`` by
    its clock, was read at ``host_read`` by ours (the transit adds a little to it)."""
    return host_read - peer_time
