"""What the worker writes, without a broker."""

from __future__ import annotations

import orjson
import pytest

from meter.domain import Ledger, load_ratecards
from meter.stream.records import (
    CHANGELOG_RECORD_BYTES,
    ChangelogError,
    changelog_chunks,
    decode_changelog,
    encode_changelog,
    encode_usage,
    headers_dict,
    read_changelog,
    rejected_headers,
    usage_key,
)
from meter.stream.usage import keep_latest, usage_rows

CARDS = load_ratecards()


def test_changelog_round_trip_and_replay_is_a_join() -> None:
    entries = [
        ("acme", "2026-11", "vm", "vm-1", (5, "vcsp-2026", "subscription")),
        ("acme", "2026-11", "vm", "vm-1", (0, "vcsp-2026", "rental")),
        ("acme", "2026-11", "replica", "vm-1", (10, "vcsp-2026", "subscription")),
    ]
    raw = encode_changelog(entries)
    assert decode_changelog(raw) == entries
    once, twice = Ledger(), Ledger()
    for e in decode_changelog(raw):
        once.add(*e)
    for e in decode_changelog(raw) + list(reversed(decode_changelog(raw))):
        twice.add(*e)
    assert once == twice
    assert [(u.workload_type, u.workloads, u.points) for u in once.usage()] == [
        ("replica", 1, 10),
        ("vm", 1, 5),
    ]


@pytest.mark.parametrize(
    "raw", [b"nope", b"{}", b'{"v": 2, "entries": []}', b'{"v":1,"entries":[[1]]}']
)
def test_unreadable_changelog_is_a_clear_error(raw: bytes) -> None:
    with pytest.raises(ChangelogError):
        decode_changelog(raw)


def test_usage_record_shape() -> None:
    ledger = Ledger(height=CARDS.height)
    ledger.add("acme", "2026-11", "vm", "a", (5, "vcsp-2026", "subscription"))
    ledger.add("acme", "2026-11", "vm", "b", (5, "vcsp-2026", "subscription"))
    ledger.add("acme", "2026-11", "replica", "a", (10, "vcsp-2026", "subscription"))
    tm = ledger.tenant_month("acme", "2026-11")
    assert tm is not None
    doc = orjson.loads(encode_usage(tm, "2026-11-27T19:00:00Z"))
    assert doc == {
        "tenant_id": "acme",
        "month": "2026-11",
        "revision": 2 * CARDS.height((5, "vcsp-2026", "subscription"))
        + CARDS.height((10, "vcsp-2026", "subscription")),
        "usage": {
            "replica": {"workloads": 1, "points": 10, "rental_workloads": 0},
            "vm": {"workloads": 2, "points": 10, "rental_workloads": 0},
        },
        "workloads": 3,
        "points": 20,
        "ratecard": "vcsp-2026",
        "ratecards": ["vcsp-2026"],
        "updated_at": "2026-11-27T19:00:00Z",
    }
    assert usage_key("acme", "2026-11") == b"acme/2026-11"


def test_highest_revision_wins_whatever_the_order() -> None:
    old = {"tenant_id": "a", "month": "2026-11", "revision": 3,
           "usage": {"vm": {"workloads": 1, "points": 2}}}  # fmt: skip
    new = {"tenant_id": "a", "month": "2026-11", "revision": 9,
           "usage": {"vm": {"workloads": 2, "points": 7}}}  # fmt: skip
    for order in ([old, new], [new, old], [new, old, new, old]):
        latest: dict[str, dict[str, object]] = {}
        for rec in order:
            keep_latest(latest, "a/2026-11", rec)  # type: ignore[arg-type]
        assert latest["a/2026-11"] is new
        assert [(r.workloads, r.points) for r in usage_rows(latest)] == [(2, 7)]  # type: ignore[arg-type]


def test_equal_revisions_keep_the_later_record() -> None:
    running = {"tenant_id": "a", "month": "2026-11", "revision": 9,
               "usage": {"vm": {"workloads": 2, "points": 7}}}  # fmt: skip
    final = {**running, "final": True}
    latest: dict[str, dict[str, object]] = {}
    for rec in (running, final):
        keep_latest(latest, "a/2026-11", rec)  # type: ignore[arg-type]
    assert latest["a/2026-11"] is final


