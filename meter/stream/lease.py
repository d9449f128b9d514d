"""Proof that this worker is still the member the group gave its partitions to.

Kafka hands a partition to another member once this one has not heartbeated for
the session timeout: a long GC or VM pause, SIGSTOP, a network partition.  The
paused member is not told; when it wakes up, its event loop carries on where it
stopped.  So before a worker publishes from a partition it asks its lease:

- The lease is renewed by every proof of membership in the current generation: a
  successful heartbeat, a successful offset commit, a completed assignment.  The
  renewal time is when the *request* was sent, which is no later than when the
  broker saw it, so the broker's session clock is never behind the lease's.
- It is valid for a fraction of the session timeout after the last proof
  (``LEASE_FRACTION``).  A worker that was paused longer than that finds its
  lease lapsed and fences its partitions before anything else happens.

The generation is the group's rebalance counter: a proof from another
generation proves nothing about the partitions of this one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

log = logging.getLogger(__name__)

#: The lease lasts this fraction of the session timeout after the last proof.
LEASE_FRACTION: Final = 0.8


class Lease:
    def __init__(self, session_timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self.ttl = session_timeout_s * LEASE_FRACTION
        self._clock = clock
        self._proved = float("-inf")
        self.generation: int | None = None

    def granted(self, generation: int, at: float | None = None) -> None:
        """A new assignment in ``generation`` completed (proof as of ``at``)."""
        self.generation = generation
        self._proved = self._clock() if at is None else at

    def renew(self, generation: int, at: float) -> None:
        """A request sent at ``at`` in ``generation`` succeeded."""
        if generation == self.generation and at > self._proved:
            self._proved = at

    def lapse(self) -> None:
        self._proved = float("-inf")

    def valid(self) -> bool:
        return self._clock() - self._proved < self.ttl

    def age(self) -> float:
        return self._clock() - self._proved

    def now(self) -> float:
        return self._clock()


def watch_heartbeats(consumer: Any, lease: Lease) -> bool:
    """Renew ``lease`` on every successful heartbeat of ``consumer``'s group coordinator.

    aiokafka has no public hook for heartbeats, so this wraps the coordinator's
    ``_do_heartbeat`` (aiokafka 0.11 to 0.14; a unit test fails on a version without
    it).  Where it is missing the lease never lapses (an idle worker could not renew
    it) and returns False: a paused worker is then caught only by the changelog
    offsets its writes land at (see :mod:`meter.stream.partition`).
    """
    coordinator = getattr(consumer, "_coordinator", None)
    beat: Callable[[], Awaitable[bool]] | None = getattr(coordinator, "_do_heartbeat", None)
    if coordinator is None or beat is None:
        log.warning(
            "cannot watch group heartbeats on this aiokafka version: a worker paused past its "
            "session timeout is caught by changelog offsets only"
        )
        lease.ttl = float("inf")
        return False

    async def do_heartbeat() -> bool:
        sent = lease.now()
        generation = coordinator.generation
        ok = await beat()
        if ok and coordinator.generation == generation:
            lease.renew(generation, sent)
        return bool(ok)

    coordinator._do_heartbeat = do_heartbeat
    return True
