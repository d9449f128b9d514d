"""The ``meter`` command line.  Configuration is read here, once, at the edge."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from aiokafka.errors import KafkaError

from meter import __version__
from meter.cli import audit, broker, logs, rate, stream
from meter.cli import run as run_cmd
from meter.errors import AuthenticationError, AuthorizationError, MeterError, TlsError
from meter.kafka import KafkaSettings, auth_failure, settings_from_args

log = logging.getLogger("meter")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meter",
        description="Kafka-native, license-aware usage meter for backup service providers.",
    )
    parser.add_argument("--version", action="version", version=f"meter {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ...) [INFO]"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    rate.add_parser(sub)
    broker.add_parser(sub)
    stream.add_parsers(sub)
    run_cmd.add_parsers(sub)
    audit.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_level)
    try:
        return int(args.func(args))
    except (AuthenticationError, AuthorizationError, TlsError) as exc:
        print(f"meter: {exc}", file=sys.stderr)
        return 2
    except MeterError as exc:
        print(f"meter: error: {exc}", file=sys.stderr)
        return 2
    except (KafkaError, KeyError, ValueError) as exc:
        # A refused SASL handshake that escaped translation (aiokafka raises KeyError: 'v').
        refused = _auth_failure(args, exc)
        if refused is not None:
            print(f"meter: {refused}", file=sys.stderr)
            return 2
        if not isinstance(exc, KafkaError):
            raise
        print(f"meter: error: Kafka: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130


def _auth_failure(args: argparse.Namespace, exc: BaseException) -> AuthenticationError | None:
    """What ``exc`` means if it is a refused SASL handshake of a command with Kafka flags."""
    if not hasattr(args, "sasl_mechanism"):
        return None
    try:
        settings: KafkaSettings = settings_from_args(args)
    except MeterError:
        return None
    return auth_failure(exc, settings)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
