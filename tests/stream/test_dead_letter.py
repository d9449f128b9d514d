"""A dead letter fits the broker whatever the message and its reason were."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meter.stream.records import (
    H_EXCEPTION,
    H_HEADERS_DROPPED,
    H_ORIGINAL_SIZE,
    H_REASON,
    H_TRUNCATED,
    MAX_REASON_BYTES,
    bounded_text,
    dead_letter,
    headers_dict,
)

MiB = 1024 * 1024
LIMIT = 64 * 1024


def size(headers: list[tuple[str, bytes]]) -> int:
    return sum(len(k.encode()) + len(v) for k, v in headers)


def test_a_message_that_fits_goes_as_it_came() -> None:
    raw = b'{"not": "an event"}'
    value, headers = dead_letter(
        raw, "data: missing", "missing_field", "meter.jobs", 2, 41, "t", max_bytes=len(raw)
    )
    assert value is raw
    assert headers_dict(headers) == {
        "meter.reason": "data: missing",
        "meter.code": "missing_field",
        "meter.source.topic": "meter.jobs",
        "meter.source.partition": "2",
        "meter.source.offset": "41",
        "meter.rejected_at": "t",
    }


def test_a_9_mib_message_becomes_a_bounded_prefix_that_says_so() -> None:
    raw = b"x" * (9 * MiB)
    value, headers = dead_letter(
        raw, "too large", "too_large", "meter.jobs", 0, 7, "t", max_bytes=LIMIT
    )
    assert value == raw[:LIMIT]
    h = headers_dict(headers)
    assert h[H_ORIGINAL_SIZE] == str(9 * MiB)
    assert h[H_TRUNCATED] == "true"
    assert h["meter.source.offset"] == "7"
    assert size(headers) < 1024


def test_a_5_mb_reason_gives_bounded_headers() -> None:
    reason = "time: " + "é" * (5 * 1000 * 1000 // 2)
    value, headers = dead_letter(
        b"{}",
        reason,
        "invalid_time",
        "meter.jobs",
        1,
        3,
        "t",
        max_bytes=LIMIT,
        extra=[(H_EXCEPTION, b"E" * MiB)],
    )
    assert value == b"{}"
    h = dict(headers)
    assert len(h[H_REASON]) <= MAX_REASON_BYTES
    assert h[H_REASON].decode().startswith("time: éé")  # cut on a character boundary
    assert h[H_REASON].endswith(b"...")
    assert len(h[H_EXCEPTION]) <= MAX_REASON_BYTES
    assert size(headers) < 2 * 1024


def test_the_exception_class_travels_in_a_header() -> None:
    _, headers = dead_letter(
        b"{}", "boom", "internal_error", "meter.jobs", 0, 1, "t", max_bytes=LIMIT,
        extra=[(H_EXCEPTION, b"KeyError")],
    )  # fmt: skip
    assert headers_dict(headers)[H_EXCEPTION] == "KeyError"
    assert H_TRUNCATED not in headers_dict(headers)


def test_a_negative_bound_is_a_bug() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        dead_letter(b"", "r", "c", "t", 0, 0, "t", max_bytes=-1)


@given(st.text(), st.integers(0, 600))
def test_bounded_text_is_short_valid_utf8_and_a_prefix(text: str, cap: int) -> None:
    out = bounded_text(text, cap)
    assert len(out) <= cap
    decoded = out.decode("utf-8")  # never a broken character
    whole = text.encode("utf-8", "replace").decode()
    if len(whole.encode()) <= cap:
        assert decoded == whole
    else:
        assert whole.startswith(decoded.removesuffix("..."))


@given(st.binary(max_size=300), st.integers(0, 400))
def test_the_value_is_the_message_or_its_prefix(raw: bytes, cap: int) -> None:
    value, headers = dead_letter(raw, "r", "c", "t", 0, 0, "t", max_bytes=cap)
    h = headers_dict(headers)
    if len(raw) <= cap:
        assert value == raw
        assert H_TRUNCATED not in h
    else:
        assert value == raw[:cap]
        assert h[H_ORIGINAL_SIZE] == str(len(raw))


def test_a_reason_that_is_not_valid_unicode_never_raises() -> None:
    assert bounded_text("bad \ud800 byte", 64) == b"bad ? byte"


def test_the_original_headers_come_first_and_meters_after() -> None:
    original = [
        ("ce_id", b"e-1"),
        ("traceparent", b"00-ab"),
        ("meter.reason", b"theirs"),
        ("n", None),
    ]
    value, headers = dead_letter(
        b"{}", "r", "c", "meter.jobs", 0, 1, "t", max_bytes=LIMIT, original_headers=original
    )
    assert value == b"{}"
    assert headers[:4] == [*original[:3], ("n", b"")]  # a null value goes empty
    assert headers_dict(headers)[H_REASON] == "r"  # the last of a name is meter's
    assert H_HEADERS_DROPPED not in headers_dict(headers)


def test_original_headers_over_the_bound_are_left_off_and_counted() -> None:
    original = [("a", b"x" * 100), ("b", b"y" * 9 * MiB), ("c", b"z"), ("d", b"")]
    _, headers = dead_letter(
        b"{}", "r", "c", "meter.jobs", 0, 1, "t", max_bytes=1000, original_headers=original
    )
    assert headers[0] == ("a", b"x" * 100)
    names = [k for k, _ in headers]
    assert "b" not in names and "c" not in names  # in order: nothing after the first left off
    assert headers_dict(headers)[H_HEADERS_DROPPED] == "3"
    assert size(headers) < 1000 + 1024


@given(
    st.binary(max_size=300),
    st.lists(st.tuples(st.text(max_size=20), st.one_of(st.none(), st.binary(max_size=200)))),
    st.integers(0, 400),
)
def test_value_plus_headers_stay_bounded(
    raw: bytes, original: list[tuple[str, bytes | None]], cap: int
) -> None:
    value, headers = dead_letter(
        raw, "r" * 5000, "c", "t", 0, 0, "t", max_bytes=cap, original_headers=original
    )
    kept = [(k, v or b"") for k, v in original][: len(headers)]
    assert headers[: len(kept)] == kept or H_HEADERS_DROPPED in headers_dict(headers)
    assert len(value) + size(headers) <= 2 * cap + 1024
