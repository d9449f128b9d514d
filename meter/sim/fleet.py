"""Generate a realistic stream of job events as JSON lines (deterministic by seed).

A fleet of tenants, each with a license type and a set of workloads; every
workload is backed up (and some replicated) many times a month, so most events
repeat a workload already counted.  Some sessions fail, some events are
delivered twice, some tenants change license mid-month, and a small share of
lines are broken in the ways job systems break them.

    python -m meter.sim.fleet N [--seed S] [--month 2026-11] > events.jsonl
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

import orjson

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
LICENSES = ["rental", "subscription", "perpetual"]
BAD = [
    b"{not json",
    b'{"specversion": "1.0", "id": "x", "source": "s", "type": "meter.job.workload"}',
    None,  # naive time, filled in below
    None,  # missing license
    None,  # tenant with a slash
]


def generate(
    n: int,
    seed: int = 1,
    month: str = "2026-11",
    tenants: int = 200,
    workloads: int = 50,
    bad_share: float = 0.002,
    dup_share: float = 0.02,
    event_seed: int | None = None,
    until: datetime | None = None,
    id_prefix: str | None = None,
    active: float = 1.0,
) -> Iterator[bytes]:
    """``n`` events of ``month`` from a fleet drawn by ``seed``.  ``event_seed``: draw the
    events by another seed (the same fleet, other sessions: another month of it);
    ``active``: the share of each tenant's workloads that have sessions (the first ones:
    a month before the rest were added);
    ``until``: no event dated after it (a month still under way); ``id_prefix``: event ids
    ``<prefix><i>`` (default ``<seed>-``), unique across the months of one fleet."""
    rnd = random.Random(seed)  # noqa: S311 - simulation, not security
    types = [t for t, w in TYPES for _ in range(w)]
    fleet = []
    for t in range(tenants):
        lic = rnd.choice(LICENSES)
        fleet.append(
            (
                f"tenant-{t:04d}",
                lic,
                [(f"wl-{t:04d}-{w:03d}", rnd.choice(types)) for w in range(workloads)],
            )
        )
    if event_seed is not None:
        rnd = random.Random(event_seed)  # noqa: S311 - simulation, not security
    year, mon = int(month[:4]), int(month[5:7])
    begin = datetime(year, mon, 1, tzinfo=UTC)
    if until is not None and until <= begin:
        raise ValueError(f"until {until.isoformat()} is before {month} begins")
    prefix = f"{seed}-" if id_prefix is None else id_prefix
    last = None
    for i in range(n):
        if last is not None and rnd.random() < dup_share:
            yield last  # redelivered
            continue
        r = rnd.random()
        tenant, lic, wls = fleet[rnd.randrange(tenants)]
        wid, wtype = wls[rnd.randrange(max(1, round(len(wls) * active)))]
        if rnd.random() < 0.01:
            lic = rnd.choice(LICENSES)  # license changed this month
        day = rnd.randint(1, 28)
        hour = rnd.randint(0, 23)
        zone = rnd.choice(["Z", "Z", "Z", "+02:00", "-05:00", "+05:30"])
        data: dict[str, object] = {
            "tenant_id": tenant,
            "workload_id": wid,
            "workload_type": wtype,
            "license": lic,
            "result": "failed" if r < 0.05 else ("warning" if r < 0.15 else "success"),
            "operation": "replication" if wtype == "replica" else "backup",
            "job_id": f"job-{rnd.randint(1, 500)}",
        }
        time = (
            f"{year:04d}-{mon:02d}-{day:02d}T{hour:02d}:{rnd.randint(0, 59):02d}:"
            f"{rnd.randint(0, 59):02d}{zone}"
        )
        if until is not None:
            time = _not_after(time, begin, until)
        ev = {
            "specversion": "1.0",
            "id": f"{prefix}{i}",
            "source": f"vbr://{tenant}/vbr-01",
            "type": "meter.job.workload",
            "time": time,
            "data": data,
        }
        if rnd.random() < bad_share:
            kind = rnd.randrange(5)
            if kind == 2:
                ev["time"] = ev["time"][:19]  # type: ignore[index]
            elif kind == 3:
                del data["license"]
            elif kind == 4:
                data["tenant_id"] = f"{tenant}/eu"
            else:
                bad = BAD[kind]
                assert bad is not None
                last = bad
                yield bad
                continue
        last = orjson.dumps(ev)
        yield last


def _not_after(time: str, begin: datetime, until: datetime) -> str:
    """``time`` (ISO 8601 with its zone), or if it is after ``until``, the same offset
    into ``[begin, until)`` in the same zone (never before ``begin``)."""
    at = datetime.fromisoformat(time.replace("Z", "+00:00"))
    if at <= until and at >= begin:
        return time
    folded = begin + (at - begin) % (until - begin)
    zone = time[19:]
    local = folded.astimezone(at.tzinfo).strftime("%Y-%m-%dT%H:%M:%S")
    return local + zone


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("n", type=int)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--month", default="2026-11")
    p.add_argument("--tenants", type=int, default=200)
    p.add_argument("--workloads", type=int, default=50, help="workloads per tenant")
    a = p.parse_args()
    out = sys.stdout.buffer
    for raw in generate(a.n, a.seed, a.month, a.tenants, a.workloads):
        out.write(raw)
        out.write(b"\n")


if __name__ == "__main__":
    main()
