"""``parse`` is total: any bytes or text give an event or a bounded rejection, never a raise."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meter.domain import Event, Rejected, parse
from meter.domain.event import (
    DEFAULT_MAX_EVENT_BYTES,
    EXCERPT_CHARS,
    MAX_DEPTH,
    excerpt,
)
from tests.domain.events import event, line, mutated_events, one_outcome, valid_events

BIG = 10 * 1024 * 1024  # a max_bytes that lets big inputs reach the decoder


def check(raw: Any, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> Event | Rejected:
    """One outcome, of the right kind; a rejection has a known code and a short reason."""
    return one_outcome(parse(raw, max_bytes=max_bytes))


def accepted_means_json(raw: bytes, result: Event | Rejected) -> None:
    """An accepted input is UTF-8 JSON whose values are the event's (RFC 8259 §8.1)."""
    if isinstance(result, Event):
        text = raw.decode("utf-8").removeprefix("\ufeff")
        doc = json.loads(text)
        assert doc["id"] == result.id
        assert doc["time"] == result.time
        assert doc["data"]["tenant_id"] == result.tenant_id
        assert doc["data"]["workload_id"] == result.workload_id
        assert doc["data"]["workload_type"] == result.workload_type


# -- properties ------------------------------------------------------------------------


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
@example(b"")
@example(b"\xef\xbb\xbf")
@example(b"\xff" * 10)
@example(b"[" * 100_000)
@example(b'{"a":' * 50_000)
def test_any_bytes(raw: bytes) -> None:
    accepted_means_json(raw, check(raw))


@settings(max_examples=300)
@given(st.text(max_size=300))  # surrogates included
@example("\ud800")
@example(line().decode().replace("vm-1", "vm-\udc80"))
def test_any_text(raw: str) -> None:
    result = check(raw)
    if isinstance(result, Event):
        assert isinstance(check(raw.encode()), Event)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_events)
def test_mutated_events(raw: bytes) -> None:
    accepted_means_json(raw, check(raw))


@settings(max_examples=200)
@given(valid_events(), st.integers(0, 400))
def test_the_size_limit_is_exact(raw: bytes, limit: int) -> None:
    result = check(raw, max_bytes=limit)
    if len(raw) > limit:
        assert result == Rejected("too_large", f"event is {len(raw)} bytes; the limit is {limit}")
    else:
        assert isinstance(result, Event)


@given(st.text(min_size=0, max_size=500))
def test_excerpts_are_short(value: str) -> None:
    quoted = excerpt(value)
    assert len(quoted) <= EXCERPT_CHARS + 40
    if len(repr(value)) <= EXCERPT_CHARS + 2:
        assert quoted == repr(value)
    else:
        assert quoted.endswith(f"... ({len(value)} characters)")


# -- the reproduced bugs ---------------------------------------------------------------


def with_member(name: str, value: bytes) -> bytes:
    """A valid event with one more (ignored) member of ``data`` whose JSON text is ``value``."""
    raw = line(extra=1)
    assert b'"extra":1' in raw
    return raw.replace(b'"extra":1', b'"' + name.encode() + b'":' + value)


@pytest.mark.parametrize(
    "raw",
    [
        line().replace(b'"vm-1"', b'"vm-\xe9"'),  # the workload_id
        line().replace(b'"acme"', b'"ac\xe9me"'),
        line().replace(b'"vm"', b'"v\xe9"'),  # an enum
        line().replace(b'Z"', b'\xe9"'),  # the time
        with_member("extra", b'"caf\xe9"'),  # a member meter ignores
        with_member("caf\xe9", b"1").replace("caf\xe9".encode(), b"caf\xe9"),  # its name
        line() + b" \xe9",  # after the JSON
        b"\xef\xbb\xbf" + line().replace(b'"e-1"', b'"e-\xed\xa0\x80"'),  # an encoded surrogate
        line().replace(b'"e-1"', b'"e-\xc0\xaf"'),  # overlong
    ],
)
def test_invalid_utf8_anywhere_rejects_the_whole_message(raw: bytes) -> None:
    result = check(raw)
    assert isinstance(result, Rejected)
    assert result.code == "invalid_json"
    assert result.reason.startswith("not valid UTF-8 at byte ")
    at = int(result.reason.rsplit(" ", 1)[1])
    with pytest.raises(UnicodeDecodeError) as exc:
        raw.decode()
    assert exc.value.start == at


