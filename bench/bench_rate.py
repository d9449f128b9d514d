"""Benchmark ``meter rate``: the core path and the whole command, on one core.

    make bench            # 1,000,000 events
    python bench/bench_rate.py --events 200000

Reports events/s for (1) the core path — parse, validate, rate, ledger — over
lines already in memory, and (2) the whole command, ``meter rate FILE --format
json``, timed as a child process (file reading, report, interpreter start-up).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from meter.domain import Rater, load_ratecards
from meter.sim.fleet import generate

OUT = Path(__file__).parent / "out"


def reference() -> float:
    """Seconds for a fixed pure-Python workload: how fast the host is right now."""
    t0 = time.perf_counter()
    for _ in range(20_000):
        sum(range(1000))
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    OUT.mkdir(exist_ok=True)
    path = OUT / f"events-{a.events}.jsonl"
    if not path.exists():
        with path.open("wb") as f:
            for raw in generate(a.events):
                f.write(raw + b"\n")
    lines = path.read_bytes().splitlines()
    cards = load_ratecards()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})  # one core, as the target says

    ref_before = reference()
    core = []
    for _ in range(a.repeat):
        rater = Rater(cards)
        feed = rater.feed
        t0 = time.perf_counter()
        for raw in lines:
            feed(raw)
        core.append(len(lines) / (time.perf_counter() - t0))
    whole = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        subprocess.run(
            [
                "taskset",
                "-c",
                "0",
                sys.executable,
                "-m",
                "meter",
                "rate",
                str(path),
                "--format",
                "json",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        whole.append(len(lines) / (time.perf_counter() - t0))
    ref_after = reference()
    t = rater.tally
    print(
        f"events: {len(lines):,} ({t.counted:,} counted, {t.duplicate:,} duplicate, "
        f"{t.not_counted:,} not counted, {t.rejected:,} rejected); "
        f"{sum(len(x) for x in lines) / len(lines):.0f} bytes/event"
    )
    print(
        f"core path (parse, validate, rate, ledger): best {max(core):,.0f} events/s "
        f"(runs: {', '.join(f'{x:,.0f}' for x in core)})"
    )
    print(
        f"whole command (meter rate FILE --format json): best {max(whole):,.0f} events/s "
        f"(runs: {', '.join(f'{x:,.0f}' for x in whole)})"
    )
    print(
        f"host speed reference (a fixed pure-Python loop, lower is faster): "
        f"{ref_before:.3f}s before, {ref_after:.3f}s after; this VM's speed drifts, "
        "so compare figures from one run"
    )


if __name__ == "__main__":
    main()
