"""A read-only ``--state-dir`` (issue 19): said as such, with the path; good state is never
deleted, and only state found damaged is moved aside (renamed, not removed).

Before: a valid file in a read-only directory was "not a usable state file", and the worker
tried to delete it before halting with "remove the partition's file".

The directory is made read-only for real: ``chmod`` when not root; as root (CI), where
``chmod`` does not stop writes, a read-only bind mount of it (skipped, with the reason, only
where mounting is not permitted).  The cases about never deleting run everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from meter.cli import main
from meter.store import Checkpoint, StateNotWritable, StoreError
from meter.store.sqlite import SqlitePartition, SqliteStore
from meter.stream.worker import Worker

TOPIC = "meter.jobs.ledger.changelog"


def saved(directory: Path) -> Path:
    """A valid state file of home partition 0 in ``directory``; its path."""
    part = SqliteStore(directory).partition(TOPIC, 0)
    part.save(Checkpoint(offset=3, fingerprint=7), {"month:2026-01": [b"a", b"b"]})
    part.close()
    return part.path


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[Path]:
    """``directory``, read-only for this process: the path to use while in the block."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield directory
        finally:
            directory.chmod(0o755)
        return
    view = directory.with_name(directory.name + "-ro")
    view.mkdir()
    mount = shutil.which("mount")
    steps = [["--bind", str(directory), str(view)], ["-o", "remount,bind,ro", str(view)]]
    done = 0
    try:
        for step in steps:
            if mount is None:
                break
            if subprocess.run([mount, *step], capture_output=True, check=False).returncode:
                break
            done += 1
        if done < len(steps):
            pytest.skip(
                "running as root, where chmod does not stop writes, and a read-only bind "
                "mount is not permitted here: the read-only directory cannot be made"
            )
        yield view
    finally:
        if done and mount is not None:
            subprocess.run(["umount", str(view)], check=False)


def test_a_read_only_state_directory_is_said_with_its_path_at_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = saved(state)
    before = path.read_bytes()
    with read_only(state) as ro, pytest.raises(StateNotWritable, match=f"{ro} is not writable"):
        SqliteStore(ro)
    assert path.read_bytes() == before


def test_a_valid_file_in_a_read_only_directory_is_neither_unusable_nor_removed(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    path = saved(state)
    before = path.read_bytes()
    with read_only(state) as ro:
        part = SqlitePartition(ro / path.name)
        with pytest.raises(StateNotWritable) as caught:
            part.checkpoint()
        message = str(caught.value)
        assert f"{ro} is not writable" in message
        assert "not a usable state file" not in message
        assert "Nothing was removed" in message
        with pytest.raises(StateNotWritable, match="cannot move"):
            part.clear()  # a rebuild could not even move it aside: and it says so
    assert path.read_bytes() == before
    assert sorted(p.name for p in state.iterdir()) == [path.name]
    assert SqlitePartition(path).checkpoint() == Checkpoint(offset=3, fingerprint=7)


def test_the_worker_does_not_touch_state_it_cannot_write(tmp_path: Path) -> None:
    """The worker's restore from local state: the error goes up (the worker halts with it),
    the file is not cleared."""
    state = tmp_path / "state"
    path = saved(state)
    before = path.read_bytes()
    with read_only(state) as ro:
        hp = SimpleNamespace(store=SqlitePartition(ro / path.name), number=0)
        with pytest.raises(StateNotWritable, match="not writable"):
            asyncio.run(Worker._restore_local_once(SimpleNamespace(), hp, 0))  # type: ignore[arg-type]
    assert path.read_bytes() == before


def test_meter_worker_with_a_read_only_state_dir_stops_with_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = saved(state)
    before = path.read_bytes()
    err = io.StringIO()
    with read_only(state) as ro, contextlib.redirect_stderr(err):
        rc = main(
            ["worker", "--broker", "127.0.0.1:9", "--state-dir", str(ro),
             "--http-port", "-1"]
        )  # fmt: skip
    assert rc == 2
    assert f"the state directory {ro} is not writable" in err.getvalue()
    assert path.read_bytes() == before


def test_a_read_only_state_file_is_said_with_its_path(tmp_path: Path) -> None:
    """Mode 0444, and (for root, whom a mode does not stop) on a read-only mount: the
    message names the file or its directory, whichever refused."""
    file = saved(tmp_path)
    file.chmod(0o444)
    with read_only(tmp_path) as ro:
        path = ro / file.relative_to(tmp_path)
        with pytest.raises(StateNotWritable, match=f"{ro}[^ ]* is not writable"):
            SqlitePartition(path).checkpoint()
        assert path.exists()


def test_a_damaged_file_is_moved_aside_never_deleted(tmp_path: Path) -> None:
    """Root or not: the only state ever put out of the way is a file found damaged, and it
    is renamed (with its -wal), its bytes kept."""
    path = saved(tmp_path)
    path.write_bytes(b"this is not SQLite" * 100)
    part = SqlitePartition(path)
    with pytest.raises(StoreError, match="not a usable state file"):
        part.checkpoint()
    part.clear()
    assert not path.exists()
    (aside,) = tmp_path.glob(f"{path.name}.aside-*")
    assert aside.read_bytes() == b"this is not SQLite" * 100
    assert SqlitePartition(path).checkpoint() is None  # a new, empty store in its place