def test_valid_utf8_in_an_ignored_member_is_fine() -> None:
    assert isinstance(check(with_member("extra", '"café 😀"'.encode())), Event)
    assert isinstance(check(b"\xef\xbb\xbf" + line(workload="vm-é")), Event)


def test_a_lone_surrogate_in_text_is_rejected() -> None:
    result = check(line().decode().replace("vm-1", "vm-\ud800"))
    assert isinstance(result, Rejected)
    assert result.code == "invalid_json"
    assert "surrogate" in result.reason


def test_escaped_lone_surrogates_are_rejected_wherever_they_are() -> None:
    for raw in [line().replace(b'"vm-1"', b'"vm-\\ud800"'), with_member("x", b'"\\udc00"')]:
        result = check(raw)
        assert isinstance(result, Rejected)
        assert result.code == "invalid_json"


def nested(depth: int, opener: bytes = b"[", closer: bytes = b"]") -> bytes:
    """An event whose ignored member makes the whole document ``depth`` levels deep."""
    inner = depth - 2  # the event and its data are two levels
    return with_member("x", opener * inner + closer * inner)


@pytest.mark.parametrize("depth", [1000, 5000, 20_000])
def test_deep_nesting_is_a_rejection_not_a_recursion_error(depth: int) -> None:
    for raw in [nested(depth), with_member("x", b'{"a":' * depth + b"1" + b"}" * depth)]:
        result = check(raw, max_bytes=BIG)
        assert result == Rejected(
            "too_large", f"JSON nested more than {MAX_DEPTH} levels deep (the limit)"
        )
    # and, as the issue found it, as a whole document
    assert isinstance(check(b"[" * depth + b"]" * depth, max_bytes=BIG), Rejected)


def test_the_depth_limit_is_exact_and_does_not_depend_on_the_stack() -> None:
    ok, deep = nested(MAX_DEPTH), nested(MAX_DEPTH + 1)
    assert json.loads(ok)  # real JSON, MAX_DEPTH levels deep

    def at_stack_depth(n: int, raw: bytes) -> Event | Rejected:
        return check(raw, max_bytes=BIG) if n == 0 else at_stack_depth(n - 1, raw)

    for frames in (0, 50, 300):
        assert isinstance(at_stack_depth(frames, ok), Event)
        assert isinstance(at_stack_depth(frames, deep), Rejected)
    # Brackets inside strings do not nest.
    assert isinstance(check(with_member("x", b'"' + b"[{" * 5000 + b'"'), max_bytes=BIG), Event)
    assert sys.getrecursionlimit() - MAX_DEPTH >= 400  # headroom for the caller's stack


@pytest.mark.parametrize(
    ("value", "outcome"),
    [
        (b"9" * 5000, Event),  # huge integers and floats in ignored members are JSON
        (b"1e999999", Event),
        (b"-1.5e-999999", Event),
        (b"[" + b"1," * 2000 + b"1]", Event),
        (b"NaN", Rejected),
        (b"1.", Rejected),
        (b'"\\q"', Rejected),  # an invalid escape, even where meter does not look
        (b'"\x01"', Rejected),  # a raw control character in a string
    ],
)
def test_numbers_and_strings_in_ignored_members(value: bytes, outcome: type) -> None:
    assert isinstance(check(with_member("x", value), max_bytes=BIG), outcome)


