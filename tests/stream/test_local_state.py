"""Local state of a home partition: checkpoints, restarts from them, pruning closed months.

No broker: a list of bytes plays the changelog, with the worker's own record encoders; the
store is the real SQLite one, in a temporary directory.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter.domain import load_ratecards
from meter.domain.license import tail_month
from meter.store import Checkpoint, LocalStateError, StoreError
from meter.store.sqlite import SqlitePartition, SqliteStore
from meter.stream.closing import close_records
from meter.stream.partition import ROW_BYTES, HomePartition, Phase
from meter.stream.records import changelog_chunks, tail_chunks

CARDS = load_ratecards()
CLOSED_AT = datetime(2030, 1, 1, tzinfo=UTC)
MONTHS = ("2026-01", "2026-02", "2026-03", "2026-04")
RATES = (
    (1, "vcsp-2026", "rental"),
    (5, "vcsp-2026", "subscription"),
    (10, "vcsp-2026", "subscription"),
)


@dataclass
class Changelog:
    """The changelog partition: records at offsets 0, 1, ..."""

    records: list[bytes] = field(default_factory=list)

    def append(self, raws: list[bytes]) -> list[int]:
        start = len(self.records)
        self.records.extend(raws)
        return list(range(start, len(self.records)))

    def fingerprint(self, end: int) -> int:
        return zlib.crc32(self.records[end - 1]) if end else 0


def write(hp: HomePartition, log: Changelog) -> None:
    """What the worker does with a batch: write its changes, then mark them acknowledged."""
    batch = hp.take_batch()
    raws = list(changelog_chunks(batch.entries, batch.event_ids)) + list(tail_chunks(batch.tails))
    hp.written(batch, log.append(raws) if raws else [])


def close(hp: HomePartition, log: Changelog, month: str) -> None:
    """What the worker's month close writes, and then tells the partition."""
    snap = hp.close.snapshot(hp.ledger, month)
    lsnap = hp.close.license_snapshot(hp.license, month)
    start = hp.license.history_start
    hp.acknowledged(log.append(close_records(month, snap, lsnap, start, CLOSED_AT)))
    hp.closed(month, snap, lsnap, start)


def event(
    hp: HomePartition, tenant: str, month: str, wid: str, rate: tuple[int, str, str], day: int
) -> bool:
    tail = tail_month(int(month.replace("-", "")) * 100 + day)
    return hp.apply(tenant, month, "vm", wid, rate, 0, f"{tenant}/{month}/{wid}/{day}", tail)


def fresh(store: SqlitePartition | None = None, start: str | None = "2026-01") -> HomePartition:
    hp = HomePartition(0, CARDS.height, history_start=start)
    hp.store = store
    return hp


def recover(log: Changelog, store: SqlitePartition, start: str | None = "2026-01") -> HomePartition:
    """A worker taking the partition: the saved state if it matches, then the tail."""
    hp = fresh(store, start)
    hp.begin_recovery()
    cp = store.checkpoint()
    start = 0
    if cp is not None and cp.offset <= len(log.records):
        assert cp.fingerprint == log.fingerprint(cp.offset)
        hp.restore(store, cp)
        start = cp.offset
    for raw in log.records[start:]:
        hp.replay(raw)
    hp.recovered(len(log.records))
    return hp


def state(hp: HomePartition) -> dict[str, object]:
    """Everything the partition holds, every pruned month read back first."""
    hp.load_months(set(hp.pruned))
    hc = hp.close
    return {
        "ledger": sorted(hp.ledger.entries()),
        "tails": sorted(hp.license.tail_entries()),
        "first": sorted(hp.license.firsts()),
        "license": sorted(
            (k, sorted(lm.totals.items()), lm.revision) for k, lm in hp.license.months.items()
        ),
        "closed": sorted(hc.closed),
        "finals": sorted((m, sorted(v.items())) for m, v in hc.finals.items() if v),
        "license_finals": sorted((m, sorted(v.items())) for m, v in hc.license_finals.items()),
        "starts": sorted(hc.license_starts.items()),
        "late": sorted(hc.late_ids.items()),
    }


