"""Measuring this host's clock for the month-close check (no broker needed)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from meter.domain import load_ratecards
from meter.kafka import KafkaSettings
from meter.observe.metrics import instrument
from meter.stream.clockcheck import (
    BROKER_FRESH_S,
    PEER_FRESH_S,
    ClockReference,
    heartbeat,
    read_heartbeat,
)
from meter.stream.config import StreamConfig
from meter.stream.partition import HomePartition
from meter.stream.worker import Worker

T = datetime(2026, 12, 8, 3, 0, tzinfo=UTC)
AHEAD = datetime(2027, 5, 10, tzinfo=UTC)
MS = 1000


class Mono:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_log_append_time_is_the_brokers_time() -> None:
    mono = Mono()
    ref = ClockReference("me", mono)
    ref.note_broker(AHEAD, AHEAD, int(T.timestamp() * MS), 1)
    offsets, source = ref.offsets()
    assert offsets == [AHEAD - T] and "LogAppendTime" in source
    assert ref.verdict(AHEAD, timedelta(minutes=5)).state == "ahead"
    mono.t += BROKER_FRESH_S + 1  # not renewed: no longer a reference
    assert ref.verdict(AHEAD, timedelta(minutes=5)).state == "unknown"


def test_create_time_is_not_the_brokers_time_then_the_other_workers_decide() -> None:
    mono = Mono()
    ref = ClockReference("me", mono)
    # Tansu's answer: log_append_time -1, which aiokafka gives as our own timestamp.
    ref.note_broker(AHEAD, AHEAD, int(AHEAD.timestamp() * MS), 0)
    assert ref.broker_time is False
    alone = ref.verdict(AHEAD, timedelta(minutes=5))
    assert alone.held and "nor from another worker" in alone.reason
    ref.note_peer("me", AHEAD, AHEAD)  # our own heartbeat is no reference
    assert ref.verdict(AHEAD, timedelta(minutes=5)).state == "unknown"
    ref.note_peer("other", T, AHEAD)
    v = ref.verdict(AHEAD, timedelta(minutes=5))
    assert v.state == "ahead" and "1 other worker(s)" in v.reason
    mono.t += PEER_FRESH_S + 1  # that worker left
    assert ref.verdict(AHEAD, timedelta(minutes=5)).state == "unknown"


def test_the_worker_with_the_right_clock_among_a_skewed_one_closes_late_not_early() -> None:
    ref = ClockReference("normal", Mono())
    ref.note_peer("skewed", AHEAD, T)
    v = ref.verdict(T, timedelta(minutes=5))
    assert v.state == "behind" and v.now == T


def test_heartbeats_read_back() -> None:
    assert read_heartbeat(heartbeat("h/1/ab", T)) == ("h/1/ab", T)


@given(st.binary(max_size=200))
def test_any_bytes_on_the_clock_topic_are_a_heartbeat_or_nothing(raw: bytes) -> None:
    got = read_heartbeat(raw)
    assert got is None or isinstance(got[0], str)


def test_metrics_and_refused_closes() -> None:
    w = Worker(
        KafkaSettings(bootstrap="127.0.0.1:1"),
        StreamConfig(),
        load_ratecards(),
        now=lambda: AHEAD,
    )
    home = HomePartition(0)
    home.recovered(0)
    home.ledger.add("acme", "2026-12", "vm", "a", (5, "vcsp-2026", "subscription"))
    w.homes[0] = home
    registry = CollectorRegistry()
    instrument(w, registry)
    assert registry.get_sample_value("meter_clock_check", {"state": "unknown"}) == 1
    assert registry.get_sample_value("meter_month_close_held") == 1
    assert registry.get_sample_value("meter_clock_skew_seconds") is None
    assert registry.get_sample_value("meter_clock_tolerance_seconds") == 300

    w.clock_ref.note_broker(AHEAD, AHEAD, int(T.timestamp() * MS), 1)
    assert registry.get_sample_value("meter_clock_skew_seconds") == (AHEAD - T).total_seconds()
    assert registry.get_sample_value("meter_clock_check", {"state": "ahead"}) == 1
    verdict = w._clock_verdict(AHEAD)
    assert verdict.held and w.close_held().startswith("month close held")
    w._refuse_closes([home], {"2026-12"}, AHEAD, verdict)
    w._refuse_closes([home], {"2026-12"}, AHEAD, verdict)  # counted once
    assert registry.get_sample_value("meter_month_closes_refused_total") == 1
    assert not home.close.closed

    w.clock_ref.note_broker(AHEAD, AHEAD, int(AHEAD.timestamp() * MS), 1)
    assert w._clock_verdict(AHEAD).state == "ok"
    assert w.close_held() == ""
    assert registry.get_sample_value("meter_month_close_held") == 0
