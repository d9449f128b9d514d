"""Local state in SQLite (standard library): one file per changelog partition.

Why SQLite: it ships with Python (no native dependency to build on a provider's host), a
transaction is atomic and durable across a SIGKILL at any instruction (write-ahead log),
and a partition's state is a few keyed rows of blobs, read once at start and by key when a
late event reaches a pruned month: no range scans or merges that would call for RocksDB or
LMDB.  Every record carries its CRC-32, checked when it is read, and the checkpoint's row
checksums are checked at start, so a torn or edited file is found and rebuilt, never used.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sqlite3
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import orjson

from meter.store import Checkpoint, StateNotWritable, StoreError

log = logging.getLogger(__name__)

#: Bump when the layout changes: an older or newer file is rebuilt, not misread.
FORMAT: Final = 1

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    key TEXT NOT NULL, seq INTEGER NOT NULL, crc INTEGER NOT NULL, raw BLOB NOT NULL,
    PRIMARY KEY (key, seq)
);
"""


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


#: errno values that say "not writable here" (permissions, a read-only mount).
_NOT_WRITABLE: Final = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})

#: SQLite's own "cannot open / cannot write" results: checked against the file system
#: before the file is called anything but unwritable.
_CANNOT_WRITE: Final = frozenset({"SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH"})


def _cannot_write(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "")
    return name.startswith("SQLITE_READONLY") or name in _CANNOT_WRITE


def _fix(what: str) -> str:
    return (
        f"{what}; make it writable by the user meter runs as (or point --state-dir at a "
        "writable directory) and restart. Nothing was removed: the saved state may be good"
    )


def check_writable(directory: Path, file: Path | None = None) -> None:
    """Raise :class:`StateNotWritable` naming the path unless a file can be created in
    ``directory`` (SQLite creates its ``-wal`` and ``-shm`` files there) and ``file``, if
    it exists, can be opened for writing.  Writes nothing to ``file``."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".meter-write-check-")
        os.close(fd)
        Path(probe).unlink()
    except OSError as exc:
        if exc.errno in _NOT_WRITABLE:
            raise StateNotWritable(
                _fix(f"the state directory {directory} is not writable ({exc.strerror})")
            ) from exc
        raise StoreError(f"cannot write in the state directory {directory}: {exc}") from exc
    if file is None:
        return
    try:
        with file.open("r+b"):
            pass
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno in _NOT_WRITABLE:
            raise StateNotWritable(
                _fix(f"the state file {file} is not writable ({exc.strerror})")
            ) from exc
        raise StoreError(f"cannot open the state file {file}: {exc}") from exc


class SqliteStore:
    """The state directory of one worker: ``DIR/<changelog topic>-<partition>.sqlite``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno in _NOT_WRITABLE:
                raise StateNotWritable(
                    _fix(f"cannot create the state directory {self.directory} ({exc.strerror})")
                ) from exc
            raise StoreError(f"cannot create the state directory {self.directory}: {exc}") from exc
        # At start, not at the first checkpoint minutes later: a read-only volume is a
        # setting to fix, and says so, never "a corrupt file".
        check_writable(self.directory)

    def path(self, topic: str, number: int) -> Path:
        return self.directory / f"{_safe(topic)}-{number}.sqlite"

    def partition(self, topic: str, number: int) -> SqlitePartition:
        return SqlitePartition(self.path(topic, number))