def test_a_huge_number_where_a_string_belongs_is_wrong_type() -> None:
    for raw in [
        line().replace(b'"vm-1"', b"9" * 5000),
        line().replace(b'"vm-1"', b"1e999999"),
    ]:
        result = check(raw, max_bytes=BIG)
        assert isinstance(result, Rejected)
        assert result.code == "wrong_type"
        assert result.reason.startswith("data.workload_id: expected a string")


def test_size_limit_rejects_without_decoding() -> None:
    raw = line(time="x" * 100_000)
    result = check(raw)
    assert result == Rejected(
        "too_large", f"event is {len(raw)} bytes; the limit is {DEFAULT_MAX_EVENT_BYTES}"
    )
    text = raw.decode()
    result = check(text, max_bytes=1000)
    assert isinstance(result, Rejected)
    assert result.code == "too_large"
    assert isinstance(check(line(), max_bytes=len(line())), Event)
    assert check(line(), max_bytes=len(line()) - 1).code == "too_large"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (event(time="x" * 5_000_000), "time"),  # the 5 MB bad time
        (event(time="2026-11-03T10:00:00" + "0" * 100_000), "time"),
        (event(wtype="y" * 100_000), "data.workload_type"),
        (event(license="\n" * 50_000), "data.license"),
        (event(result="é" * 100_000), "data.result"),
        (dict(event(), specversion="1" * 100_000), "specversion"),
        (event(tenant="\x00" * 128), "data.tenant_id"),
        (event(tenant="t" * 100_000), "data.tenant_id"),
        (event(workload="w" * 100_000), "data.workload_id"),
    ],
)
def test_reasons_quote_a_bounded_excerpt(doc: dict[str, Any], field: str) -> None:
    raw = json.dumps(doc).encode()
    result = check(raw, max_bytes=BIG)
    assert isinstance(result, Rejected)
    assert result.reason.startswith(f"{field}: ")
    assert len(result.reason) < 300, result.reason


def test_a_short_bad_value_is_quoted_whole() -> None:
    assert check(line(time="yesterday")).reason.startswith(  # type: ignore[union-attr]
        "time: 'yesterday' not an RFC 3339"
    )
    assert check(line(wtype="tape")).reason.startswith(  # type: ignore[union-attr]
        "data.workload_type: 'tape' is not allowed"
    )
    assert check(line(wtype='it\'s "x"')).reason.startswith(  # type: ignore[union-attr]
        "data.workload_type: 'it\\'s \"x\"' is not allowed"
    )


def test_other_bytes_like_inputs() -> None:
    assert isinstance(check(bytearray(line())), Event)
    assert isinstance(check(memoryview(line())), Event)
    assert check(None).code == "invalid_json"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("time", "month"),
    [
        ("0001-01-01T00:00:00+01:00", "0000-12"),  # year 0 in UTC
        ("0001-01-01T00:59:59.999+01:00", "0000-12"),
        ("9999-12-31T23:00:00-01:00", "10000-01"),  # year 10000 in UTC
        ("9999-12-31T23:59:60-23:59", "10000-01"),
    ],
)
def test_instants_outside_the_utc_calendar_are_events_no_card_covers(time: str, month: str) -> None:
    # The schema accepts these times, so parse does; their date 0 is before every card.
    result = check(line(time=time))
    assert isinstance(result, Event)
    assert (result.month, result.date) == (month, 0)


@pytest.mark.parametrize(
    ("time", "month", "date"),
    [
        ("0001-01-01T00:00:00Z", "0001-01", 10101),
        ("0001-01-01T01:00:00+01:00", "0001-01", 10101),
        ("9999-12-31T23:59:59Z", "9999-12", 99991231),
        ("9999-12-31T22:59:59-01:00", "9999-12", 99991231),
    ],
)
def test_the_calendar_edges_themselves(time: str, month: str, date: int) -> None:
    result = check(line(time=time))
    assert isinstance(result, Event)
    assert (result.month, result.date) == (month, date)
