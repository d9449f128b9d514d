"""The benchmarks' event profiles, generated deterministically and cached in ``bench/out``.

- ``today``: ``N`` events of 200 tenants x 50 workloads (10,000 distinct workloads; 93% of
  the events repeat a workload already counted), :func:`meter.sim.fleet.generate`, as the
  shipped benchmarks always had;
- ``provider-1m`` / ``provider-3m``: a provider's month, 1 M / 3 M distinct workloads over
  5,000 tenants (Pareto-sized: a few with tens of thousands of workloads, most with tens),
  each workload backed up on ~3 days of the month (geometric, at least one), events in time
  order, 2% redeliveries, 5% failed sessions, 10% warnings, a few time zones; ~3 M / ~9 M
  events of ~350 bytes.  (The same events as ``bench.bench_stream``'s profiles of the same
  names, so both benchmarks share the files in ``bench/out``.)

Imports only the standard library and :mod:`meter.sim.fleet`, so any benchmark can use it.
"""

from __future__ import annotations

import random
import sys
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from meter.sim.fleet import generate

OUT = Path(__file__).parent / "out"

#: Workload types and their weights (as :mod:`meter.sim.fleet`).
TYPES = [
    ("vm", 50),
    ("replica", 10),
    ("workstation", 15),
    ("server", 15),
    ("cloud_vm", 4),
    ("cloud_database", 2),
    ("cloud_file_share", 2),
    ("cloud_vpc", 2),
]
LICENSES = ("rental", "subscription", "perpetual")
ZONES = ("Z", "Z", "Z", "Z", "Z", "Z", "Z", "+02:00", "-05:00", "+05:30")
_M64 = (1 << 64) - 1
_EVENT = (
    '{"specversion":"1.0","id":"p%d-%d","source":"vbr://%s/vbr-%02d",'
    '"type":"meter.job.workload","time":"%s-%02dT%02d:%02d:%02d%s","data":{"tenant_id":"%s",'
    '"workload_id":"%s","workload_type":"%s","license":"%s","result":"%s","operation":"%s",'
    '"job_id":"job-%d"}}'
)
#: Broken lines, in the ways job systems break them (as :mod:`meter.sim.fleet`): not JSON,
#: no data, a time without a zone, a vm without a license, a tenant id with a slash.
_BROKEN = 5


