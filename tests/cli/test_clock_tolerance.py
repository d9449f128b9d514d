"""``--clock-tolerance``: how far a worker's clock may be from the broker's time before its
month closes are held (issue 19, item 3)."""

from __future__ import annotations

import argparse
from datetime import timedelta

import pytest

from meter.cli.common import parse_tolerance
from meter.domain.clock import DEFAULT_CLOCK_TOLERANCE
from meter.stream.config import StreamConfig


def test_durations_off_and_no_negatives() -> None:
    assert parse_tolerance("5m") == timedelta(minutes=5)
    assert parse_tolerance("30s") == timedelta(seconds=30)
    assert parse_tolerance("off") is None
    with pytest.raises(argparse.ArgumentTypeError, match="cannot be negative"):
        parse_tolerance("-5m")


def test_the_default_is_five_minutes_and_the_clock_topic_is_log_append_time() -> None:
    config = StreamConfig()
    assert config.clock_tolerance == DEFAULT_CLOCK_TOLERANCE == timedelta(minutes=5)
    spec = next(s for s in config.topic_specs() if s.name == config.topics.clock)
    assert spec.partitions == 1
    assert spec.configs["message.timestamp.type"] == "LogAppendTime"
