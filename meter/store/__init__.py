"""Local state of home partitions, on disk: where a worker's ledger is up to, kept so that
a restart reads its state from here plus only the changelog written since.

The core of a checkpoint is a position: every changelog record below ``offset`` is joined
into the rows saved with it, and ``fingerprint`` (a CRC-32 of the record at ``offset - 1``)
ties the rows to *this* changelog, so a store from another cluster or a recreated topic is
never trusted.  Rows are keyed (``month:2026-10``, ``firsts:2026-10``) and hold records in
the changelog's own format, so loading them is replaying them: a join, like the changelog.

A store is an adapter with a small interface (:class:`PartitionStore`); :mod:`.sqlite`
implements it with the standard library's SQLite, one file per home partition.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from meter.errors import MeterError


class StoreError(MeterError, OSError):
    """Local state that cannot be read or written as it should (a corrupt or foreign
    file, a full disk).  At start it means: rebuild from the changelog."""


class StateNotWritable(StoreError):
    """The state directory or a state file cannot be written (its permissions, a read-only
    mount): a setting for a person to fix, not damaged state.  Nothing is removed or moved
    aside for it: the saved state may be good.  The message names the path."""


class LocalStateError(StoreError):
    """A home partition's local state failed while the worker ran (a row that no longer
    reads back as saved): the partition is rebuilt from the changelog."""

    def __init__(self, partition: int, why: str) -> None:
        super().__init__(f"local state of home partition {partition}: {why}")
        self.partition = partition


class RowsElsewhere(LocalStateError):
    """Pruned months' rows a worker on a new host left on the snapshots topic (history it
    did not read): fetch ``rows`` (key -> offsets there) into the local store and try again.
    Where it is not caught, it is a :class:`LocalStateError`: a rebuild, still exact."""

    def __init__(self, partition: int, rows: dict[str, list[int]]) -> None:
        super().__init__(partition, f"rows {sorted(rows)} are on the snapshots topic only")
        self.rows = rows


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where saved state is up to."""

    #: Every changelog record below this offset is joined into the saved rows.
    offset: int
    #: CRC-32 of the changelog record at ``offset - 1`` (0 when ``offset`` is 0).
    fingerprint: int
    #: Closed months (the partition's close markers), and those of them whose rows are
    #: not loaded at start (pruned from memory; read back when a late event needs them).
    closed: tuple[str, ...] = ()
    pruned: tuple[str, ...] = ()


class PartitionStore(Protocol):
    def checkpoint(self) -> Checkpoint | None:
        """The saved checkpoint, verified (every row's checksum); ``None`` when there is
        none.  Raises :class:`StoreError` when the store is corrupt."""

    def keys(self) -> list[str]: ...

    def read(self, key: str) -> Iterator[bytes]:
        """The records of one row, each checked as it is read; raises :class:`StoreError`
        when one is not what was written."""

    def save(self, checkpoint: Checkpoint, rows: Mapping[str, Iterable[bytes]]) -> None:
        """Replace ``rows`` and the checkpoint in one atomic step (a crash leaves the old
        checkpoint or the new one, never a mix)."""

    def clear(self) -> None:
        """Forget everything (before a rebuild from the changelog): the saved state is
        moved aside, never deleted (it may be evidence, or good).  Raises
        :class:`StateNotWritable` when it cannot be moved."""

    def close(self) -> None: ...


class StateStore(Protocol):
    def partition(self, topic: str, number: int) -> PartitionStore: ...