@pytest.mark.parametrize("bad", [None, "12", 3.5, True, [1]])
def test_a_record_without_an_integer_revision_never_wins_nor_raises(bad: object) -> None:
    good = {"tenant_id": "a", "month": "2026-11", "revision": 1,
            "usage": {"vm": {"workloads": 1, "points": 0}}}  # fmt: skip
    for order in ([good, {"revision": bad}], [{"revision": bad}, good]):
        latest: dict[str, dict[str, object]] = {}
        for rec in order:
            keep_latest(latest, "a/2026-11", rec)  # type: ignore[arg-type]
        assert latest["a/2026-11"] is good


def test_rejected_headers_name_the_source() -> None:
    h = headers_dict(
        rejected_headers("data.license: missing", "missing_field", "meter.jobs", 2, 41, "t")
    )
    assert h == {
        "meter.reason": "data.license: missing",
        "meter.code": "missing_field",
        "meter.source.topic": "meter.jobs",
        "meter.source.partition": "2",
        "meter.source.offset": "41",
        "meter.rejected_at": "t",
    }


def test_malformed_usage_records_are_skipped_not_fatal() -> None:
    good = {"tenant_id": "a", "month": "2026-11", "revision": 2,
            "usage": {"vm": {"workloads": 1, "points": 1}}}  # fmt: skip
    records = {"a/2026-11": good, "x": {"revision": 9}, "y": {"month": "2026-11", "usage": 3}}
    assert [(r.tenant_id, r.points) for r in usage_rows(records)] == [("a", 1)]  # type: ignore[arg-type]


def test_changelog_records_fit_whatever_the_ids() -> None:
    """Late events with 60 KB ids, or workload ids of 4-byte characters, never make a
    changelog record too large for the broker."""
    wide = "\U0001f600" * 256
    entries = [("t", "2026-10", "vm", f"{wide}{n}", (5, "v1", "rental")) for n in range(3000)]
    ids = {n: "e" * 60_000 for n in range(0, 3000, 7)}
    chunks = list(changelog_chunks(entries, ids))
    assert all(len(c) <= CHANGELOG_RECORD_BYTES + 70_000 for c in chunks)
    back = [e for c in chunks for e in read_changelog(c).entries]
    assert back == entries
    got_ids = {}
    offset = 0
    for c in chunks:
        rec = read_changelog(c)
        got_ids.update({offset + k: v for k, v in rec.event_ids.items()})
        offset += len(rec.entries)
    assert got_ids == ids
    small = [("t", "2026-10", "vm", f"w{n}", (5, "v1", "rental")) for n in range(5000)]
    assert [len(read_changelog(c).entries) for c in changelog_chunks(small, {})] == [
        2000,
        2000,
        1000,
    ]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"v": 1, "entries": [["t", "9999-13", "vm", "w", 5, "c", "rental"]]}',
        b'{"v": 1, "entries": [["t", "0000-01", "vm", "w", 5, "c", "rental"]]}',
        b'{"v": 1, "entries": [[1, "2026-10", "vm", "w", 5, "c", "rental"]]}',
        b'{"v": 1, "entries": [["t", "2026-10", "vm", ["w"], 5, "c", "rental"]]}',
        b'{"v": 1, "closed": "soon"}',
        b'{"v": 1, "final": "2026-10", "entries": [["t", "vm", {}, 5, "c", "r"]]}',
        b'{"v": 1, "entries": [["t", "2026-10", "vm", "w", "x", "c", "rental"]]}',
        b"\xff\xfe",
        b"[" * 5000,
    ],
)
def test_a_malformed_changelog_record_is_one_clear_error(raw: bytes) -> None:
    """Whatever another writer put on the changelog, recovery gets a ChangelogError to log
    and skip, never a value that breaks month arithmetic or sorting later."""
    with pytest.raises(ChangelogError):
        read_changelog(raw)
