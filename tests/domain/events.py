"""Event builders and hypothesis strategies shared by the tests."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import strategies as st

from meter.domain import LICENSED_TYPES, LICENSES, REJECTION_CODES, WORKLOAD_TYPES, Event, Rejected
from meter.domain.event import MAX_REASON_CHARS


def event(
    tenant: str = "acme",
    workload: str = "vm-1",
    wtype: str = "vm",
    license: str | None = "subscription",
    result: str = "success",
    time: str = "2026-11-03T10:00:00Z",
    id: str = "e-1",
    **extra_data: Any,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "tenant_id": tenant,
        "workload_id": workload,
        "workload_type": wtype,
        "result": result,
        **extra_data,
    }
    if license is not None:
        data["license"] = license
    return {
        "specversion": "1.0",
        "id": id,
        "source": "vbr://acme/vbr-01",
        "type": "meter.job.workload",
        "time": time,
        "data": data,
    }


def line(**kw: Any) -> bytes:
    return orjson.dumps(event(**kw))


TIMES = [
    "2026-10-31T23:30:00Z",
    "2026-11-01T01:30:00+02:00",  # October in UTC
    "2026-11-01T00:00:00Z",
    "2026-11-15T12:00:00.5+05:30",
    "2026-11-30T23:30:00-01:00",  # December in UTC
    "2026-12-01T00:00:00Z",
]


@st.composite
def valid_events(draw: st.DrawFn) -> bytes:
    wtype = draw(st.sampled_from(WORKLOAD_TYPES))
    lic: str | None = draw(st.sampled_from(LICENSES))
    if wtype not in LICENSED_TYPES and draw(st.booleans()):
        lic = None
    return line(
        tenant=draw(st.sampled_from(["acme", "globex", "initech"])),
        workload=draw(st.sampled_from(["w1", "w2", "w3", "vm-4221"])),
        wtype=wtype,
        license=lic,
        result=draw(st.sampled_from(["success", "warning", "failed"])),
        time=draw(st.sampled_from(TIMES)),
        id=f"e-{draw(st.integers(0, 10**6))}",
    )


bad_events = st.sampled_from(
    [
        b"not json",
        b"[]",
        b"{}",
        line(license=None),
        line(time="2026-11-03T10:00:00"),
        line(tenant="a/b"),
        line(wtype="tape"),
        line(result="ok"),
        line(workload="bad\u0007id"),
        b'{"specversion": "1.0"}',
    ]
)

events = st.one_of(valid_events(), valid_events(), valid_events(), bad_events)


#: Bytes that break things when they land in the wrong place.
NASTY_BYTES = b'\x00\n\r "\\[]{},:0e-.\x7f\x80\xbf\xc0\xc3\xe9\xed\xef\xf0\xf4\xf5\xff'


@st.composite
def mutated(draw: st.DrawFn, raw: bytes) -> bytes:
    """``raw`` with 1 to 3 bytes flipped, inserted, deleted, or cut off at the end."""
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "nasty"]))
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "nasty":
            data[at:at] = bytes([draw(st.sampled_from(NASTY_BYTES))])
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    return bytes(data)


mutated_events = valid_events().flatmap(mutated)


def one_outcome(result: Event | Rejected) -> Event | Rejected:
    """Assert a parse gave one outcome of the right kind: an event, or a rejection with a
    known code (never internal_error) and a short reason."""
    assert isinstance(result, Event | Rejected)
    if isinstance(result, Rejected):
        assert result.code in REJECTION_CODES
        assert result.code != "internal_error", result
        assert 0 < len(result.reason) <= MAX_REASON_CHARS
    return result
