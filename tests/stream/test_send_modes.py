"""``meter send --mode binary``: a valid line becomes a binary-mode message meter reads the same."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter.cli import build_parser
from meter.domain import Event, parse, parse_message
from meter.kafka import KafkaSettings
from meter.stream.send import binary_message, send_lines
from tests.domain.events import line, mutated_events, valid_events


def test_a_line_becomes_ce_headers_and_its_data_untouched() -> None:
    raw = line(extra=1).replace(b'"type"', b'"subject":"job-17","n":3,"type"')
    message = binary_message(raw)
    assert message is not None
    value, headers = message
    assert value == raw[raw.index(b'"data":') + 7 : -1]  # the data's bytes, as they were
    assert headers == [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"e-1"),
        ("ce_source", b"vbr://acme/vbr-01"),
        ("ce_subject", b"job-17"),  # string extensions go too; other values do not
        ("ce_type", b"meter.job.workload"),
        ("ce_time", b"2026-11-03T10:00:00Z"),
        ("content-type", b"application/json"),
    ]
    assert parse_message(value, headers) == parse(raw)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(valid_events(), mutated_events))
def test_an_accepted_line_is_the_same_event_in_binary_mode(raw: bytes) -> None:
    structured = parse(raw)
    if not isinstance(structured, Event):
        return
    message = binary_message(raw)
    assert message is not None
    value, headers = message
    assert parse_message(value, headers, len(raw)) == structured  # and no larger


@pytest.mark.parametrize("raw", [b"not json", b"[1]", b'{"a": 1}', b"\xff"])
def test_a_line_without_data_has_no_binary_form(raw: bytes) -> None:
    assert binary_message(raw) is None


def test_the_flag_and_its_default() -> None:
    parser = build_parser()
    assert parser.parse_args(["send", "f"]).mode == "structured"
    assert parser.parse_args(["send", "f", "--mode", "binary"]).mode == "binary"
    with pytest.raises(SystemExit):
        parser.parse_args(["send", "f", "--mode", "avro"])


def test_an_unknown_mode_is_a_bug_before_any_connection() -> None:
    settings = KafkaSettings(bootstrap="127.0.0.1:1")
    with pytest.raises(ValueError, match="mode must be one of structured, binary"):
        asyncio.run(send_lines(settings, "t", [], mode="avro"))