def in_memory(hp: HomePartition, months: set[str]) -> dict[str, object]:
    """What the partition holds in memory of ``months``, without reading anything back."""
    lic = hp.license
    return {
        "ledger": sorted(e for e in hp.ledger.entries() if e[1] in months),
        "license": sorted(
            (k, sorted(lm.totals.items()), lm.revision)
            for k, lm in lic.months.items()
            if k[1] in months and lm.totals
        ),
        "contributions": sorted(
            (t, m, w, i, lic.contribution(t, m, w, i))
            for t, m, w, i, _ in hp.ledger.entries()
            if m in months
        ),
    }


def store_in(tmp: Path) -> SqlitePartition:
    return SqliteStore(tmp).partition("meter.jobs.ledger.changelog", 0)


# ---------------------------------------------------------------- examples


def test_a_restart_reads_the_saved_state_and_only_the_changelog_written_since(
    tmp_path: Path,
) -> None:
    log = Changelog()
    store = store_in(tmp_path)
    hp = recover(log, store)
    for n in range(50):
        event(hp, f"t{n % 3}", "2026-01", f"w{n}", RATES[n % 3], 31)
    write(hp, log)
    close(hp, log, "2026-01")
    hp.save(log.fingerprint(hp.changelog_end))
    saved_at = len(log.records)
    event(hp, "t0", "2026-02", "w-new", RATES[1], 2)
    write(hp, log)

    replayed: list[bytes] = []
    again = fresh(store)
    again.begin_recovery()
    cp = store.checkpoint()
    assert cp is not None
    assert cp.offset == saved_at
    again.restore(store, cp)
    for raw in log.records[cp.offset :]:
        replayed.append(raw)
        again.replay(raw)
    again.recovered(len(log.records))
    assert len(replayed) == 1  # the one batch written after the checkpoint
    assert state(again) == state(hp)


def test_a_pruned_month_leaves_memory_and_a_late_event_for_it_becomes_the_same_correction(
    tmp_path: Path,
) -> None:
    log, plain_log = Changelog(), Changelog()
    hp = recover(log, store_in(tmp_path))
    plain = recover(plain_log, store_in(tmp_path / "unused"))
    plain.store = None
    for p, lg in ((hp, log), (plain, plain_log)):
        for n in range(20):
            event(p, "acme", "2026-01", f"w{n}", RATES[1], 10)
        event(p, "acme", "2026-02", "w0", RATES[1], 3)
        write(p, lg)
        close(p, lg, "2026-01")
    assert hp.save(log.fingerprint(hp.changelog_end), {"2026-01"}) == 1
    assert hp.pruned == {"2026-01"}
    assert hp.ledger.tenant_month("acme", "2026-01") is None
    assert len(hp.ledger) == 1  # February's one workload is all that is in memory
    assert hp.license.first_month("acme", "vm", "w0") == "2026-01"  # the one map kept for ever

    # A duplicate of a pruned month's workload changes nothing; a higher rate and a new
    # workload become corrections, exactly as without pruning.
    for p, lg in ((hp, log), (plain, plain_log)):
        assert not event(p, "acme", "2026-01", "w3", RATES[0], 10)
        assert event(p, "acme", "2026-01", "w4", RATES[2], 10)
        assert event(p, "acme", "2026-01", "w99", RATES[1], 10)
        write(p, lg)
    assert hp.pruned == set()
    assert hp.corr_dirty == plain.corr_dirty
    assert hp.lcorr_dirty == plain.lcorr_dirty
    assert state(hp) == state(plain)


def test_a_late_event_before_a_workloads_first_month_reads_that_month_back(
    tmp_path: Path,
) -> None:
    log = Changelog()
    hp = recover(log, store_in(tmp_path))
    event(hp, "acme", "2026-02", "w0", RATES[1], 3)
    write(hp, log)
    close(hp, log, "2026-01")
    close(hp, log, "2026-02")
    hp.save(log.fingerprint(hp.changelog_end), {"2026-01", "2026-02"})
    assert hp.pruned == {"2026-01", "2026-02"}
    assert event(hp, "acme", "2026-01", "w0", RATES[1], 3)  # earlier than its first month
    write(hp, log)
    assert hp.pruned == set()
    # February's report changed (w0 is no longer new there): a license correction.
    assert ("acme", "2026-02", "vm", "w0") in hp.lcorr_dirty
    assert hp.license.contribution("acme", "2026-02", "vm", "w0") == (RATES[1], False)


