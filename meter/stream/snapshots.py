"""Snapshots of local state on Kafka: what a worker on a new host reads instead of the whole
changelog.

After a checkpoint (at most every ``--snapshot-interval``), a worker copies the rows of its
local store that changed since its last snapshot to ``<jobs>.ledger.snapshots``, partition =
home partition, one Kafka record per stored record (keyed ``<row>/<n>``), then one record keyed
``checkpoint``: the checkpoint the rows belong to, and for every row of the store the offsets
of its records in this topic (rows unchanged since an earlier snapshot point at that one's).
Every row record carries, in the header ``meter.snapshot.previous``, the offset of the last
whole snapshot's checkpoint record, so a snapshot cut short by a crash leads back to the one
before it.

A worker that takes a partition with no local state reads the partition's last record, the
checkpoint it leads to, and exactly the records that checkpoint lists: bounded by the state,
not by history, on any broker — no scan, so no compaction is needed (the topic is created
compacted, so Apache Kafka drops superseded rows; the embedded broker keeps them, unread).
What it read becomes its local store, checked against the changelog like any other
(:meth:`Worker._restore_local`), and the changelog is replayed from the checkpoint's offset.

Each row's records alternate between two keys, ``<row>/<n>`` and ``<row>/<n>.1``: a row
written again goes to the other one, so Apache Kafka's compaction of the records a snapshot
writes never removes those of the whole snapshot before it (a snapshot cut short by a crash
cannot damage the last whole one), and every checkpoint record carries the checkpoint before
it (``previous``).  So the whole snapshot before the last one reads back too: where the last
one is refused (or behind a purged changelog), :func:`read` reads that one, and a worker that
purges its changelog (``--purge-changelog``) deletes records only below it.

The rows of months pruned from memory are history: a new host does not read them
(:func:`read` skips them), it notes where they are (``HomePartition.elsewhere``) and fetches
one (:func:`fetch`) only when a late event needs that month; its own snapshots keep pointing
at them.  So a new host reads this month's state, whatever the history.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from meter.store import Checkpoint, PartitionStore

log = logging.getLogger(__name__)

CHECKPOINT_KEY: Final = b"checkpoint"
H_PREVIOUS: Final = "meter.snapshot.previous"
FORMAT: Final = 1


@dataclass
class Published:
    """Where a home partition's last snapshot is."""

    #: row key -> offsets of its records in the snapshot topic
    index: dict[str, list[int]]
    #: offset of the last whole snapshot's checkpoint record (-1: none)
    at: int = -1
    #: rows whose records have the key ``<row>/<n>.1`` (slot 1); the others ``<row>/<n>``
    slots: dict[str, int] = field(default_factory=dict)
    #: the checkpoint that snapshot holds (None: not known here)
    checkpoint: Checkpoint | None = None
    #: the whole snapshot before it, as its checkpoint record carries it (None: none known)
    before: Published | None = None

    def behind(self) -> Published:
        """Where the snapshots are after this worker's state was rebuilt: no row is on the
        topic for it (every one is written again), but each row's slot still is (so the
        rewrite goes to the other one and leaves the last whole snapshot readable)."""
        return Published({}, slots=dict(self.slots))


def row_key(row: str, n: int, slot: int = 0) -> bytes:
    """The key of record ``n`` of ``row`` in ``slot`` (0 or 1)."""
    return f"{row}/{n}.1".encode() if slot else f"{row}/{n}".encode()


def _doc(cp: Checkpoint, index: dict[str, list[int]], slots: Mapping[str, int]) -> dict[str, Any]:
    return {
        "offset": cp.offset,
        "fingerprint": cp.fingerprint,
        "closed": list(cp.closed),
        "pruned": list(cp.pruned),
        "rows": index,
        "slots": {k: 1 for k, v in slots.items() if v and k in index},
    }


def checkpoint_doc(
    cp: Checkpoint,
    index: dict[str, list[int]],
    slots: Mapping[str, int] | None = None,
    before: Published | None = None,
) -> bytes:
    """A checkpoint record: ``cp``, where each row's records are, and the whole snapshot
    ``before`` it (its checkpoint record's offset and content) when known."""
    doc = {"format": FORMAT, **_doc(cp, index, slots or {})}
    if before is not None and before.checkpoint is not None and before.at >= 0:
        doc["previous"] = {"at": before.at, **_doc(before.checkpoint, before.index, before.slots)}
    return orjson.dumps(doc)


def _parse(doc: Any, at: int) -> Published:
    cp = Checkpoint(
        offset=int(doc["offset"]),
        fingerprint=int(doc["fingerprint"]),
        closed=tuple(str(m) for m in doc["closed"]),
        pruned=tuple(str(m) for m in doc["pruned"]),
    )
    index = {str(k): [int(o) for o in v] for k, v in doc["rows"].items()}
    slots = {str(k): 1 for k, v in (doc.get("slots") or {}).items() if v}
    return Published(index, at, slots, cp)


