"""``parse_message``: both content modes of the CloudEvents Kafka binding, one contract."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meter.domain import Event, Rater, Rejected, load_ratecards, parse
from meter.domain import parse_message as parse_message_
from meter.domain.event import CE_HEADERS
from tests.domain.events import event, line, mutated_events, one_outcome, valid_events

Headers = list[tuple[str, bytes | None]]
CARDS = load_ratecards()


def parse_message(value: Any, headers: Any, max_bytes: int = 64 * 1024) -> Event | Rejected:
    """One outcome, of the right kind; a rejection has a known code and a short reason."""
    return one_outcome(parse_message_(value, headers, max_bytes))


def binary(raw: bytes) -> tuple[bytes, Headers] | None:
    """A structured event as the binding's binary mode: string attributes as ``ce_`` headers,
    ``data`` as the value; ``None`` if ``raw`` has no such shape."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or "data" not in doc:
        return None
    if not all(isinstance(doc.get(h[3:]), str) for h in CE_HEADERS):
        return None
    headers: Headers = [(f"ce_{k}", v.encode()) for k, v in doc.items() if isinstance(v, str)]
    return orjson.dumps(doc["data"]), [*headers, ("content-type", b"application/json")]


def binary_of(**kw: Any) -> tuple[bytes, Headers]:
    message = binary(line(**kw))
    assert message is not None
    return message


VALUE, HEADERS = binary_of()


def replaced(name: str, value: bytes | None) -> Headers:
    return [(k, value if k == name else v) for k, v in HEADERS]


def without(name: str) -> Headers:
    return [(k, v) for k, v in HEADERS if k != name]


# -- the same contract -----------------------------------------------------------------


def test_a_binary_event_is_the_structured_event() -> None:
    assert parse_message(VALUE, HEADERS) == parse(line())
    assert isinstance(parse(line()), Event)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(valid_events(), mutated_events))
def test_both_modes_give_the_same_outcome(raw: bytes) -> None:
    message = binary(raw)
    if message is None:
        return
    structured, in_binary = parse(raw), parse_message(*message)
    if isinstance(structured, Event):
        assert in_binary == structured
    else:
        assert isinstance(in_binary, Rejected)
        assert in_binary.code == structured.code, (structured, in_binary)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(valid_events(), st.booleans()), max_size=40))
def test_same_totals_whatever_the_mode_of_each_event(events: list[tuple[bytes, bool]]) -> None:
    structured, mixed = Rater(CARDS), Rater(CARDS)
    for raw, as_binary in events:
        structured.feed(raw)
        message = binary(raw)
        assert message is not None
        if as_binary:
            mixed.feed(*message)
        else:
            mixed.feed(raw, [("content-type", b"application/cloudevents+json")])
    assert mixed.ledger.usage() == structured.ledger.usage()
    assert mixed.tally == structured.tally


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(st.none(), st.binary(max_size=300), st.just(VALUE)),
    st.lists(
        st.tuples(
            st.one_of(st.sampled_from([*CE_HEADERS, "content-type", "ce_x"]), st.text()),
            st.one_of(st.none(), st.binary(max_size=60), st.sampled_from([v for _, v in HEADERS])),
        ),
        max_size=12,
    ),
)
@example(VALUE, [*HEADERS, ("ce_id", b"\xff")])
@example(None, HEADERS)
@example(VALUE, replaced("content-type", b"\xff" * 100_000))
def test_any_value_and_headers_give_one_bounded_outcome(
    value: bytes | None, headers: Headers
) -> None:
    parse_message(value, headers)


# -- binary-mode rejections name the header ---------------------------------------------


@pytest.mark.parametrize("name", CE_HEADERS)
def test_each_missing_header_is_named(name: str) -> None:
    assert parse_message(VALUE, without(name)) == Rejected(
        "missing_field", f"header {name}: missing (binary-mode CloudEvent)"
    )
    assert parse_message(VALUE, replaced(name, None)) == Rejected(
        "missing_field", f"header {name}: missing (binary-mode CloudEvent)"
    )


@pytest.mark.parametrize("name", CE_HEADERS)
def test_a_header_that_is_not_utf8_is_named(name: str) -> None:
    assert parse_message(VALUE, replaced(name, b"e-\xc3(")) == Rejected(
        "invalid_value", f"header {name}: not valid UTF-8 at byte 2"
    )


@pytest.mark.parametrize("name", CE_HEADERS)
def test_a_repeated_header_is_named(name: str) -> None:
    assert parse_message(VALUE, [*HEADERS, (name, dict(HEADERS)[name])]) == Rejected(
        "invalid_value", f"header {name}: appears more than once"
    )


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("ce_id", b"", "header ce_id: must not be empty"),
        ("ce_source", b"", "header ce_source: must not be empty"),
        ("ce_time", b"", "header ce_time: must not be empty"),
        ("ce_specversion", b"0.3", "header ce_specversion: '0.3' is not allowed (expected "
         "one of '1.0')"),
        ("ce_type", b"x", "header ce_type: 'x' is not allowed (expected one of "
         "'meter.job.workload')"),
    ],
)  # fmt: skip
def test_attribute_rules_are_the_structured_ones_naming_the_header(
    name: str, value: bytes, reason: str
) -> None:
    result = parse_message(VALUE, replaced(name, value))
    assert isinstance(result, Rejected)
    assert result.reason == reason


def test_a_naive_time_header_is_rejected_like_a_naive_time() -> None:
    structured = parse(line(time="2026-11-03T10:00:00"))
    in_binary = parse_message(VALUE, replaced("ce_time", b"2026-11-03T10:00:00"))
    assert isinstance(structured, Rejected)
    assert in_binary == Rejected("invalid_time", "header ce_" + structured.reason)


