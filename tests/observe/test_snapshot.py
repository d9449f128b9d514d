"""/metrics at any number of tenants: exact provider sums, per-tenant series for the top
tenants only, built in slices between which the event loop runs, one build shared by
concurrent scrapes."""

from __future__ import annotations

import asyncio
import random

from prometheus_client import CollectorRegistry

from meter.domain import load_ratecards
from meter.kafka import KafkaSettings
from meter.observe.metrics import STALE_WALK, instrument
from meter.observe.snapshot import (
    SLICE,
    STALE_LIMITS,
    Coalesced,
    build_snapshot,
    snapshot_now,
)
from meter.stream.config import StreamConfig
from meter.stream.partition import HomePartition
from meter.stream.worker import Worker

MONTHS = {"2026-11", "2026-10"}
RATES = {"vm": (5, "vcsp-2026", "subscription"), "replica": (10, "vcsp-2026", "rental")}


def homes(tenants: int, seed: int = 7) -> list[HomePartition]:
    rnd = random.Random(seed)
    out = [HomePartition(n) for n in range(3)]
    for hp in out:
        hp.recovered(0)
    for t in range(tenants):
        hp = out[t % 3]
        for i in range(rnd.randint(1, 4)):
            month = rnd.choice(["2026-10", "2026-11", "2026-09"])
            wtype = rnd.choice(list(RATES))
            hp.ledger.add(f"t{t:06d}", month, wtype, f"w{i}", RATES[wtype])
    return out


def test_provider_sums_are_exact_and_tenant_series_are_the_top_n() -> None:
    hs = homes(3_000)
    snap = snapshot_now(hs, MONTHS, top_n=25)
    want: dict[tuple[str, str], list[int]] = {}
    per_tenant: dict[tuple[str, str], int] = {}
    for hp in hs:
        for r in hp.ledger.usage():
            if r.month in MONTHS:
                w = want.setdefault((r.month, r.workload_type), [0, 0])
                w[0] += r.workloads
                w[1] += r.points
                per_tenant[(r.month, r.tenant_id)] = (
                    per_tenant.get((r.month, r.tenant_id), 0) + r.points
                )
    assert snap.provider == want
    for month in MONTHS:
        ranked = sorted((-p, t) for (m, t), p in per_tenant.items() if m == month)
        top = {t for _, t in ranked[:25]}
        assert {t for t, m, *_ in snap.top if m == month} == top
        assert snap.tenants[month] == len(ranked)
        assert snap.omitted[month] == len(ranked) - 25
    assert not snapshot_now(hs, MONTHS, top_n=0).top


def test_the_build_yields_to_the_loop_and_tolerates_events_joined_meanwhile() -> None:
    hs = homes(10_000)
    before = snapshot_now(hs, MONTHS, top_n=10)

    async def main() -> tuple[int, object]:
        ticks = 0
        done = asyncio.Event()

        async def other() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                # events keep joining while /metrics is built: new tenant-months too
                hs[0].ledger.add(f"new-{ticks}", "2026-08", "vm", "w", RATES["vm"])
                await asyncio.sleep(0)

        task = asyncio.create_task(other())
        snap = await build_snapshot(hs, MONTHS, top_n=10)
        done.set()
        await task
        return ticks, snap

    ticks, snap = asyncio.run(main())
    assert ticks >= 10_000 // SLICE  # the loop ran between slices
    assert snap == before  # what joined (another month) changed nothing shown


def test_concurrent_scrapes_share_one_build_and_a_fresh_body_is_served_again() -> None:
    now = [0.0]
    builds = []

    async def build() -> bytes:
        builds.append(1)
        await asyncio.sleep(0.01)
        return f"body {len(builds)}".encode()

    async def main() -> list[bytes]:
        cache = Coalesced(build, max_age=5.0, clock=lambda: now[0])
        first = await asyncio.gather(*(cache.get() for _ in range(10)))
        again = await cache.get()
        now[0] = 6.0
        later = await cache.get()
        return [*first, again, later]

    bodies = asyncio.run(main())
    assert bodies[:11] == [b"body 1"] * 11
    assert bodies[11] == b"body 2"
    assert len(builds) == 2


def test_a_big_build_serves_the_last_value_while_the_next_is_built() -> None:
    """stale_ok: past its age the last value is answered at once and one rebuild goes
    on behind it; past STALE_LIMITS age limits, or when not stale_ok, callers wait."""
    now = [0.0]
    builds: list[int] = []
    big = [True]

    async def build() -> bytes:
        builds.append(1)
        await asyncio.sleep(0.01)
        return f"body {len(builds)}".encode()

    async def main() -> list[bytes]:
        cache = Coalesced(build, max_age=5.0, clock=lambda: now[0], stale_ok=lambda: big[0])
        out = [await cache.get()]  # nothing yet: waits for the first build
        now[0] = 6.0
        out += await asyncio.gather(*(cache.get() for _ in range(3)))  # the last, at once
        await asyncio.sleep(0.05)  # the one rebuild behind them finishes
        out.append(await cache.get())
        now[0] = 6.0 + STALE_LIMITS * 5.0  # too old to serve: wait
        out.append(await cache.get())
        big[0] = False
        now[0] += 6.0  # past its age, and not a big build: wait
        out.append(await cache.get())
        return out

    assert asyncio.run(main()) == [b"body 1", b"body 1", b"body 1", b"body 1", b"body 2",
                                   b"body 3", b"body 4"]  # fmt: skip
    assert len(builds) == 4


def test_metrics_at_many_tenants_are_bounded_and_keep_provider_totals() -> None:
    w = Worker(KafkaSettings(bootstrap="127.0.0.1:1"), StreamConfig(), load_ratecards())
    for n, hp in enumerate(homes(20_000)):
        w.homes[n] = hp
    registry = CollectorRegistry()
    collector = instrument(w, registry, lambda: MONTHS, top_tenants=50)
    assert not collector.big()  # nothing walked yet: the first scrape waits for its body
    body = asyncio.run(collector.exposition(registry)).decode()
    assert collector.walked >= STALE_WALK and collector.big()
    tenant_series = [ln for ln in body.splitlines() if ln.startswith("meter_points{")]
    assert len({ln.split('tenant_id="')[1].split('"')[0] for ln in tenant_series}) <= 100
    total = sum(r.points for hp in w.homes.values() for r in hp.ledger.usage() if r.month in MONTHS)
    shown = sum(
        float(ln.rsplit(" ", 1)[1])
        for ln in body.splitlines()
        if ln.startswith("meter_provider_points{")
    )
    assert shown == total
    assert len(body) < 200_000