class SqlitePartition:
    """One home partition's saved state."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"SqlitePartition({str(self.path)!r})"

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            # Unwritable is not corrupt: say so, with the path, before SQLite fails on it.
            check_writable(self.path.parent, self.path)
            try:
                # One caller at a time (the worker's lock), from whichever thread it runs in.
                db = sqlite3.connect(
                    self.path, isolation_level=None, timeout=30.0, check_same_thread=False
                )
                db.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode: a committed transaction survives a crash of the
                # process; a power cut may lose the last ones (the changelog still has
                # them), never tear one.
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
            except sqlite3.Error as exc:
                if _cannot_write(exc):
                    check_writable(self.path.parent, self.path)  # names the path if it is that
                    raise StoreError(f"{self.path}: cannot open the state file ({exc})") from exc
                raise StoreError(f"{self.path}: not a usable state file ({exc})") from exc
            self._db = db
        return self._db

    def checkpoint(self) -> Checkpoint | None:
        try:
            db = self._conn()
            meta = dict(db.execute("SELECT k, v FROM meta").fetchall())
            if "checkpoint" not in meta:
                return None
            doc = orjson.loads(meta["checkpoint"])
            sums = {
                key: (n, total)
                for key, n, total in db.execute(
                    "SELECT key, count(*), sum(crc) FROM records GROUP BY key"
                )
            }
        except (sqlite3.Error, orjson.JSONDecodeError) as exc:
            raise StoreError(f"{self.path}: unreadable checkpoint ({exc})") from exc
        return self._verified(doc, sums)

    def _verified(self, doc: object, sums: dict[str, tuple[int, int]]) -> Checkpoint:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            got = doc.get("format") if isinstance(doc, dict) else doc
            raise StoreError(f"{self.path}: state format {got!r:.40}, not {FORMAT}")
        try:
            want = {str(k): (int(v[0]), int(v[1])) for k, v in doc["rows"].items()}
            checkpoint = Checkpoint(
                offset=int(doc["offset"]),
                fingerprint=int(doc["fingerprint"]),
                closed=tuple(str(m) for m in doc["closed"]),
                pruned=tuple(str(m) for m in doc["pruned"]),
            )
        except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
            raise StoreError(f"{self.path}: unreadable checkpoint ({exc!r:.80})") from exc
        if sums != want:
            raise StoreError(f"{self.path}: rows do not match the checkpoint")
        return checkpoint

    def keys(self) -> list[str]:
        try:
            return [k for (k,) in self._conn().execute("SELECT DISTINCT key FROM records")]
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def read(self, key: str) -> Iterator[bytes]:
        """The records of one row, each checked as it is read (a row of a month with a
        million workloads is tens of MB: it is never all in memory at once)."""
        try:
            rows = self._conn().execute(
                "SELECT crc, raw FROM records WHERE key = ? ORDER BY seq", (key,)
            )
            for crc, raw in rows:
                if zlib.crc32(raw) != crc:
                    raise StoreError(f"{self.path}: row {key!r} is corrupt (checksum)")
                yield bytes(raw)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot read row {key!r} ({exc})") from exc

    def save(self, checkpoint: Checkpoint, rows: Mapping[str, Iterable[bytes]]) -> None:
        try:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                for key, records in rows.items():
                    db.execute("DELETE FROM records WHERE key = ?", (key,))
                    db.executemany(
                        "INSERT INTO records (key, seq, crc, raw) VALUES (?, ?, ?, ?)",
                        ((key, n, zlib.crc32(raw), raw) for n, raw in enumerate(records)),
                    )
                sums = {
                    key: [n, total]
                    for key, n, total in db.execute(
                        "SELECT key, count(*), sum(crc) FROM records GROUP BY key"
                    )
                }
                doc = {
                    "format": FORMAT,
                    "offset": checkpoint.offset,
                    "fingerprint": checkpoint.fingerprint,
                    "closed": sorted(checkpoint.closed),
                    "pruned": sorted(checkpoint.pruned),
                    "rows": sums,
                }
                db.execute(
                    "INSERT OR REPLACE INTO meta (k, v) VALUES ('checkpoint', ?)",
                    (orjson.dumps(doc),),
                )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            # Move the write-ahead log into the file and empty it: else it keeps a second
            # copy of the last save (38 MB for a month of 1 M workloads) while the store is
            # open.  A checkpoint is crash-safe; it only copies what is committed.
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            if _cannot_write(exc):
                check_writable(self.path.parent, self.path)  # names the path if it is that
            raise StoreError(f"{self.path}: cannot save state ({exc})") from exc

    def clear(self) -> None:
        """Move the file (and its ``-wal`` and ``-shm``) aside to ``<file>.aside-<UTC
        time>``, never delete it: the state is rebuilt from the changelog, and the old file
        stays for a person to look at (or remove).  Raises :class:`StateNotWritable` when
        the directory does not allow it."""
        self.close()
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        aside = Path(f"{self.path}.aside-{stamp}")
        moved = []
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self.path}{suffix}")
            if not source.exists():
                continue
            try:
                source.rename(f"{aside}{suffix}")
            except OSError as exc:
                if exc.errno in _NOT_WRITABLE:
                    raise StateNotWritable(
                        _fix(f"cannot move {source} aside: the state directory is not "
                             f"writable ({exc.strerror})")
                    ) from exc  # fmt: skip
                raise StoreError(f"cannot move {source} aside: {exc}") from exc
            moved.append(source.name)
        if moved:
            log.warning(
                "%s moved aside to %s (not deleted; remove it when it is no longer needed)",
                self.path,
                aside,
            )

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