def parse_snapshot(raw: bytes, at: int) -> Published | None:
    """The snapshot whose checkpoint record ``raw`` is at offset ``at``, with the one
    before it where the record carries it; None when it is not a checkpoint record."""
    try:
        doc = orjson.loads(raw)
        if doc.get("format") != FORMAT:
            return None
        snap = _parse(doc, at)
        previous = doc.get("previous")
        if previous is not None:
            snap.before = _parse(previous, int(previous["at"]))
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        return None
    return snap


def parse_checkpoint(raw: bytes) -> tuple[Checkpoint, dict[str, list[int]]] | None:
    """The checkpoint and row index of a checkpoint record; None when it is not one."""
    snap = parse_snapshot(raw, -1)
    if snap is None or snap.checkpoint is None:
        return None
    return snap.checkpoint, snap.index


async def publish(
    producer: Any,
    topic: str,
    home: int,
    store: PartitionStore,
    keys: set[str],
    published: Published,
    elsewhere: Mapping[str, list[int]] | None = None,
    local: Collection[str] = (),
) -> Published:
    """Copy rows ``keys`` of ``store`` (those changed since the last snapshot) and a checkpoint
    record listing every row (the rows ``elsewhere``, on this topic only, where they are;
    rows ``local`` not at all); returns where the new snapshot is."""
    checkpoint = store.checkpoint()
    if checkpoint is None:
        return published
    present = set(store.keys()) - set(local)
    index = {k: v for k, v in published.index.items() if k in present}
    for k, v in (elsewhere or {}).items():
        if k not in present:
            index[k] = list(v)  # still where an earlier snapshot put it
    slots = dict(published.slots)
    previous = [(H_PREVIOUS, str(published.at).encode())]
    # Rows changed since the last snapshot, and any the index lacks (a restart or rebuild
    # starts with an empty index), each to the other slot than its last records'.
    for key in sorted((keys | (present - set(index))) & present):
        slot = 1 - slots.get(key, 0)
        futures = [
            await producer.send(
                topic, raw, key=row_key(key, n, slot), partition=home, headers=previous
            )
            for n, raw in enumerate(store.read(key))
        ]
        index[key] = [m.offset for m in await asyncio.gather(*futures)]
        slots[key] = slot
    slots = {k: v for k, v in slots.items() if k in index and v}
    # The whole snapshot this one follows: this worker's last, or (after a restart from
    # local state) the topic's last, as the worker noted it.
    before = published if published.at >= 0 and published.checkpoint is not None else None
    before = before or published.before
    meta = await producer.send_and_wait(
        topic, checkpoint_doc(checkpoint, index, slots, before), key=CHECKPOINT_KEY, partition=home
    )
    if before is not None:  # one generation back is all a checkpoint record carries
        before = Published(before.index, before.at, before.slots, before.checkpoint)
    return Published(index, meta.offset, slots, checkpoint, before)


async def _records_at(
    consumer: Any, tp: Any, offsets: list[int], timeout_s: float = 30.0
) -> dict[int, Any]:
    """The records at ``offsets`` of ``tp`` (those that exist), reading only around them."""
    wanted = sorted(set(offsets))
    want = set(wanted)
    got: dict[int, Any] = {}
    i = 0
    deadline = asyncio.get_running_loop().time() + timeout_s
    while i < len(wanted):
        hw = consumer.highwater(tp)
        if hw is not None and wanted[i] >= hw:
            return got  # past the end: not there (a seek there would start again at 0)
        consumer.seek(tp, wanted[i])
        while i < len(wanted):
            if asyncio.get_running_loop().time() > deadline:
                return got
            batch = await consumer.getmany(tp, timeout_ms=200, max_records=500)
            records = batch.get(tp, [])
            if not records:
                hw = consumer.highwater(tp)
                if hw is not None and wanted[i] >= hw:
                    return got  # past the end: not there
                continue
            for rec in records:
                if rec.offset in want:
                    got[rec.offset] = rec
            position = records[-1].offset + 1
            while i < len(wanted) and wanted[i] < position:
                i += 1
            if i < len(wanted) and wanted[i] - position > 500:
                break  # a gap: seek over it
    return got


def _previous(rec: Any) -> int:
    """The offset of the whole snapshot's checkpoint a row record leads back to; -1 when its
    header is missing or is not an offset (a record of another writer or version)."""
    for name, value in rec.headers or ():
        if name == H_PREVIOUS:
            try:
                return int(value)
            except (TypeError, ValueError):
                return -1
    return -1


