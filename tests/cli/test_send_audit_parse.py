"""``meter send`` keys and ``meter audit`` rates through ``parse``: any bytes, no exception."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meter.cli import build_parser, main
from meter.domain import Event, parse
from meter.domain.event import DEFAULT_MAX_EVENT_BYTES
from meter.stream.send import tenant_key
from tests.domain.events import line, mutated_events


@given(st.one_of(mutated_events, st.binary(max_size=300)), st.sampled_from([100, 65536]))
def test_a_line_is_keyed_by_tenant_exactly_when_meter_accepts_it(raw: bytes, limit: int) -> None:
    result = parse(raw, limit)
    key = tenant_key(raw, limit)
    assert key == (result.tenant_id.encode() if isinstance(result, Event) else None)


def test_the_reproduced_lines_get_no_key() -> None:
    assert tenant_key(line(tenant="globex")) == b"globex"
    assert tenant_key(line().replace(b'"vm-1"', b'"vm-\xe9"')) is None
    assert (
        tenant_key(b'{"data":{"tenant_id":"acme"},"x":' + b"[" * 5000 + b"]" * 5000 + b"}") is None
    )
    assert tenant_key(line(time="x" * 100_000)) is None
    assert tenant_key(line(workload="w" * 100), max_bytes=100) is None


def test_audit_and_rate_take_the_event_size_limit() -> None:
    parser = build_parser()
    args = parser.parse_args(["audit", "--month", "2026-11", "--max-event-bytes", "1000"])
    assert args.max_event_bytes == 1000
    assert parser.parse_args(["audit", "--month", "2026-11"]).max_event_bytes == (
        DEFAULT_MAX_EVENT_BYTES
    )
    assert parser.parse_args(["rate", "-"]).max_event_bytes == DEFAULT_MAX_EVENT_BYTES


@pytest.mark.parametrize("value", ["nov", "2026-13", "2026-1", "2026-00", "0000-01", ""])
def test_audit_of_an_invalid_month_exits_2_before_reading_anything(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """It printed "0 difference(s)" and exited 0: nothing is published for a month that
    cannot exist.  The broker is never asked (none listens on port 1)."""
    with pytest.raises(SystemExit) as exc:
        main(["audit", "--month", value, "--broker", "127.0.0.1:1"])
    out, err = capsys.readouterr()
    assert exc.value.code == 2
    assert out == ""
    assert "argument --month: " in err
    assert "expected YYYY-MM" in err
