"""The embedded store for local state, measured: SQLite (meter's), LMDB and RocksDB side by side.

meter keeps a home partition's state in SQLite (:mod:`meter.store.sqlite`: one file per
partition, WAL, ``synchronous=NORMAL``, rows of ``(key, seq, crc, raw)`` and a checkpoint).
A month of 1 M workloads is ~200 records of ~190 KB (JSON entries of 5,000 workloads each);
a checkpoint rewrites the open month's records and the checkpoint in ONE atomic
transaction, and a restart reads every record of the unpruned rows back.  That is measured
here, on the same synthetic records, for each engine that is installed:

- ``save 1``: one atomic, durable save of ``--records`` records + the checkpoint into an
  empty store (durable as each engine's crash-safe mode makes it: SQLite WAL with
  ``synchronous=NORMAL`` as meter uses it and with ``FULL``; LMDB's default sync; RocksDB
  one ``WriteBatch`` written with ``sync=True``);
- ``save 2``: a later checkpoint that overwrites the same row (records whose bytes changed);
- ``read``: a restart: a new process opens the store, checks the checkpoint and reads every
  record back, each checked against its CRC-32 (files in the page cache, as after a worker
  restart; the JSON is not decoded, which costs the same for every engine);
- ``disk``: the store directory's allocated size after the two saves, while the store is
  open (what a running worker occupies), after it is closed, and after the restart;
- ``RSS``: how much the reading process's resident memory grows during the read (peak
  above the RSS before the store is opened), and the file-backed part of it at the end
  (an mmap's page-cache pages, which the kernel can take back).

Engines (rows), each in a fresh temporary directory and fresh processes, best of ``--runs``:

- ``sqlite-meter``: meter's own :class:`~meter.store.sqlite.SqliteStore` (WAL, NORMAL);
- ``sqlite-normal`` / ``sqlite-full``: the same layout through plain :mod:`sqlite3` with the
  checkpoint's sums computed in Python, as the two other engines do (WAL, NORMAL / FULL);
- ``lmdb``: the ``lmdb`` package (default ``sync=True, metasync=True``);
- ``rocksdb``: the ``rocksdict`` package (its default options, Snappy; a ``WriteBatch``
  with ``WriteOptions.sync = True``).

An engine whose package is missing prints "not installed".  LMDB and RocksDB are not
dependencies of meter: install them in a scratch venv and run from the repository::

    python3.11 -m venv /tmp/venv-store
    /tmp/venv-store/bin/pip install -e . lmdb rocksdict orjson
    /tmp/venv-store/bin/python -m bench.bench_store --runs 3
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

OUT = Path(__file__).parent / "out"
ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("sqlite-meter", "sqlite-normal", "sqlite-full", "lmdb", "rocksdb")
MODULE = {"lmdb": "lmdb", "rocksdb": "rocksdict"}
TOPIC = "meter.jobs.ledger.changelog"
ROW = "month:2026-10"
META = b"meta:checkpoint"
MB = 1_000_000

#: What the table cannot show, one line each: packaging (checked with ``pip download
#: --only-binary=:all:`` for CPython 3.11: lmdb 3.0.0, rocksdict 0.3.29) and crash safety as
#: each engine's documentation states it for the mode measured here.
NOTES = {
    "sqlite-meter": (
        "stdlib (no wheel, no compiler); WAL+NORMAL: atomic, survives a process crash; "
        "a power cut or OS crash may roll back the last commits (never tears one)"
    ),
    "sqlite-normal": "same engine and mode as sqlite-meter, plain sqlite3 (Python-side sums)",
    "sqlite-full": (
        "stdlib; WAL+FULL: the WAL is synced at every commit, so a commit also survives "
        "a power cut or OS crash (a 38 MB commit passes wal_autocheckpoint, 1000 pages, so "
        "NORMAL syncs WAL and file in that save too: the two cost about the same here)"
    ),
    "lmdb": (
        "wheel 0.56 MB (manylinux x86_64/aarch64, macOS, Windows; musllinux: only an old "
        "py3-none-any fallback); sdist builds with a C compiler; sync+metasync (default): "
        "data and meta page flushed at commit, durable; copy-on-write B+tree, no log to replay"
    ),
    "rocksdb": (
        "rocksdict wheel 4.2 MB (11 MB installed; manylinux, musllinux, macOS, Windows); "
        "no sdist on PyPI (a Rust + C++ build from source elsewhere); WriteBatch atomic, "
        "sync=True: WAL fdatasync'ed before the write returns, durable; the WAL is replayed "
        "at open after a kill (rocksdict flushes the memtable to a compressed SST at close)"
    ),
}


LEGEND = """\
save1/save2: the two atomic durable saves; read: a restart after a clean close (new process:
open, check the checkpoint, read and CRC-check every record); kill read: the same after the
saving process was SIGKILLed with the store open; live: the store's disk use after the two
saves, store open; closed: after a clean close; kill+rst: after the kill and the restart's
read; RSS: the reading process's peak RSS above its RSS before opening the store; file: the
file-backed (mmap, page cache) part of RSS at the end of the read; kill RSS: RSS for the kill
read.  Each column is the lowest of {runs} runs on its own; MB = 10^6 bytes."""


# ---------------------------------------------------------------- data


def make_records(n: int, ids: int, generation: int) -> list[bytes]:
    """``n`` records of ``ids`` entries each, ~38 B per entry as a month's final rows:
    ``[tenant, workload, rate, rate card]``.  Workload ids are those of a fleet (sequential);
    ``generation`` changes one entry in seven, so a later save writes different bytes."""
    out = []
    for r in range(n):
        base = r * ids
        entries = [
            [
                f"t{(k * 7919) % 5000:04d}",
                f"vm-{k:08d}",
                5 if (k + generation) % 7 else 0,
                "vcsp-2026",
            ]
            for k in range(base, base + ids)
        ]
        out.append(orjson.dumps({"v": 1, "final": "2026-10", "entries": entries}))
    return out


def checkpoint_doc(offset: int, sums: dict[str, tuple[int, int]]) -> bytes:
    """The checkpoint as meter writes it (offset, fingerprint, and each row's count and
    CRC sum), for the engines that do not go through :class:`SqliteStore`."""
    return orjson.dumps(
        {
            "format": 1,
            "offset": offset,
            "fingerprint": zlib.crc32(str(offset).encode()),
            "closed": [],
            "pruned": [],
            "rows": {k: list(v) for k, v in sums.items()},
        }
    )


def check_sums(doc: bytes, sums: dict[str, tuple[int, int]]) -> None:
    want = {k: tuple(v) for k, v in orjson.loads(doc)["rows"].items()}
    if want != sums:
        raise SystemExit(f"rows do not match the checkpoint: {sums} != {want}")


def checked(doc: bytes, records: Iterable[tuple[str, int, bytes]]) -> Iterator[bytes]:
    """Each ``(row, crc, raw)``'s raw bytes, its CRC checked as it is read, then the rows'
    counts and sums checked against the checkpoint ``doc`` (what meter's store does)."""
    sums: dict[str, tuple[int, int]] = {}
    for row, crc, raw in records:
        if zlib.crc32(raw) != crc:
            raise SystemExit(f"row {row} is corrupt")
        n, total = sums.get(row, (0, 0))
        sums[row] = (n + 1, total + crc)
        yield raw
    check_sums(doc, sums)


# ---------------------------------------------------------------- engines


class MeterSqlite:
    """meter's own store class, used as the worker uses it."""

    def __init__(self, directory: Path) -> None:
        from meter.store.sqlite import SqliteStore  # noqa: PLC0415 - bench child only

        self.part = SqliteStore(directory).partition(TOPIC, 0)
        self.part.checkpoint()  # opens the file (the worker's start does the same)

    def save(self, offset: int, records: list[bytes]) -> None:
        from meter.store import Checkpoint  # noqa: PLC0415

        cp = Checkpoint(offset=offset, fingerprint=zlib.crc32(str(offset).encode()))
        self.part.save(cp, {ROW: records})

    def read_all(self) -> Iterator[bytes]:
        if self.part.checkpoint() is None:
            raise SystemExit("no checkpoint")
        rows = self.part.keys()
        for key in rows:
            yield from self.part.read(key)

    def close(self) -> None:
        self.part.close()


class RawSqlite:
    """The same layout through plain sqlite3, ``synchronous`` as given."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
    CREATE TABLE IF NOT EXISTS records (
        key TEXT NOT NULL, seq INTEGER NOT NULL, crc INTEGER NOT NULL, raw BLOB NOT NULL,
        PRIMARY KEY (key, seq)
    );
    """

    def __init__(self, directory: Path, synchronous: str) -> None:
        self.db = sqlite3.connect(directory / f"{TOPIC}-0.sqlite", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        self.db.executescript(self.SCHEMA)

    def save(self, offset: int, records: list[bytes]) -> None:
        db = self.db
        crcs = [zlib.crc32(raw) for raw in records]
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM records WHERE key = ?", (ROW,))
        db.executemany(
            "INSERT INTO records (key, seq, crc, raw) VALUES (?, ?, ?, ?)",
            ((ROW, n, crc, raw) for n, (crc, raw) in enumerate(zip(crcs, records, strict=True))),
        )
        doc = checkpoint_doc(offset, {ROW: (len(crcs), sum(crcs))})
        db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('checkpoint', ?)", (doc,))
        db.execute("COMMIT")

    def read_all(self) -> Iterator[bytes]:
        (doc,) = self.db.execute("SELECT v FROM meta WHERE k = 'checkpoint'").fetchone()
        yield from checked(
            doc, self.db.execute("SELECT key, crc, raw FROM records ORDER BY key, seq")
        )

    def close(self) -> None:
        self.db.close()


def _kv_key(row: str, seq: int) -> bytes:
    return row.encode() + b"\x00" + seq.to_bytes(4, "big")


def _kv_row(key: bytes) -> str:
    return key[:-5].decode()


class Lmdb:
    """LMDB: one environment (directory) per partition, default durability."""

    def __init__(self, directory: Path) -> None:
        import lmdb  # noqa: PLC0415 - optional engine

        # map_size is address space, not disk: the file grows with the pages written.
        self.env = lmdb.open(str(directory), map_size=4 << 30, sync=True, metasync=True)

    def save(self, offset: int, records: list[bytes]) -> None:
        prefix = ROW.encode() + b"\x00"
        crcs = [zlib.crc32(raw) for raw in records]
        with self.env.begin(write=True) as txn:
            cur = txn.cursor()
            if cur.set_range(prefix):
                while cur.key().startswith(prefix) and cur.delete():
                    pass
            for n, (crc, raw) in enumerate(zip(crcs, records, strict=True)):
                txn.put(_kv_key(ROW, n), crc.to_bytes(4, "big") + raw)
            txn.put(META, checkpoint_doc(offset, {ROW: (len(crcs), sum(crcs))}))

    def read_all(self) -> Iterator[bytes]:
        # buffers=True: values are views of the map, copied once into bytes (as meter's
        # read yields bytes).
        with self.env.begin(buffers=True) as txn:
            records = (
                (_kv_row(bytes(key)), int.from_bytes(value[:4], "big"), bytes(value[4:]))
                for key, value in txn.cursor()
                if bytes(key) != META
            )
            yield from checked(bytes(txn.get(META)), records)

    def close(self) -> None:
        self.env.close()


class Rocks:
    """RocksDB through rocksdict, its default options (raw bytes keys and values)."""

    def __init__(self, directory: Path) -> None:
        import rocksdict  # noqa: PLC0415 - optional engine

        self.rd = rocksdict
        opts = rocksdict.Options(raw_mode=True)
        opts.create_if_missing(True)
        self.db = rocksdict.Rdict(str(directory), opts)
        self.wopt = rocksdict.WriteOptions()
        self.wopt.sync = True

    def save(self, offset: int, records: list[bytes]) -> None:
        prefix = ROW.encode() + b"\x00"
        crcs = [zlib.crc32(raw) for raw in records]
        batch = self.rd.WriteBatch(raw_mode=True)
        batch.delete_range(prefix, ROW.encode() + b"\x01")
        for n, (crc, raw) in enumerate(zip(crcs, records, strict=True)):
            batch.put(_kv_key(ROW, n), crc.to_bytes(4, "big") + raw)
        batch.put(META, checkpoint_doc(offset, {ROW: (len(crcs), sum(crcs))}))
        self.db.write(batch, self.wopt)

    def read_all(self) -> Iterator[bytes]:
        records = (
            (_kv_row(key), int.from_bytes(value[:4], "big"), value[4:])
            for key, value in self.db.items()
            if key != META
        )
        yield from checked(self.db[META], records)

    def close(self) -> None:
        self.db.close()


def open_engine(engine: str, directory: Path) -> Any:
    if engine == "sqlite-meter":
        return MeterSqlite(directory)
    if engine == "sqlite-normal":
        return RawSqlite(directory, "NORMAL")
    if engine == "sqlite-full":
        return RawSqlite(directory, "FULL")
    if engine == "lmdb":
        return Lmdb(directory)
    if engine == "rocksdb":
        return Rocks(directory)
    raise ValueError(engine)


def installed(engine: str) -> bool:
    module = MODULE.get(engine)
    return module is None or importlib.util.find_spec(module) is not None


def version(engine: str) -> str:
    if engine.startswith("sqlite"):
        return f"SQLite {sqlite3.sqlite_version}"
    name = MODULE[engine]
    try:
        return f"{name} {importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{name} -"


# ---------------------------------------------------------------- measuring (child processes)


def status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with Path("/proc/self/status").open() as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[name] = int(rest.split()[0]) * 1024
    return out


def disk_bytes(directory: Path) -> int:
    """Allocated size (``du``), so a sparse or preallocated file counts what it uses."""
    return sum(p.stat().st_blocks * 512 for p in directory.rglob("*") if p.is_file())


def child_save(engine: str, directory: Path, records: int, ids: int, kill: bool) -> dict[str, Any]:
    """Two saves; then the store is closed, or (``kill``) the process SIGKILLs itself with
    the store open, as a worker killed after a checkpoint."""
    first = make_records(records, ids, 0)
    second = make_records(records, ids, 1)
    store = open_engine(engine, directory)
    t0 = time.perf_counter()
    store.save(1_000, first)
    t1 = time.perf_counter()
    store.save(2_000, second)
    t2 = time.perf_counter()
    res = {
        "save1": t1 - t0,
        "save2": t2 - t1,
        "disk_live": disk_bytes(directory),
        "data": sum(map(len, second)),
    }
    if kill:
        print(json.dumps(res), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    store.close()
    return {**res, "disk_closed": disk_bytes(directory)}


def child_read(engine: str, directory: Path) -> dict[str, Any]:
    # The engine's import is not part of the read (nor of its RSS).
    importlib.import_module(MODULE.get(engine, "meter.store.sqlite"))
    before = status()
    with contextlib.suppress(OSError):
        # Reset VmHWM to the current RSS (Linux >= 4.0), so the peak is the read's own.
        Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    store = open_engine(engine, directory)
    n = size = 0
    for raw in store.read_all():
        n += 1
        size += len(raw)
    t1 = time.perf_counter()
    after = status()
    store.close()
    return {
        "read": t1 - t0,
        "records": n,
        "bytes": size,
        "rss_peak": after["VmHWM"] - before["VmRSS"],
        "rss_anon": after["RssAnon"] - before["RssAnon"],
        "rss_file": after["RssFile"] - before["RssFile"],
    }


def run_child(args: list[str], killed: bool = False) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_store", "--child", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != (-signal.SIGKILL if killed else 0):
        raise SystemExit(f"child {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the table


def fmt_row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )


def table(best: dict[str, dict[str, Any] | None], engines: list[str]) -> str:
    head = [
        "engine",
        "save1 s",
        "save2 s",
        "read s",
        "kill read s",
        "live MB",
        "closed MB",
        "kill+rst MB",
        "RSS +MB",
        "file MB",
        "kill RSS +MB",
    ]
    rows = [head]
    for e in engines:
        b = best[e]
        if b is None:
            rows.append([e])
            continue
        rows.append(
            [
                e,
                f"{b['save1']:.3f}",
                f"{b['save2']:.3f}",
                f"{b['read']:.3f}",
                f"{b['kill_read']:.3f}",
                f"{b['disk_live'] / MB:.1f}",
                f"{b['disk_closed'] / MB:.1f}",
                f"{b['kill_disk_restarted'] / MB:.1f}",
                f"{b['rss_peak'] / MB:.1f}",
                f"{b['rss_file'] / MB:.1f}",
                f"{b['kill_rss_peak'] / MB:.1f}",
            ]
        )
    widths = [max(len(r[i]) for r in rows if len(r) > i) for i in range(len(head))]
    lines = [
        fmt_row(r, widths) if len(r) > 1 else f"{r[0].ljust(widths[0])}  not installed"
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def filesystem(path: str) -> str:
    best = ("?", "?")
    with Path("/proc/mounts").open() as f:
        for line in f:
            dev, mnt, fstype, *_ = line.split()
            if path.startswith(mnt) and len(mnt) >= len(best[0]):
                best = (mnt, f"{fstype} on {dev}")
    return best[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--engine", action="append", choices=ENGINES, help="engines [all]")
    p.add_argument("--runs", type=int, default=3, help="runs per engine; the best is shown [3]")
    p.add_argument("--records", type=int, default=200, help="records per save [200]")
    p.add_argument("--ids", type=int, default=5_000, help="workloads per record [5000]")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where the runs go [/tmp]")
    p.add_argument("--out", default=str(OUT / "store.json"), help="every run, as JSON")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.child:
        kind, engine, directory = a.child[0], a.child[1], Path(a.child[2])
        if kind in ("save", "save-kill"):
            res = child_save(engine, directory, a.records, a.ids, kill=kind == "save-kill")
        else:
            res = child_read(engine, directory)
        print(json.dumps(res))
        return 0

    engines = a.engine or list(ENGINES)
    sample = make_records(1, a.ids, 0)[0]
    print(
        f"{a.records} records x {a.ids} workloads (~{len(sample) / 1000:.0f} KB each, "
        f"~{a.records * len(sample) / MB:.0f} MB a save), best of {a.runs} runs; "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{a.tmp}: {filesystem(a.tmp)}"
    )
    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
    for run in range(a.runs):
        for e in engines:  # engines interleaved, so a slow moment of the disk is shared
            if not installed(e):
                continue
            res: dict[str, Any] = {"run": run}
            for kill in (False, True):  # closed cleanly; killed with the store open
                directory = Path(tempfile.mkdtemp(prefix=f"bench-store-{e}-", dir=a.tmp))
                try:
                    saved = run_child(
                        ["save-kill" if kill else "save", e, str(directory), *_sizes(a)], kill
                    )
                    read = run_child(["read", e, str(directory), *_sizes(a)])
                    restarted = disk_bytes(directory)
                finally:
                    shutil.rmtree(directory, ignore_errors=True)
                if read["records"] != a.records or read["bytes"] != saved["data"]:
                    raise SystemExit(f"{e}: read {read['records']} records, {read['bytes']} B")
                got = {**saved, **read, "disk_restarted": restarted}
                res.update({f"kill_{k}": v for k, v in got.items()} if kill else got)
            runs[e].append(res)
            print(
                f"  run {run + 1} {e:<13} save {res['save1']:.3f} / {res['save2']:.3f} s, "
                f"read {res['read']:.3f} s, after a kill {res['kill_read']:.3f} s",
                file=sys.stderr,
                flush=True,
            )
    best: dict[str, dict[str, Any] | None] = {}
    for e in engines:
        got = runs[e]
        best[e] = {k: min(r[k] for r in got) for k in got[0]} if got else None
    print()
    print(table(best, engines))
    print()
    print(LEGEND.format(runs=a.runs))
    print()
    for e in engines:
        print(f"  {e} ({version(e) if installed(e) else 'not installed'}): {NOTES[e]}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"records": a.records, "ids": a.ids, "runs": runs, "best": best}, indent=2)
        + "\n"
    )
    return 0


def _sizes(a: argparse.Namespace) -> list[str]:
    return ["--records", str(a.records), "--ids", str(a.ids)]


if __name__ == "__main__":
    sys.exit(main())
