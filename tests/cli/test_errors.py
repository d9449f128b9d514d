"""One error tree: every error meter raises on purpose is a MeterError; the CLI says it plainly."""

from __future__ import annotations

import subprocess
import sys

from meter.broker import BrokerError, EmbeddedBrokerError
from meter.errors import ConfigError, MeterError, RateCardError
from meter.kafka import KafkaSettingsError, TopicError
from meter.stream.records import ChangelogError


def test_the_tree() -> None:
    assert issubclass(RateCardError, ConfigError)
    assert issubclass(KafkaSettingsError, ConfigError)
    assert issubclass(ConfigError, ValueError)
    assert issubclass(EmbeddedBrokerError, BrokerError)
    assert issubclass(TopicError, BrokerError)
    for cls in (ConfigError, BrokerError, TopicError, ChangelogError, KafkaSettingsError):
        assert issubclass(cls, MeterError)


def test_an_unreachable_broker_is_a_clear_error_not_a_traceback() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "meter", "report", "--broker", "127.0.0.1:1"],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert b"meter: error: Kafka:" in out.stderr
    assert b"Traceback" not in out.stderr