def test_a_pruned_month_that_no_longer_reads_back_asks_for_a_rebuild(tmp_path: Path) -> None:
    log = Changelog()
    store = store_in(tmp_path)
    hp = recover(log, store)
    event(hp, "acme", "2026-01", "w0", RATES[1], 3)
    write(hp, log)
    close(hp, log, "2026-01")
    hp.save(log.fingerprint(hp.changelog_end), {"2026-01"})
    db = __import__("sqlite3").connect(store.path)
    db.execute("UPDATE records SET raw = CAST('[]' AS BLOB) WHERE key = 'month:2026-01'")
    db.commit()
    db.close()
    with pytest.raises(LocalStateError, match="home partition 0"):
        event(hp, "acme", "2026-01", "w1", RATES[1], 3)  # late: needs January back
    hp.state_lost("test")
    assert hp.phase is Phase.FENCED
    assert hp.needs_rebuild
    assert not store.path.exists()  # rebuilt from the changelog, not trusted again
    hp.begin_recovery()
    assert len(hp.ledger) == 0 and hp.changelog_end == 0


def test_a_corrupt_row_is_found_before_anything_is_loaded(tmp_path: Path) -> None:
    log = Changelog()
    store = store_in(tmp_path)
    hp = recover(log, store)
    event(hp, "acme", "2026-01", "w0", RATES[1], 3)
    write(hp, log)
    hp.save(log.fingerprint(hp.changelog_end))
    store.close()
    db = __import__("sqlite3").connect(store.path)
    db.execute("UPDATE records SET raw = CAST(replace(CAST(raw AS TEXT), 'w0', 'w9') AS BLOB)")
    db.commit()
    db.close()
    cp = store.checkpoint()
    assert cp is not None  # the row checksums in the checkpoint still add up ...
    again = fresh(store)
    again.begin_recovery()
    with pytest.raises(StoreError, match="corrupt"):
        again.restore(store, cp)  # ... but the record's own checksum does not
    assert len(again.ledger) == 0  # nothing half-loaded is kept


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: p.write_bytes(b"not a database at all" * 100), id="garbage"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:1000]), id="truncated"),
        pytest.param(
            lambda p: (
                __import__("sqlite3")
                .connect(p)
                .execute("DELETE FROM records WHERE seq = 0")
                .connection.commit()
            ),
            id="row-deleted",
        ),
    ],
)
def test_a_damaged_store_is_an_error_not_a_state(tmp_path: Path, damage: object) -> None:
    log = Changelog()
    store = store_in(tmp_path)
    hp = recover(log, store)
    for n in range(30):
        event(hp, "acme", "2026-01", f"w{n}", RATES[1], 3)
    write(hp, log)
    hp.save(log.fingerprint(hp.changelog_end))
    store.close()
    damage(store.path)  # type: ignore[operator]
    with pytest.raises(StoreError):
        store.checkpoint()
    store.clear()
    assert store.checkpoint() is None  # cleared: rebuilt from the changelog


class Torn(dict[str, list[bytes]]):
    """Rows whose second item never comes: the process dies half-way through a save."""

    def items(self):  # type: ignore[no-untyped-def, override]
        for n, item in enumerate(super().items()):
            if n == 1:
                raise KeyboardInterrupt
            yield item


