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

The rows of months pruned from memory are history: a new host does not read them
(:func:`read` skips them), it notes where they are (``HomePartition.elsewhere``) and fetches
one (:func:`fetch`) only when a late event needs that month; its own snapshots keep pointing
at them.  So a new host reads this month's state, whatever the history.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
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


def checkpoint_doc(cp: Checkpoint, index: dict[str, list[int]]) -> bytes:
    return orjson.dumps(
        {
            "format": FORMAT,
            "offset": cp.offset,
            "fingerprint": cp.fingerprint,
            "closed": list(cp.closed),
            "pruned": list(cp.pruned),
            "rows": index,
        }
    )


def parse_checkpoint(raw: bytes) -> tuple[Checkpoint, dict[str, list[int]]] | None:
    """The checkpoint and row index of a checkpoint record; None when it is not one."""
    try:
        doc = orjson.loads(raw)
        if doc.get("format") != FORMAT:
            return None
        cp = Checkpoint(
            offset=int(doc["offset"]),
            fingerprint=int(doc["fingerprint"]),
            closed=tuple(str(m) for m in doc["closed"]),
            pruned=tuple(str(m) for m in doc["pruned"]),
        )
        index = {str(k): [int(o) for o in v] for k, v in doc["rows"].items()}
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        return None
    return cp, index


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
    previous = [(H_PREVIOUS, str(published.at).encode())]
    # Rows changed since the last snapshot, and any the index lacks (a restart or rebuild
    # starts with an empty index).
    for key in sorted((keys | (present - set(index))) & present):
        futures = [
            await producer.send(
                topic, raw, key=f"{key}/{n}".encode(), partition=home, headers=previous
            )
            for n, raw in enumerate(store.read(key))
        ]
        index[key] = [m.offset for m in await asyncio.gather(*futures)]
    meta = await producer.send_and_wait(
        topic, checkpoint_doc(checkpoint, index), key=CHECKPOINT_KEY, partition=home
    )
    return Published(index, meta.offset)


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
    log.warning("snapshot of home partition %d unusable: %s; replaying the changelog", home, why)


async def read(
    consumer: Any, topic: str, home: int
) -> tuple[Checkpoint, dict[str, list[bytes]], Published] | None:
    """The last whole snapshot of ``home``: its checkpoint and rows; None when there is none
    (or a record it lists is gone: the caller replays the changelog instead)."""
    from aiokafka import TopicPartition  # noqa: PLC0415 - the adapter's own dependency

    tp = TopicPartition(topic, home)
    consumer.assign([tp])
    try:
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
        parsed = parse_checkpoint(last.value or b"")
        if parsed is None:
            _unusable(home, f"its checkpoint record (@{last.offset}) does not parse")
            return None
        checkpoint, index = parsed
        history = {f"month:{m}" for m in checkpoint.pruned}
        wanted = {k: v for k, v in index.items() if k not in history}
        rows = await _rows(consumer, tp, home, wanted)
        if rows is None:
            return None
        return checkpoint, rows, Published(index, last.offset)
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
            o not in records or records[o].key != f"{key}/{n}".encode()
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