@pytest.mark.parametrize(
    "media",
    [
        b"text/plain",
        b"application/xml",
        b"application/json; charset=iso-8859-1",
        b"application/jsonx",
        b"application/json" + b" " * 300,
        b"\xff",
    ],
)
def test_an_unsupported_content_type_is_a_clear_rejection(media: bytes) -> None:
    result = parse_message(VALUE, replaced("content-type", media))
    assert isinstance(result, Rejected)
    assert result.code == "invalid_value"
    assert result.reason.startswith("header content-type: ")
    assert result.reason.endswith(" is not supported (binary-mode data must be application/json)")


@pytest.mark.parametrize(
    "media",
    [
        None,
        b"application/json",
        b'Application/JSON; charset="UTF-8"',
        b"application/json;charset=utf-8",
    ],
)
def test_json_data_is_read(media: bytes | None) -> None:
    headers = without("content-type") if media is None else replaced("content-type", media)
    assert parse_message(VALUE, headers) == parse(line())


def test_the_value_is_the_data() -> None:
    assert parse_message(b"", HEADERS) == Rejected(
        "missing_field", "data: missing (a binary-mode message's value is the event's data)"
    )
    assert parse_message(b"[1]", HEADERS) == Rejected(
        "wrong_type", "data: expected an object, got array"
    )
    # A value that would make a valid envelope is still not one JSON value.
    smuggled = VALUE[:-1] + b',"x":1}, "id": "other"'
    with pytest.raises(msgspec.DecodeError) as exc:  # offsets are the value's own
        msgspec.json.decode(smuggled)
    assert parse_message(smuggled, HEADERS) == Rejected(
        "invalid_json", f"data: not valid JSON: {exc.value}"
    )
    at = VALUE.index(b"vm-1") + 3
    assert parse_message(VALUE.replace(b"vm-1", b"vm-\xe9"), HEADERS) == Rejected(
        "invalid_json", f"data: not valid UTF-8 at byte {at}"
    )
    no_license = binary_of(license=None)
    assert parse_message(*no_license) == parse(line(license=None))
    assert parse_message(b"\xef\xbb\xbf" + VALUE, HEADERS) == parse(line())


def test_huge_headers_are_too_large_without_being_read() -> None:
    fits = sum(len(v or b"") for k, v in HEADERS if k != "content-type") + len(VALUE)
    huge = replaced("ce_source", b"s" * 50_000_000)
    t0 = time.perf_counter()
    result = parse_message(VALUE, huge)
    assert time.perf_counter() - t0 < 0.5
    size = fits - len(dict(HEADERS)["ce_source"] or b"") + 50_000_000
    assert result == Rejected(
        "too_large", f"event is {size} bytes (value and ce_ headers); the limit is 65536"
    )
    assert isinstance(parse_message(VALUE, HEADERS, fits), Event)
    assert parse_message(VALUE, HEADERS, fits - 1).code == "too_large"  # type: ignore[union-attr]


def test_other_headers_are_ignored() -> None:
    headers = [("traceparent", b"00-ab-cd-01"), *HEADERS, ("ce_subject", b"\xff"), ("x", None)]
    assert parse_message(VALUE, [*headers, ("traceparent", b"again")]) == parse(line())


# -- structured mode, and today's producers --------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        [],
        None,
        [("content-type", b"application/cloudevents+json")],
        [("content-type", b"application/cloudevents+json; charset=UTF-8"), ("ce_id", b"\xff")],
        [("content-type", b"application/json")],  # a plain JSON producer that says so
        [("traceparent", b"00-ab-cd-01")],
    ],
)
def test_structured_mode_reads_the_value_as_the_event(headers: Headers | None) -> None:
    assert parse_message(line(), headers) == parse(line())
    assert parse_message(b"nope", headers) == parse(b"nope")


def test_a_cloudevents_format_other_than_json_is_a_clear_rejection() -> None:
    assert parse_message(line(), [("content-type", b"application/cloudevents+avro")]) == Rejected(
        "invalid_value",
        "header content-type: 'application/cloudevents+avro' is not supported "
        "(structured-mode events must be application/cloudevents+json)",
    )


def test_a_message_without_a_value() -> None:
    assert parse_message(None, []) == Rejected("invalid_json", "message has no value")
    assert parse_message(None, [("content-type", b"application/cloudevents+json")]) == Rejected(
        "invalid_json", "message has no value"
    )


# -- the official SDK's Kafka binding ----------------------------------------------------


def sdk_event(doc: dict[str, Any]) -> Any:
    from cloudevents.core.v1.event import CloudEvent
    from dateutil.parser import isoparse

    attributes = {k: v for k, v in doc.items() if k != "data"}
    attributes["time"] = isoparse(attributes["time"])
    return CloudEvent(attributes=attributes, data=doc["data"])


@pytest.mark.parametrize(
    "doc",
    [
        event(),
        event(time="2026-11-01T01:30:00+02:00", wtype="cloud_vm", license=None),
        event(workload="vm-é", tenant="acme.eu", id="ü-1"),
    ],
)
def test_the_official_sdk_both_modes(doc: dict[str, Any]) -> None:
    from cloudevents.core.bindings.kafka import to_binary, to_structured
    from cloudevents.core.formats.json import JSONFormat

    expected = parse(orjson.dumps(doc))
    assert isinstance(expected, Event)
    for to in (to_binary, to_structured):
        message = to(sdk_event(doc), JSONFormat())
        got = parse_message(message.value, list(message.headers.items()))
        assert isinstance(got, Event), (to.__name__, got)
        assert (got.id, got.tenant_id, got.workload_id, got.month, got.date) == (
            expected.id, expected.tenant_id, expected.workload_id, expected.month, expected.date
        )  # fmt: skip