def test_a_save_killed_half_way_leaves_the_previous_checkpoint_whole(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    store.save(Checkpoint(3, 7), {"month:2026-01": [b"a", b"b"]})
    with pytest.raises(KeyboardInterrupt):
        store.save(Checkpoint(9, 9), Torn({"month:2026-01": [b"x"], "month:2026-02": [b"y"]}))
    store.close()
    assert store.checkpoint() == Checkpoint(3, 7)
    assert list(store.read("month:2026-01")) == [b"a", b"b"]
    assert list(store.read("month:2026-02")) == []


# ---------------------------------------------------------------- property


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[object, ...]]:
    ops: list[tuple[object, ...]] = []
    closed = 0
    for _ in range(draw(st.integers(1, 40))):
        kind = draw(st.sampled_from(["events", "events", "events", "close", "save", "crash"]))
        if kind == "events":
            evs = draw(
                st.lists(
                    st.tuples(
                        st.sampled_from(["a", "b"]),
                        st.sampled_from(MONTHS),
                        st.sampled_from(["w1", "w2", "w3", "w4"]),
                        st.sampled_from(RATES),
                        st.sampled_from([1, 15, 30, 31]),
                    ),
                    min_size=1,
                    max_size=6,
                )
            )
            ops.append(("events", evs))
        elif kind == "close" and closed < len(MONTHS) - 1:
            ops.append(("close", MONTHS[closed]))
            closed += 1
        elif kind == "save":
            ops.append(("save", draw(st.booleans()), draw(st.booleans())))
        elif kind == "crash":
            ops.append(("crash",))
    return ops


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=histories(), start=st.sampled_from(["2026-01", "2026-02", None]))
def test_any_history_of_events_checkpoints_prunes_and_crashes_recovers_the_same_state(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[object, ...]], start: str | None
) -> None:
    """For any interleaving of events, closes, checkpoints (whole or killed half-way),
    pruning and crashes (the process gone, its memory with it), the recovered state equals
    the state of the same events and closes applied once, without local state; with the
    history start fixed before, inside or not at all (the earliest month in the data)."""
    store = store_in(tmp_path_factory.mktemp("state"))
    log, ref_log = Changelog(), Changelog()
    hp = recover(log, store, start)
    ref = fresh(None, start)
    ref.begin_recovery()
    ref.recovered(0)
    for op in ops:
        if op[0] == "events":
            for p, lg in ((hp, log), (ref, ref_log)):
                for tenant, month, wid, rate, day in op[1]:  # type: ignore[attr-defined]
                    event(p, tenant, month, wid, rate, day)
                write(p, lg)
        elif op[0] == "close":
            close(hp, log, str(op[1]))
            close(ref, ref_log, str(op[1]))
        elif op[0] == "save":
            whole, prune = op[1], op[2]
            prunable = set(hp.close.closed) if prune else set()
            if whole:
                hp.save(log.fingerprint(hp.changelog_end), prunable)
            else:
                # Killed half-way: the transaction never commits (SQLite rolls it back).
                real = store.save
                store.save = lambda cp, rows, real=real: real(cp, Torn(rows))  # type: ignore[method-assign, misc]
                try:
                    hp.save(log.fingerprint(hp.changelog_end), prunable)
                except KeyboardInterrupt:
                    pass
                finally:
                    del store.save
                hp = crash(log, store, start)
        elif op[0] == "crash":
            hp = crash(log, store, start)
        # What is in memory is exact as it is, not only once the pruned months are read back.
        hot = set(MONTHS) - hp.pruned
        assert in_memory(hp, hot) == in_memory(ref, hot)
    assert hp.phase is Phase.ACTIVE
    assert state(hp) == state(ref)
    assert state(crash(log, store, start)) == state(ref)


def crash(log: Changelog, store: SqlitePartition, start: str | None = "2026-01") -> HomePartition:
    store.close()  # the process is gone: whatever it had not committed is lost
    return recover(log, store, start)


def test_after_a_restart_a_workload_first_seen_in_a_pruned_month_is_still_not_new(
    tmp_path: Path,
) -> None:
    log = Changelog()
    store = store_in(tmp_path)
    hp = recover(log, store)
    event(hp, "acme", "2026-02", "w0", RATES[1], 3)
    write(hp, log)
    close(hp, log, "2026-02")
    event(hp, "acme", "2026-03", "w0", RATES[1], 3)
    event(hp, "acme", "2026-03", "w1", RATES[1], 3)
    write(hp, log)
    hp.save(log.fingerprint(hp.changelog_end), {"2026-02"})
    assert hp.pruned == {"2026-02"}
    again = crash(log, store)
    assert again.pruned == {"2026-02"}
    assert again.ledger.tenant_month("acme", "2026-02") is None
    assert again.license.contribution("acme", "2026-03", "vm", "w0") == (RATES[1], False)
    assert again.license.contribution("acme", "2026-03", "vm", "w1") == (RATES[1], True)
    assert again.license.new_points("2026-03") == 5


def test_a_closed_month_is_pruned_once_due_and_published() -> None:
    from datetime import timedelta

    from meter.kafka import KafkaSettings
    from meter.stream.config import StreamConfig
    from meter.stream.worker import Worker

    config = StreamConfig(prune_after=timedelta(days=7))
    now = datetime(2026, 7, 10, 0, 0, 1, tzinfo=UTC)
    w = Worker(KafkaSettings(bootstrap="127.0.0.1:1"), config, CARDS, now=lambda: now)
    hp = fresh()
    hp.close.closed.update({"2026-03", "2026-04", "2026-05", "2026-06"})
    w._closes_published.update({(0, "2026-04"), (0, "2026-05"), (0, "2026-06")})
    hp.pruned.add("2026-04")
    # March: its close is not on meter.reports yet; April: pruned already; May: due;
    # June: closed on 3 July, 7 days ago: due too (its totals stay for /metrics).
    assert w._prunable(hp, now) == {"2026-05", "2026-06"}
    assert w._prunable(hp, now - timedelta(days=100)) == set()  # not due yet


