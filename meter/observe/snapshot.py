"""What ``/metrics`` shows of the ledgers, built in slices so a scrape never stalls the
worker, and bounded so a Prometheus can hold it at any number of tenants.

A worker with 200,000 tenants holds a million tenant-month-type totals.  Walking them in
one go on the event loop blocked polling and heartbeats for seconds (the worker fenced
itself), and exporting each as a series made a 32 MB scrape.  So:

- :func:`snapshot_steps` walks the home partitions' totals in slices of :data:`SLICE`
  tenant-months (each read whole, so one tenant-month is never half updated) and yields
  between slices; :func:`build_snapshot` awaits between them, :func:`snapshot_now` does
  not (tests, and the first scrape of a small worker).
- **Exact aggregates always**: per month and workload type, the sums over every tenant
  (``meter_provider_points``, ``meter_provider_workloads``), the number of tenants, and
  the license view's totals.  These equal ``meter report`` summed over workers.
- **Per-tenant series for the tenants that matter**: the ``top_n`` tenants by points of
  each month (ties: tenant id), and how many were left out; every tenant stays in
  ``/api/usage`` and ``meter report``.
- :class:`Coalesced` serves one cached value to every caller for ``max_age`` seconds
  and shares one rebuild among concurrent callers: ten concurrent scrapes are one walk.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from meter.domain.license import next_month, previous_month

#: Tenant-months read between two yields to the event loop (~1-2 ms of work).
SLICE = 2_000
#: Per-tenant series per month, by default: the tenants with the most points.
DEFAULT_TOP_TENANTS = 100

#: ``(tenant, month, type, workloads, points)``
UsageRow = tuple[str, str, str, int, int]


@dataclass(slots=True)
class UsageSnapshot:
    """The exported view of one worker's home partitions at one moment."""

    #: per ``(month, type)``: ``[workloads, points]`` over every tenant
    provider: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    #: per month: tenants with usage
    tenants: dict[str, int] = field(default_factory=dict)
    #: per month: tenants with usage but no per-tenant series (beyond ``top_n``)
    omitted: dict[str, int] = field(default_factory=dict)
    #: the per-tenant rows exported: the ``top_n`` tenants of each month
    top: list[UsageRow] = field(default_factory=list)
    #: per month: the license view's totals (used, new, previous new points, workloads)
    license: dict[str, dict[str, int]] = field(default_factory=dict)
    #: workload-months dated before the declared history start
    before_history_start: int = 0
    #: tenant-months read to build it (both views)
    walked: int = 0


def snapshot_steps(
    homes: Iterable[Any], months: set[str], top_n: int
) -> Generator[None, None, UsageSnapshot]:
    """Build a :class:`UsageSnapshot` of the active ``homes`` for ``months``, yielding
    between slices.  Each partition's tenant-months are listed first (one C-level copy),
    so events joined between slices neither break the walk nor are half read."""
    snap = UsageSnapshot()
    per_tenant: dict[tuple[str, str], list[tuple[str, int, int]]] = {}
    points_of: dict[tuple[str, str], int] = {}
    wanted = months | {m for m in map(previous_month, months) if m is not None}
    license_out = snap.license
    done = 0
    for hp in [h for h in homes if h.active]:
        for tm in list(hp.ledger.tenant_months()):
            month = tm.month
            if month in months:
                _take_usage(snap, per_tenant, points_of, tm.tenant_id, month,
                            list(tm.totals.items()))  # fmt: skip
            done += 1
            if done % SLICE == 0:
                yield
        for month in months & hp.summaries.keys():
            for tenant, wtype, n, points, _ in hp.summaries[month].usage:
                _take_usage(snap, per_tenant, points_of, tenant, month, [(wtype, [n, points])])
        for lm in list(hp.license.tenant_months()):
            if lm.month in wanted:
                for _, t in list(lm.totals.items()):
                    _take_license(license_out, months, lm.month, t[0], t[1], t[3], t[4])
            done += 1
            if done % SLICE == 0:
                yield
        for month in wanted & hp.summaries.keys():
            for _, _, n, new, _, points, new_points in hp.summaries[month].license:
                _take_license(license_out, months, month, n, new, points, new_points)
        snap.before_history_start += hp.license.before_start()
        yield
    by_month: dict[str, list[tuple[int, str]]] = {}
    for (tenant, month), points in points_of.items():
        by_month.setdefault(month, []).append((points, tenant))
    for month, ranked in by_month.items():
        snap.tenants[month] = len(ranked)
        best = heapq.nsmallest(top_n, ranked, key=lambda pt: (-pt[0], pt[1])) if top_n else []
        snap.omitted[month] = len(ranked) - len(best)
        for _, tenant in best:
            for wtype, n, points in per_tenant[(tenant, month)]:
                snap.top.append((tenant, month, wtype, n, points))
    snap.top.sort()
    snap.walked = done
    return snap