def _mix(x: int) -> int:
    """splitmix64's finalizer: a bijection of 64-bit integers (so ids never collide)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def workload_id(n: int, seed: int) -> str:
    """A GUID-shaped workload id (as Veeam's), unique per ``n``, fixed by ``seed``."""
    h = f"{_mix(n ^ (seed << 40)):016x}{_mix(n + seed):016x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _broken(kind: int, line: str) -> str:
    if kind == 0:
        return "{not json"
    if kind == 1:
        return '{"specversion": "1.0", "id": "x", "source": "s", "type": "meter.job.workload"}'
    if kind == 2:  # the time without its zone
        head, _, rest = line.partition('"time":"')
        stamp, _, tail = rest.partition('"')
        return f'{head}"time":"{stamp[:19]}"{tail}'
    if kind == 3:  # no license
        head, _, rest = line.partition(',"license":"')
        return head + rest[rest.index('"') + 1 :]
    head, _, rest = line.partition('"tenant_id":"')  # a tenant id with a slash
    tenant, _, tail = rest.partition('"')
    return f'{head}"tenant_id":"{tenant}/eu"{tail}'


def provider_events(
    workloads: int,
    tenants: int = 5_000,
    sessions: float = 3.0,
    seed: int = 1,
    month: str = "2026-11",
    dup_share: float = 0.02,
    bad_share: float = 0.0,
) -> Iterator[bytes]:
    """A provider's month of job events, deterministic by ``seed``.

    ``tenants`` Pareto-sized tenants share ``workloads`` distinct workloads; each workload
    has sessions on ``sessions`` days of the month on average (at least one; geometric),
    at a random time of day, in time order (day by day).  5% of sessions fail and 10%
    warn; 1% carry another license than their tenant's; ``dup_share`` of events are
    delivered twice in a row; ``bad_share`` are broken (none by default, so the events are
    the streaming benchmark's).  About ``workloads * sessions``
    events of ~350 bytes.
    """
    rnd = random.Random(seed)
    weights = [rnd.paretovariate(1.2) for _ in range(tenants)]
    total = sum(weights)
    sizes = [max(1, int(w / total * workloads)) for w in weights]
    k = 0
    while sum(sizes) != workloads:  # spread the rounding
        j = k % tenants
        if sum(sizes) < workloads:
            sizes[j] += 1
        elif sizes[j] > 1:
            sizes[j] -= 1
        k += 1
    tenant_of = array("I")
    for t, size in enumerate(sizes):
        tenant_of.extend([t] * size)
    licenses = [rnd.choice(LICENSES) for _ in range(tenants)]
    names = [f"tenant-{t:05d}" for t in range(tenants)]
    types = [t for t, w in TYPES for _ in range(w)]
    days = 30
    per_day = [array("I") for _ in range(days)]
    more = 1 - 1 / sessions
    rand, pick = rnd.random, rnd.randrange
    for n in range(workloads):
        k = 1
        while k < days and rand() < more:
            k += 1
        for d in rnd.sample(range(days), k) if k > 1 else (pick(days),):
            per_day[d].append(n)
    last: bytes | None = None
    seq = 0
    for d, todo in enumerate(per_day, 1):
        rnd.shuffle(todo)
        for n in todo:
            if last is not None and rand() < dup_share:
                yield last  # redelivered
            t = tenant_of[n]
            wtype = types[_mix(n + seed) % len(types)]
            lic = licenses[t] if rand() >= 0.01 else LICENSES[pick(3)]
            r = rand()
            seq += 1
            line = _EVENT % (
                seed,
                seq,
                names[t],
                n % 7,
                month,
                d,
                pick(24),
                pick(60),
                pick(60),
                ZONES[pick(10)],
                names[t],
                workload_id(n, seed),
                wtype,
                lic,
                "failed" if r < 0.05 else ("warning" if r < 0.15 else "success"),
                "replication" if wtype == "replica" else "backup",
                pick(500) + 1,
            )
            if bad_share and rand() < bad_share:
                line = _broken(pick(_BROKEN), line)
            last = line.encode()
            yield last


@dataclass(frozen=True)
class Profile:
    name: str
    #: Distinct workloads in the month (the events' shape, before rejections).
    workloads: int
    what: str
    make: Callable[[], Iterable[bytes]]
    file: str


def profiles(events: int = 1_000_000) -> dict[str, Profile]:
    """The profiles by name; ``events`` is the size of ``today``."""
    return {
        "today": Profile(
            "today",
            10_000,
            f"{events:,} events, 200 tenants x 50 workloads",
            lambda: generate(events),
            f"events-{events}.jsonl",
        ),
        "provider-1m": Profile(
            "provider-1m",
            1_000_000,
            "1 M workloads, 5,000 tenants, ~3 sessions each",
            lambda: provider_events(1_000_000),
            "provider-1m.jsonl",
        ),
        "provider-3m": Profile(
            "provider-3m",
            3_000_000,
            "3 M workloads, 5,000 tenants, ~3 sessions each",
            lambda: provider_events(3_000_000),
            "provider-3m.jsonl",
        ),
    }


def events_file(profile: Profile) -> Path:
    """The profile's events as JSON lines, generated once and kept in ``bench/out``."""
    path = OUT / profile.file
    if not path.exists():
        OUT.mkdir(exist_ok=True)
        print(f"generating the {profile.name} profile into {path}", file=sys.stderr)
        t0 = time.perf_counter()
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            chunk: list[bytes] = []
            for raw in profile.make():
                chunk.append(raw)
                if len(chunk) >= 100_000:
                    f.write(b"\n".join(chunk) + b"\n")
                    chunk = []
            if chunk:
                f.write(b"\n".join(chunk) + b"\n")
        tmp.rename(path)
        print(f"generated in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return path