def test_a_save_leaves_no_second_copy_in_the_write_ahead_log(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path).partition("changelog", 0)
    rows = {f"month:2026-0{m}": [bytes([m]) * 500_000 for _ in range(4)] for m in (1, 2)}
    store.save(Checkpoint(10, 0, (), ()), rows)
    store.save(Checkpoint(11, 0, (), ()), {"month:2026-01": [b"x" * 500_000]})
    wal = Path(f"{store.path}-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    assert store.path.stat().st_size > 4_000_000  # it is all in the file
    assert [len(r) for r in store.read("month:2026-02")] == [500_000] * 4
    again = SqliteStore(tmp_path).partition("changelog", 0)
    checkpoint = again.checkpoint()
    assert checkpoint is not None and checkpoint.offset == 11


def test_a_pruned_month_on_the_snapshots_topic_only_is_asked_for_not_read_as_empty(
    tmp_path: Path,
) -> None:
    from meter.store import RowsElsewhere
    from meter.stream.partition import ELSEWHERE

    log = Changelog()
    hp = recover(log, store_in(tmp_path))
    for n in range(5):
        event(hp, "acme", "2026-01", f"w{n}", RATES[1], 10)
    write(hp, log)
    close(hp, log, "2026-01")
    assert hp.save(log.fingerprint(hp.changelog_end), {"2026-01"}) == 1
    assert hp.store is not None
    # What a new host's store holds: everything but the pruned month's row, and where it is.
    cp = hp.store.checkpoint()
    assert cp is not None
    saved = hp.store.keys()
    rows = {k: list(hp.store.read(k)) for k in saved if k != "month:2026-01"}
    rows[ELSEWHERE] = [b'{"month:2026-01": [7, 8]}']
    fresh_store = store_in(tmp_path / "new-host")
    fresh_store.save(cp, rows)
    b = fresh(fresh_store)
    b.begin_recovery()
    b.restore(fresh_store, cp)
    assert b.elsewhere == {"month:2026-01": [7, 8]}
    with pytest.raises(RowsElsewhere) as caught:
        event(b, "acme", "2026-01", "late", RATES[2], 12)
    assert caught.value.rows == {"month:2026-01": [7, 8]}
    assert b.pruned == {"2026-01"} and len(b.ledger) == 0  # nothing was read as empty
    # Without a note of where it is, a missing row is lost state, never an empty month.
    b.elsewhere = {}
    with pytest.raises(LocalStateError, match="not in local state"):
        event(b, "acme", "2026-01", "late", RATES[2], 12)


def test_state_records_stay_under_a_mib_whatever_the_workload_ids(tmp_path: Path) -> None:
    """The rows a checkpoint writes go to the snapshots topic, where Apache Kafka refuses a
    record over ``max.message.bytes`` (1 MiB by default).  With the longest workload ids an
    event may carry (256 characters, here of 4-byte UTF-8), late events and a closed month,
    every record is cut at :data:`ROW_BYTES` at most, and the state reads back whole."""
    log = Changelog()
    store = store_in(tmp_path)
    hp = recover(log, store)
    wide = "\U0001d518" * 250  # 4 bytes each in UTF-8

    def wid(n: int) -> str:
        return f"{wide}{n:06d}"

    for n in range(2400):
        assert event(hp, f"t{n % 3}", "2026-01", wid(n), RATES[n % 3], 5)
    write(hp, log)
    close(hp, log, "2026-01")
    for n in range(2400, 3000):  # late: each carries its event id
        assert event(hp, f"t{n % 3}", "2026-01", wid(n), RATES[n % 3], 6)
    write(hp, log)
    hp.save(log.fingerprint(hp.changelog_end))
    rows = {k: list(store.read(k)) for k in store.keys()}  # noqa: SIM118
    sizes = [len(r) for row in rows.values() for r in row]
    assert max(sizes) <= ROW_BYTES < 1024 * 1024, max(sizes)
    assert sum(sizes) > 6 * ROW_BYTES  # the cap, not the entry count, cut them
    assert state(recover(log, store)) == state(hp)
