"""State that scales with this month, not with history: memory and restart, measured.

One home partition holds a provider's fleet (``--workloads`` distinct workloads over 5,000
tenants, the same workloads every month, as a real fleet); ``--months`` months of history
are built through the worker's own code (:class:`~meter.stream.partition.HomePartition`:
apply, changelog records, month close, checkpoint), every month but the last closed.  Two
ways of keeping that state are measured side by side on the same data, each step in a
fresh process so its RSS is its own:

- ``memory``: the build before local state: every month in memory for ever, and a restart
  replays the whole changelog;
- ``state``: ``--state-dir`` (SQLite): closed months leave memory once saved, and a restart
  reads the saved state (the changelog tail after the checkpoint is empty here).

Printed per months of history: RSS while live and after a restart (above the process's
baseline, and in bytes per workload-month of the open month), and the restart's time to a
ready state (reading the changelog or the store, and the recovery that makes the partition
ACTIVE; the broker's group join, a few seconds on the embedded broker, comes on top).

    python -m bench.bench_scale --workloads 1000000 --months 1 --months 3 --months 12

The broker is not involved: the changelog is a file of length-prefixed records, exactly
the bytes the worker would have written.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import struct
import subprocess
import sys
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meter.domain import load_ratecards
from meter.store.sqlite import SqliteStore
from meter.stream.closing import close_records
from meter.stream.partition import HomePartition
from meter.stream.records import changelog_chunks
from meter.stream.worker import release_free_memory

OUT = Path(__file__).parent / "out"
TENANTS = 5_000
TYPES = ("vm", "vm", "vm", "replica", "workstation", "server", "cloud_vm", "cloud_file_share")
_LEN = struct.Struct(">I")


def rss_bytes() -> int:
    with Path("/proc/self/status").open() as f:
        for row in f:
            if row.startswith("VmRSS:"):
                return int(row.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def months_back(n: int, last: str = "2026-11") -> list[str]:
    y, m = int(last[:4]), int(last[5:])
    out = []
    for _ in range(n):
        out.append(f"{y:04d}-{m:02d}")
        y, m = (y - 1, 12) if m == 1 else (y, m - 1)
    return out[::-1]


def shown_months() -> set[str]:
    """What /metrics shows with the worker's defaults: the open month and the one before."""
    return set(months_back(2))


# ---------------------------------------------------------------- steps (each its own process)


def step_baseline() -> dict[str, Any]:
    gc.collect()
    return {"rss": rss_bytes()}


def step_build(workloads: int, months: int, state: str | None, changelog: str) -> dict[str, Any]:
    cards = load_ratecards()
    history = months_back(months)
    hp = HomePartition(0, cards.height, history_start=history[0])
    if state is not None:
        hp.store = SqliteStore(state).partition("meter.jobs.ledger.changelog", 0)
    hp.begin_recovery()
    hp.recovered(0)
    end = 0
    last = b""
    out = Path(changelog).open("wb")  # noqa: SIM115 - closed below

    def append(raws: list[bytes]) -> list[int]:
        nonlocal end, last
        offsets = []
        for raw in raws:
            out.write(_LEN.pack(len(raw)))
            out.write(raw)
            offsets.append(end)
            end += 1
            last = raw
        return offsets

    tenants = [f"tenant-{t:05d}" for t in range(TENANTS)]
    rates = {
        lic: (5 if lic == "subscription" else 0, "vcsp-2026", lic)
        for lic in ("subscription", "rental")
    }
    started = time.perf_counter()
    saves = 0.0
    for n, month in enumerate(history):
        for k in range(workloads):
            t = tenants[k % TENANTS]
            wtype = TYPES[k % len(TYPES)]
            rate = rates["rental" if k % 7 == 0 else "subscription"]
            hp.apply(t, month, wtype, f"{wtype}-{k:08d}", rate, 0, f"e-{n}-{k}")
            if k % 10_000 == 9_999:
                batch = hp.take_batch()
                hp.written(batch, append(list(changelog_chunks(batch.entries, batch.event_ids))))
        batch = hp.take_batch()
        hp.written(batch, append(list(changelog_chunks(batch.entries, batch.event_ids))))
        if n < months - 1:  # every month but the last closes
            snap = hp.close.snapshot(hp.ledger, month)
            lsnap = hp.close.license_snapshot(hp.license, month)
            start = hp.license.history_start
            closed_at = datetime(2030, 1, 1, tzinfo=UTC)
            hp.acknowledged(append(close_records(month, snap, lsnap, start, closed_at)))
            hp.closed(month, snap, lsnap, start)
            del snap, lsnap
        if hp.store is not None:
            t0 = time.perf_counter()
            if hp.save(zlib.crc32(last), set(hp.close.closed)):
                release_free_memory()  # as the worker does after pruning
            hp.keep_totals(shown_months())
            saves += time.perf_counter() - t0
    out.close()
    gc.collect()
    release_free_memory()
    return {
        "rss": rss_bytes(),
        "build_s": time.perf_counter() - started,
        "save_s": saves,
        "records": end,
        "in_memory": len(hp.ledger),
        "pruned": sorted(hp.pruned),
    }


