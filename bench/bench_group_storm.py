"""A rebalance storm on one consumer group: does a new worker still get partitions after it?

    python -m bench.bench_group_storm                    # 25 cycles on the embedded broker
    python -m bench.bench_group_storm --cycles 5 --seed 7
    python -m bench.bench_group_storm --kafka            # on Apache Kafka (one KRaft node)
    python -m bench.bench_group_storm --broker 127.0.0.1:9092   # on a running broker

Each cycle starts ``--workers`` ``meter worker`` processes in one group (staggered by up to
1.5 s), lets them rebalance for 1 to 6 s, then stops them in a random order: one SIGKILL,
the others SIGTERM.  After each cycle the group is described: its state and members
(DescribeGroups) and, where the broker tells it, its leader (the embedded Tansu broker
names the leader of a classic group as the ``assignor_name`` of ConsumerGroupDescribe).
A leader that is not a member is the wedge of issue 19: the group's leader left while the
group was forming, and Tansu 0.6.0 keeps naming it, so no member is ever given the member
list and no assignment is ever made.

After the cycles one fresh worker joins the group and the time until its ``/healthz`` is
ok is measured (bounded by ``--ready-within``); whether it logged meter's ERROR about a
stuck group is reported.  Every child is stopped at the end; the log of each is kept in
``tests/artifacts/``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from meter.broker import EmbeddedBroker
from tests.integration.harness import Names, WorkerProcess, group_state, tansu_leader
from tests.integration.kafka import KafkaBroker, fetch_libs

#: What a worker logs once it found its group wedged (meter.stream.worker).
STUCK_LINE = "is stuck"


def group_line(bootstrap: str, group: str) -> tuple[str, bool]:
    state, members = group_state(bootstrap, group)
    try:
        leader = tansu_leader(bootstrap, group)
    except OSError:
        leader = None
    ghost = bool(leader) and leader not in members
    short = [m[-6:] for m in members]
    return (
        f"state {state}, members {short}, leader {leader[-6:] if leader else leader!r}"
        + (" NOT A MEMBER: wedged" if ghost else ""),
        ghost,
    )


def stop_all(workers: list[WorkerProcess], rng: random.Random) -> None:
    kinds = ["KILL"] + ["TERM"] * (len(workers) - 1)
    rng.shuffle(kinds)
    for w, kind in zip(workers, kinds, strict=True):
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGKILL if kind == "KILL" else signal.SIGTERM)
        time.sleep(rng.uniform(0.0, 1.0))
    for w in workers:
        with contextlib.suppress(Exception):
            w.proc.wait(40)
        w.close()


def ready_after(worker: WorkerProcess, within: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < within:
        if worker.proc.poll() is not None:
            raise SystemExit(f"the fresh worker exited:\n{worker.log()[-3000:]}")
        with contextlib.suppress(Exception):
            status, _ = worker.health()
            if status == 200:
                return time.monotonic() - started
        time.sleep(0.2)
    return None


def storm(bootstrap: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    names = Names(uuid.uuid4().hex[:10])
    session = ["--session-timeout-ms", str(args.session_timeout_ms)]
    first_wedge: int | None = None
    for cycle in range(1, args.cycles + 1):
        workers: list[WorkerProcess] = []
        try:
            for i in range(args.workers):
                workers.append(WorkerProcess(bootstrap, names, f"c{cycle}w{i}", extra=session))
                time.sleep(rng.uniform(0.0, 1.5))
            time.sleep(rng.uniform(1.0, 6.0))
        finally:
            stop_all(workers, rng)
        line, ghost = group_line(bootstrap, names.group)
        print(f"cycle {cycle:2d}: {line}", flush=True)
        if ghost and first_wedge is None:
            first_wedge = cycle
            if args.until_wedged:
                break
    fresh = WorkerProcess(bootstrap, names, "fresh", extra=session)
    try:
        took = ready_after(fresh, args.ready_within)
        said = fresh.log().count(STUCK_LINE)
        line, _ = group_line(bootstrap, names.group)
    finally:
        fresh.terminate()
    result = {
        "group": names.group,
        "cycles": cycle,
        "first_wedged_cycle": first_wedge,
        "fresh_worker_ready_s": None if took is None else round(took, 1),
        "stuck_errors_logged": said,
        "group_after": line,
        "fresh_log": str(fresh.log_path),
    }
    print(result, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=25)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--session-timeout-ms", type=int, default=6000)
    p.add_argument("--seed", type=int, default=19)
    p.add_argument("--broker", help="bootstrap of a running broker (default: an embedded one)")
    p.add_argument("--kafka", action="store_true", help="start Apache Kafka (tests/integration)")
    p.add_argument("--ready-within", type=float, default=120.0)
    p.add_argument("--until-wedged", action="store_true", help="stop the storm at the wedge")
    args = p.parse_args(argv)
    if args.broker:
        result = storm(args.broker, args)
    elif args.kafka:
        log = Path(tempfile.gettempdir()) / f"kafka-storm-{os.getpid()}.log"
        with KafkaBroker(fetch_libs(), log) as kafka:
            result = storm(kafka.bootstrap, args)
    else:
        with EmbeddedBroker() as broker:
            result = storm(broker.bootstrap, args)
    return 0 if result["fresh_worker_ready_s"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