def _unusable(home: int, why: str) -> None:
    log.warning("snapshot of home partition %d unusable: %s", home, why)


async def _last_whole(consumer: Any, tp: Any, home: int) -> Published | None:
    """The last whole snapshot's checkpoint record of ``tp``, parsed (rows not read)."""
    consumer.seek(tp, 0)
    hw = None
    for _ in range(50):
        await consumer.getmany(tp, timeout_ms=200, max_records=1)
        hw = consumer.highwater(tp)
        if hw is not None:
            break
    if not hw:
        return None
    last = (await _records_at(consumer, tp, [hw - 1])).get(hw - 1)
    if last is None:
        return None
    if last.key != CHECKPOINT_KEY:
        at = _previous(last)
        if at < 0:
            _unusable(home, f"its last record (@{last.offset}) leads to no checkpoint")
            return None
        last = (await _records_at(consumer, tp, [at])).get(at)
        if last is None or last.key != CHECKPOINT_KEY:
            _unusable(home, f"the checkpoint it was cut short after (@{at}) is not there")
            return None
    snap = parse_snapshot(last.value or b"", last.offset)
    if snap is None:
        _unusable(home, f"its checkpoint record (@{last.offset}) does not parse")
    return snap


async def last_whole(consumer: Any, topic: str, home: int) -> Published | None:
    """Where ``home``'s last whole snapshot is (index, slots and the one before it; no rows
    read): what a worker that restarts from its own local state writes its next one after."""
    from aiokafka import TopicPartition  # noqa: PLC0415 - the adapter's own dependency

    tp = TopicPartition(topic, home)
    consumer.assign([tp])
    try:
        return await _last_whole(consumer, tp, home)
    finally:
        consumer.assign([])


async def read(
    consumer: Any,
    topic: str,
    home: int,
    refused: Collection[int] = (),
    at_least: int = 0,
) -> tuple[Checkpoint, dict[str, list[bytes]], Published] | None:
    """The last whole snapshot of ``home``: its checkpoint and rows; None when there is none
    (the caller replays the changelog instead).  Where its checkpoint record's offset is in
    ``refused``, its state is behind changelog offset ``at_least`` (the changelog's start),
    or a record it lists is gone, the whole snapshot before it (which that record carries)
    is read instead."""
    from aiokafka import TopicPartition  # noqa: PLC0415 - the adapter's own dependency

    tp = TopicPartition(topic, home)
    consumer.assign([tp])
    try:
        last = await _last_whole(consumer, tp, home)
        snap = last
        while snap is not None:
            assert snap.checkpoint is not None
            checkpoint, before = snap.checkpoint, snap.before
            if snap.at in refused:
                _unusable(home, f"the snapshot at offset {snap.at} failed before")
            elif checkpoint.offset < at_least:
                _unusable(
                    home,
                    f"the snapshot at offset {snap.at} holds the state at changelog offset "
                    f"{checkpoint.offset}, before the changelog's start {at_least}",
                )
            else:
                history = {f"month:{m}" for m in checkpoint.pruned}
                wanted = {k: v for k, v in snap.index.items() if k not in history}
                rows = await _rows(consumer, tp, home, wanted)
                if rows is not None:
                    if snap is not last:
                        log.warning(
                            "home partition %d: reading the whole snapshot before the last "
                            "one (its checkpoint record at offset %d)",
                            home,
                            snap.at,
                        )
                    snap.before = None
                    return checkpoint, rows, snap
            snap = before
        return None
    finally:
        consumer.assign([])


async def fetch(
    consumer: Any, topic: str, home: int, wanted: dict[str, list[int]]
) -> dict[str, list[bytes]] | None:
    """Rows ``wanted`` (key -> offsets) of ``home``'s snapshots; None when one is gone."""
    from aiokafka import TopicPartition  # noqa: PLC0415 - the adapter's own dependency

    tp = TopicPartition(topic, home)
    consumer.assign([tp])
    try:
        return await _rows(consumer, tp, home, wanted)
    finally:
        consumer.assign([])


async def _rows(
    consumer: Any, tp: Any, home: int, wanted: dict[str, list[int]]
) -> dict[str, list[bytes]] | None:
    records = await _records_at(consumer, tp, [o for offs in wanted.values() for o in offs])
    rows: dict[str, list[bytes]] = {}
    for key, offsets in wanted.items():
        if any(
            o not in records or records[o].key not in (row_key(key, n), row_key(key, n, 1))
            for n, o in enumerate(offsets)
        ):
            log.warning(
                "snapshot of home partition %d lacks records of row %s (offsets %s)",
                home,
                key,
                offsets,
            )
            return None
        rows[key] = [records[o].value or b"" for o in offsets]
    return rows
