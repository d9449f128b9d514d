"""Benchmark ``meter rate``: one core, all cores, and DuckDB on the same file.

    make bench                                    # today's profile and provider-1m, DuckDB too
    python -m bench.bench_rate --events 200000    # today's profile, 200,000 events
    python -m bench.bench_rate --profile provider-3m --duckdb --baseline /tmp/prev

Profiles (:mod:`bench.profiles`, generated once into ``bench/out``): ``today`` (``--events``
events of 200 tenants x 50 workloads, 10,000 distinct workloads, 93% duplicates, 0.2%
broken lines), ``provider-1m`` and ``provider-3m`` (1 M / 3 M distinct workloads in a month
over 5,000 tenants, ~3 sessions each: ~3 M / ~9 M events).

For each profile, best of ``--repeat`` runs, each in events/s:

- **in process**: :func:`meter.cli.rate.rate_stream` over the file on one core (reading,
  parse, validate, rate, ledger; no interpreter start-up), and the memory the rating added
  per distinct workload (RSS);
- **whole command** on one core (``taskset -c 0``), a child process from start to exit:
  ``meter rate FILE --format csv --jobs 1`` and ``--format json`` (which adds the license
  view), and ``--format csv --jobs N`` on all cores, with its speed-up;
- with ``--duckdb`` (``pip install -e '.[bench]'``): one DuckDB SQL query over the same file
  (:data:`DUCKDB_QUERY`) computing the same rows as ``meter rate --format csv`` plus the
  rental counts, on 1 thread and on all cores' threads; the rows are checked equal to
  meter's, and the ratios meter/DuckDB printed (> 1: meter is faster).  DuckDB ignores the
  lines it cannot read as JSON (``ignore_errors``) and the query drops the events meter
  rejects by the contract's rules (see the query);
- with ``--baseline DIR``: the whole command (csv, one core) of the build checked out in
  DIR (``git worktree add DIR REV``), run from DIR, in the same run.

The machine's speed drifts: a fixed pure-Python loop is timed before and after, and every
wall-clock benchmark on a shared machine should run alone (``flock /tmp/bench.lock ...``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import io
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.profiles import Profile, events_file, profiles
from meter.cli.rate import cores, rate_stream
from meter.domain import LICENSED_TYPES, LICENSES, RESULTS, WORKLOAD_TYPES, Rater, load_ratecards

OUT = Path(__file__).parent / "out"
ROOT = Path(__file__).resolve().parents[1]

#: The rows of ``meter rate --format csv`` (and the rental counts) in one SQL query.  Meter's
#: rules: an event is counted when it meets the contract (the checks below: the envelope's
#: constants, ids not empty, the tenant id's characters, no control characters in the
#: workload id, a license where the type needs one, an RFC 3339 time with a zone) and its
#: session did not fail; its month is the UTC month of its time; its rate is the card in
#: effect on its UTC date, by workload type and license; a workload counts once a month, at
#: its highest rate (points, then card version, then license).
DUCKDB_QUERY = """
WITH ev AS (
  SELECT * FROM read_json({path}, format = 'newline_delimited', ignore_errors = true,
    columns = {{specversion: 'VARCHAR', id: 'VARCHAR', source: 'VARCHAR', type: 'VARCHAR',
      time: 'VARCHAR', data: 'STRUCT(tenant_id VARCHAR, workload_id VARCHAR,
        workload_type VARCHAR, license VARCHAR, result VARCHAR)'}})
), counted AS (
  SELECT data.tenant_id AS tenant, data.workload_id AS wid, data.workload_type AS wtype,
         coalesce(data.license, '') AS lic, timezone('UTC', try_cast(time AS TIMESTAMPTZ)) AS ts
  FROM ev
  WHERE specversion = '1.0' AND type = 'meter.job.workload' AND id <> '' AND source <> ''
    AND length(data.tenant_id) <= 128
    AND regexp_full_match(data.tenant_id, '[A-Za-z0-9][A-Za-z0-9._:@-]*')
    AND length(data.workload_id) BETWEEN 1 AND 256
    AND NOT regexp_matches(data.workload_id, '[\\x00-\\x1f\\x7f-\\x9f]')
    AND data.workload_type IN ({types})
    AND data.result IN ({results}) AND data.result <> 'failed'
    AND (data.license IN ({licenses})
         OR (data.license IS NULL AND data.workload_type NOT IN ({licensed})))
    AND regexp_full_match(time, '[0-9]{{4}}-[0-9]{{2}}-[0-9]{{2}}[Tt][0-9]{{2}}:[0-5][0-9]:'
                                || '([0-5][0-9]|60)(\\.[0-9]+)?([Zz]|[+-][0-9]{{2}}:[0-9]{{2}})')
), per_workload AS (
  SELECT strftime(c.ts, '%Y-%m') AS month, c.tenant, c.wtype, c.wid,
         max(struct_pack(p := r.points, v := r.version, l := c.lic)) AS rate
  FROM counted c JOIN cards r ON r.wtype = c.wtype AND r.lic = c.lic
       AND c.ts >= r.start AND (r.stop IS NULL OR c.ts < r.stop)
  GROUP BY ALL
)
SELECT month, tenant, wtype, count(*) AS workloads, sum(rate.p) AS points,
       count(*) FILTER (WHERE rate.l = 'rental') AS rental
FROM per_workload GROUP BY ALL ORDER BY month, tenant, wtype
"""


def reference() -> float:
    """Seconds for a fixed pure-Python workload: how fast the host is right now."""
    t0 = time.perf_counter()
    for _ in range(20_000):
        sum(range(1000))
    return time.perf_counter() - t0


def rss() -> int:
    with Path("/proc/self/status").open() as f:
        for row in f:
            if row.startswith("VmRSS:"):
                return int(row.split()[1]) * 1024
    return 0


def rated_in_process(path: Path) -> tuple[float, Rater, float]:
    """Seconds to rate ``path`` in this process, the rater, bytes of RSS it added per entry."""
    gc.collect()
    gc.disable()
    before = rss()
    rater = Rater(load_ratecards())
    t0 = time.perf_counter()
    with path.open("rb") as f:
        rate_stream(f, rater, 100)
    rater.ledger.usage()
    seconds = time.perf_counter() - t0
    per_entry = (rss() - before) / max(len(rater.ledger), 1)
    gc.enable()
    return seconds, rater, per_entry


def command(path: Path, *args: str, one_core: bool = True, cwd: Path = ROOT) -> float:
    """Seconds of ``meter rate FILE ARGS`` as a child process, start to exit."""
    pin = ["taskset", "-c", "0"] if one_core else []
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    t0 = time.perf_counter()
    subprocess.run(
        [*pin, sys.executable, "-m", "meter", "rate", str(path), *args],
        check=True,
        stdout=subprocess.DEVNULL,
        cwd=cwd,
        env=env,
    )
    return time.perf_counter() - t0


def meter_csv_rows(path: Path) -> list[tuple[str, ...]]:
    out = subprocess.run(
        [sys.executable, "-m", "meter", "rate", str(path), "--format", "csv"],
        check=True,
        capture_output=True,
        cwd=ROOT,
    ).stdout.decode()
    return [tuple(r) for r in csv.reader(io.StringIO(out))][1:]


def duckdb_run(path: Path, threads: int) -> tuple[float, list[tuple[Any, ...]]]:
    """Seconds of :data:`DUCKDB_QUERY` on ``threads`` threads (connection made before), rows."""
    import duckdb  # noqa: PLC0415 - an optional benchmark dependency

    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    con.execute("SET TimeZone = 'UTC'")
    con.execute(
        "CREATE TABLE cards (version VARCHAR, start TIMESTAMP, stop TIMESTAMP, wtype VARCHAR, "
        "lic VARCHAR, points INTEGER)"
    )
    cards = load_ratecards().cards
    for i, card in enumerate(cards):
        stop = cards[i + 1].effective if i + 1 < len(cards) else None
        for (wtype, lic), rate in card._lookup.items():
            con.execute(
                "INSERT INTO cards VALUES (?, ?::TIMESTAMP, ?::TIMESTAMP, ?, ?, ?)",
                [card.version, card.effective, stop, wtype, lic or "", rate[0]],
            )

    def quoted(values: Any) -> str:
        return ", ".join(f"'{v}'" for v in sorted(values))

    query = DUCKDB_QUERY.format(
        path=f"'{path}'",
        types=quoted(WORKLOAD_TYPES),
        results=quoted(RESULTS),
        licenses=quoted(LICENSES),
        licensed=quoted(LICENSED_TYPES),
    )
    t0 = time.perf_counter()
    rows = con.execute(query).fetchall()
    seconds = time.perf_counter() - t0
    con.close()
    return seconds, rows


def have_duckdb() -> bool:
    with contextlib.suppress(ImportError):
        import duckdb  # noqa: F401, PLC0415

        return True
    return False


def rate_of(n: int, seconds: list[float]) -> str:
    return f"best {n / min(seconds):,.0f} events/s ({', '.join(f'{s:.2f}s' for s in seconds)})"


def bench_profile(profile: Profile, a: argparse.Namespace) -> dict[str, Any]:
    path = events_file(profile)
    n = sum(1 for _ in path.open("rb"))
    jobs = a.jobs or cores()
    print(f"\n== {profile.name}: {profile.what}; {path.name}, {n:,} lines", flush=True)
    out: dict[str, Any] = {"profile": profile.name, "lines": n}

    inproc: list[float] = []
    per_entry = 0.0
    rater: Rater | None = None
    mask = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if mask is not None:
        os.sched_setaffinity(0, {min(mask)})  # one core, as the target says
    try:
        for i in range(a.repeat):
            rater = None
            seconds, rater, entry_bytes = rated_in_process(path)
            inproc.append(seconds)
            if i == 0:
                per_entry = entry_bytes
    finally:
        if mask is not None:
            os.sched_setaffinity(0, mask)
    assert rater is not None
    t = rater.tally
    distinct = len(rater.ledger)
    print(
        f"events: {t.read:,} ({t.counted:,} counted, {t.duplicate:,} duplicate, "
        f"{t.not_counted:,} not counted, {t.rejected:,} rejected); "
        f"{distinct:,} ledger entries (workload-months)"
    )
    print(f"in process, one core (rate_stream):            {rate_of(t.read, inproc)}")
    print(f"  memory the rating added: {per_entry:.0f} bytes per ledger entry (RSS)")
    usage = rater.ledger.usage()
    del rater
    gc.collect()

    csv1 = [command(path, "--format", "csv", "--jobs", "1") for _ in range(a.repeat)]
    json1 = [command(path, "--format", "json", "--jobs", "1") for _ in range(a.repeat)]
    csvn = [
        command(path, "--format", "csv", "--jobs", str(jobs), one_core=False)
        for _ in range(a.repeat)
    ]
    print(f"meter rate FILE --format csv --jobs 1 (one core): {rate_of(t.read, csv1)}")
    print(f"meter rate FILE --format json --jobs 1 (one core): {rate_of(t.read, json1)}")
    print(
        f"meter rate FILE --format csv --jobs {jobs} (all cores): {rate_of(t.read, csvn)}; "
        f"{min(csv1) / min(csvn):.2f}x one core"
    )
    out |= {
        "in_process": min(inproc),
        "bytes_per_entry": per_entry,
        "csv_one_core": min(csv1),
        "json_one_core": min(json1),
        f"csv_jobs_{jobs}": min(csvn),
    }
    if a.baseline:
        base = [
            command(path, "--format", "csv", cwd=Path(a.baseline).resolve())
            for _ in range(a.repeat)
        ]
        print(
            f"baseline {a.baseline}: meter rate FILE --format csv (one core): "
            f"{rate_of(t.read, base)}; this build is {min(base) / min(csv1):.2f}x as fast"
        )
        out["baseline_csv_one_core"] = min(base)

    if a.duckdb:
        if not have_duckdb():
            print("DuckDB: not installed (pip install -e '.[bench]'); skipped")
            return out
        one = [duckdb_run(path, 1) for _ in range(a.repeat)]
        many = [duckdb_run(path, jobs) for _ in range(a.repeat)]
        rows = one[0][1]
        want = [
            (r.month, r.tenant_id, r.workload_type, r.workloads, r.points, r.rental) for r in usage
        ]
        same = [tuple(r) for r in rows] == want and [
            (m, t_, w, str(c), str(p)) for m, t_, w, c, p, _ in rows
        ] == meter_csv_rows(path)
        d1 = min(s for s, _ in one)
        dn = min(s for s, _ in many)
        print(
            f"DuckDB, one query, 1 thread:  {rate_of(t.read, [s for s, _ in one])}; "
            f"rows {'equal to' if same else 'DIFFERENT from'} meter's ({len(rows):,})"
        )
        print(f"DuckDB, one query, {jobs} threads: {rate_of(t.read, [s for s, _ in many])}")
        print(
            f"ratio meter/DuckDB (>1: meter faster): one core {d1 / min(csv1):.2f} "
            f"(whole command) / {d1 / min(inproc):.2f} (in process); "
            f"{jobs} cores {dn / min(csvn):.2f} (whole command, --jobs {jobs})"
        )
        out |= {"duckdb_1": d1, f"duckdb_{jobs}": dn, "rows_equal": same}
        if not same:
            raise SystemExit("DuckDB's rows differ from meter's")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--events", type=int, default=1_000_000, help="size of the today profile")
    p.add_argument(
        "--profile",
        action="append",
        choices=("today", "provider-1m", "provider-3m"),
        help="profiles to run, in order (repeatable) [today]",
    )
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--jobs", type=int, help="processes for the all-cores run [all cores]")
    p.add_argument("--duckdb", action="store_true", help="compare with DuckDB (extra: bench)")
    p.add_argument("--baseline", metavar="DIR", help="also time the build checked out in DIR")
    a = p.parse_args()
    OUT.mkdir(exist_ok=True)
    known = profiles(a.events)
    ref_before = reference()
    for name in a.profile or ["today"]:
        bench_profile(known[name], a)
    ref_after = reference()
    print(
        f"\nhost speed reference (a fixed pure-Python loop, lower is faster): "
        f"{ref_before:.3f}s before, {ref_after:.3f}s after; this VM's speed drifts, "
        "so compare figures from one run"
    )


if __name__ == "__main__":
    main()