def step_restart(months: int, state: str | None, changelog: str) -> dict[str, Any]:

    cards = load_ratecards()
    gc.disable()  # the worker freezes its ledgers out of the collector's way; so does this
    started = time.perf_counter()
    hp = HomePartition(0, cards.height, history_start=months_back(months)[0])
    hp.begin_recovery()
    records = 0
    if state is not None:
        store = SqliteStore(state).partition("meter.jobs.ledger.changelog", 0)
        cp = store.checkpoint()
        assert cp is not None
        records = hp.restore(store, cp, shown_months())
        end = cp.offset
    else:
        data = Path(changelog).read_bytes()
        pos = 0
        while pos < len(data):
            (size,) = _LEN.unpack_from(data, pos)
            hp.replay(data[pos + 4 : pos + 4 + size])
            pos += 4 + size
            records += 1
        end = records
        del data
    hp.recovered(end)
    took = time.perf_counter() - started
    gc.enable()
    gc.collect()
    before_trim = rss_bytes()
    trim = release_free_memory()
    return {
        "rss_untrimmed": before_trim,
        "trim_s": trim,
        "rss": rss_bytes(),
        "restart_s": took,
        "records": records,
        "in_memory": len(hp.ledger),
    }


def run_step(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_scale", "--step", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workloads", type=int, default=1_000_000)
    p.add_argument("--months", type=int, action="append", help="months of history [1 and 12]")
    p.add_argument("--mode", action="append", choices=("memory", "state"))
    p.add_argument(
        "--memory-months",
        type=int,
        default=3,
        help="run the memory mode only up to this many months (it holds every month: ~1.5 GB "
        "each at 1 M workloads, and its restart replays all of them) [3]",
    )
    p.add_argument("--work", default=str(OUT / "scale"), help="scratch directory")
    p.add_argument("--out", default=str(OUT / "scale.json"))
    p.add_argument("--step", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step:
        kind, *rest = args.step
        if kind == "baseline":
            doc = step_baseline()
        elif kind == "build":
            workloads, months, state, changelog = rest
            doc = step_build(int(workloads), int(months), state or None, changelog)
        else:
            months, state, changelog = rest
            doc = step_restart(int(months), state or None, changelog)
        print(json.dumps(doc))
        return 0

    months_list = args.months or [1, 12]
    modes = args.mode or ["memory", "state"]
    base = run_step("baseline")["rss"]
    work = Path(args.work)
    results: list[dict[str, Any]] = []
    print(f"baseline RSS {base / 2**20:.0f} MiB; {args.workloads:,} workloads a month, 1 partition")
    head = (
        f"{'months':>6} {'mode':>6} | {'live MiB':>8} {'B/wl-mo':>7} | {'restart s':>9} "
        f"{'after MiB':>9} {'B/wl-mo':>7} | {'build s':>7} {'saves s':>7}"
    )
    print(head)
    print("-" * len(head))
    for months in months_list:
        for mode in modes:
            if mode == "memory" and months > args.memory_months:
                continue
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            state = str(work / "state") if mode == "state" else ""
            changelog = str(work / "changelog.bin")
            built = run_step("build", str(args.workloads), str(months), state, changelog)
            again = run_step("restart", str(months), state, changelog)
            per = args.workloads
            row = {
                "months": months,
                "mode": mode,
                "workloads": args.workloads,
                "baseline_rss": base,
                "live_rss": built["rss"],
                "live_bytes_per_workload_month": (built["rss"] - base) / per,
                "restart_s": again["restart_s"],
                "restart_rss": again["rss"],
                "restart_bytes_per_workload_month": (again["rss"] - base) / per,
                "build_s": built["build_s"],
                "save_s": built["save_s"],
                "changelog_records": built["records"],
                "in_memory_entries": again["in_memory"],
            }
            results.append(row)
            print(
                f"{months:>6} {mode:>6} | {built['rss'] / 2**20:>8.0f} "
                f"{row['live_bytes_per_workload_month']:>7.0f} | {again['restart_s']:>9.1f} "
                f"{again['rss'] / 2**20:>9.0f} {row['restart_bytes_per_workload_month']:>7.0f} | "
                f"{built['build_s']:>7.1f} {built['save_s']:>7.1f}",
                flush=True,
            )
    shutil.rmtree(work, ignore_errors=True)
    for mode in modes:
        rows = {r["months"]: r for r in results if r["mode"] == mode}
        if len(rows) > 1:
            lo, hi = rows[min(rows)], rows[max(rows)]
            print(
                f"{mode}: {max(rows)} months vs {min(rows)}: live RSS "
                f"{(hi['live_rss'] - base) / max(1, lo['live_rss'] - base):.2f}x, restart time "
                f"{hi['restart_s'] / lo['restart_s']:.2f}x, RSS after restart "
                f"{(hi['restart_rss'] - base) / max(1, lo['restart_rss'] - base):.2f}x "
                "(target <= 1.25x)"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
