"""Snapshots on a compacted topic: the keys a snapshot writes never let compaction remove a
record of the last whole snapshot (even with a snapshot cut short after it) nor of the whole
snapshot before it, which a reader falls back to and ``--purge-changelog`` keeps the
changelog for.  No broker: a list plays the topic partition, compaction keeps each key's
newest record."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meter.store import Checkpoint
from meter.store.sqlite import SqliteStore
from meter.stream import snapshots


@dataclass
class Meta:
    offset: int


class Topic:
    """One partition: offset -> (key, value); ``stop_after`` sends, then every send fails."""

    def __init__(self) -> None:
        self.records: dict[int, tuple[bytes, bytes]] = {}
        self.end = 0
        self.stop_after: int | None = None

    async def send(self, topic: str, value: bytes, key: bytes, **_: Any) -> asyncio.Future[Meta]:
        if self.stop_after is not None:
            if self.stop_after == 0:
                raise ConnectionError("killed")
            self.stop_after -= 1
        self.records[self.end] = (key, value)
        self.end += 1
        done: asyncio.Future[Meta] = asyncio.get_running_loop().create_future()
        done.set_result(Meta(self.end - 1))
        return done

    async def send_and_wait(self, topic: str, value: bytes, key: bytes, **kw: Any) -> Meta:
        return await (await self.send(topic, value, key, **kw))

    def compact(self) -> None:
        newest = {key: o for o, (key, _) in sorted(self.records.items())}
        self.records = {o: r for o, r in self.records.items() if newest[r[0]] == o}


def readable(topic: Topic, snap: snapshots.Published) -> bool:
    return all(
        o in topic.records
        and topic.records[o][0] in (snapshots.row_key(k, n), snapshots.row_key(k, n, 1))
        for k, offs in snap.index.items()
        for n, o in enumerate(offs)
    )


def test_compaction_keeps_the_last_whole_snapshot_and_the_one_before_it(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path).partition("changelog", 0)
    topic = Topic()
    published = snapshots.Published({})
    history: list[snapshots.Published] = []

    async def snapshot(n: int, changed: set[str]) -> snapshots.Published:
        rows = {k: [f"{k}@{n}/{i}".encode() for i in range(3)] for k in changed}
        store.save(Checkpoint(offset=10 * n, fingerprint=n), rows)
        return await snapshots.publish(topic, "t", 0, store, changed, published)

    for n in range(1, 8):
        changed = {"firsts:2026-01", "month:2026-01"} if n % 2 else {"month:2026-01"}
        if n == 1:
            changed |= {"month:2025-12"}
        published = asyncio.run(snapshot(n, changed))
        history.append(published)
        topic.compact()
        assert readable(topic, published), n
        assert published.before is not None or n == 1
        if published.before is not None:
            assert published.before.at == history[-2].at
            assert readable(topic, published.before), n  # the fallback survives compaction
    # The checkpoint record carries the one before it, exactly.
    raw = topic.records[published.at][1]
    parsed = snapshots.parse_snapshot(raw, published.at)
    assert parsed is not None and parsed.before is not None
    assert parsed.before.index == history[-2].index
    assert parsed.before.checkpoint == history[-2].checkpoint

    # Killed half-way through the next snapshot: its rows are written, no checkpoint.
    topic.stop_after = 2
    with pytest.raises(ConnectionError):
        asyncio.run(snapshot(8, {"month:2026-01", "firsts:2026-01"}))
    topic.compact()
    assert readable(topic, published)  # the last whole one is untouched