def _take_usage(
    snap: UsageSnapshot,
    per_tenant: dict[tuple[str, str], list[tuple[str, int, int]]],
    points_of: dict[tuple[str, str], int],
    tenant: str,
    month: str,
    totals: Iterable[tuple[str, list[int]]],
) -> None:
    key = (tenant, month)
    rows = per_tenant.setdefault(key, [])
    provider = snap.provider
    for wtype, t in totals:
        n, points = t[0], t[1]
        if n <= 0:
            continue
        rows.append((wtype, n, points))
        agg = provider.get((month, wtype))
        if agg is None:
            provider[(month, wtype)] = [n, points]
        else:
            agg[0] += n
            agg[1] += points
        points_of[key] = points_of.get(key, 0) + points


def _take_license(
    out: dict[str, dict[str, int]],
    months: set[str],
    month: str,
    n: int,
    new: int,
    points: int,
    new_points: int,
) -> None:
    """One tenant-month-type of the license view: into its month, and as the previous
    month's new points into the month after."""
    for into, previous in ((month, False), (next_month(month), True)):
        if into is None or into not in months:
            continue
        o = out.setdefault(
            into,
            {"used_points": 0, "new_points": 0, "previous_new_points": 0,
             "workloads": 0, "new_workloads": 0},
        )  # fmt: skip
        if previous:
            o["previous_new_points"] += new_points
        else:
            o["used_points"] += points
            o["new_points"] += new_points
            o["workloads"] += n
            o["new_workloads"] += new


def snapshot_now(homes: Iterable[Any], months: set[str], top_n: int) -> UsageSnapshot:
    """:func:`snapshot_steps` run to the end at once."""
    steps = snapshot_steps(homes, months, top_n)
    while (snap := _step(steps)) is None:
        pass
    return snap


async def build_snapshot(homes: Iterable[Any], months: set[str], top_n: int) -> UsageSnapshot:
    """:func:`snapshot_steps`, letting the event loop run between slices."""
    steps = snapshot_steps(homes, months, top_n)
    while True:
        snap = _step(steps)
        if snap is not None:
            return snap
        await asyncio.sleep(0)


def _step(steps: Generator[None, None, UsageSnapshot]) -> UsageSnapshot | None:
    """One slice of ``steps``; the snapshot once it is built."""
    try:
        next(steps)
    except StopIteration as done:
        result: UsageSnapshot = done.value
        return result
    return None


T = TypeVar("T")
log = logging.getLogger(__name__)


def _behind(done: asyncio.Future[Any]) -> None:
    """A rebuild nobody waited for: its failure is logged, not lost."""
    if not done.cancelled() and (exc := done.exception()) is not None:
        log.warning("rebuilding a cached HTTP answer failed: %s", exc)


#: The most of the worker's time that rebuilding one cached HTTP answer may take: an
#: answer that took ``d`` seconds to make is served again for ``d / BUILD_SHARE`` seconds
#: at least, so however many clients ask, building for them is at most a tenth of the time.
BUILD_SHARE = 0.1


#: A value past its age is still served at once, while its successor is built, if it is
#: younger than this many age limits (and ``stale_ok`` says so).
STALE_LIMITS = 3


class Coalesced(Generic[T]):
    """One value for every caller, rebuilt at most once per ``max_age`` seconds (longer
    when a build is slow: see :data:`BUILD_SHARE`); callers that arrive during a rebuild
    wait for that one rebuild.  When ``stale_ok()`` (a big build), a value past its age
    but younger than :data:`STALE_LIMITS` age limits is served at once and the rebuild
    goes on behind it: a scrape of 200,000 tenants answers in milliseconds with numbers
    one build old, instead of waiting for the walk."""

    def __init__(
        self,
        build: Callable[[], Awaitable[T]],
        max_age: float,
        clock: Callable[[], float] = time.monotonic,
        fresh: Callable[[T], bool] = lambda value: False,
        stale_ok: Callable[[], bool] = lambda: False,
    ) -> None:
        self._build = build
        self._stale_ok = stale_ok
        #: a value still true to its source (served again whatever its age)
        self._fresh = fresh
        self.max_age = max_age
        self._clock = clock
        self._value: T | None = None
        self._at = float("-inf")
        self._took = 0.0
        self._running: asyncio.Future[T] | None = None
        #: rebuilds done (for tests and the bench)
        self.builds = 0

    @property
    def age_limit(self) -> float:
        """How long the value is served again: ``max_age``, or longer after a slow build."""
        return max(self.max_age, self._took / BUILD_SHARE)

    async def get(self) -> T:
        value = self._value
        if value is not None:
            age = self._clock() - self._at
            if age < self.age_limit or self._fresh(value):
                return value
            if age < STALE_LIMITS * self.age_limit and self._stale_ok():
                if self._running is None:
                    self._running = asyncio.ensure_future(self._rebuild())
                    self._running.add_done_callback(_behind)
                return value
        if self._running is None:
            self._running = asyncio.ensure_future(self._rebuild())
        return await asyncio.shield(self._running)

    async def _rebuild(self) -> T:
        started = self._clock()
        try:
            value = await self._build()
            self._value, self._at = value, self._clock()
            self._took = self._at - started
            self.builds += 1
            return value
        finally:
            self._running = None
