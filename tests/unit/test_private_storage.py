"""Spool, outbox and state database hold patient data: owner-only whatever the umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_io.listener import ReceivedInstance
from dicom_io.spool import private_directory, write_bytes_durably
from plugin.service import SpoolSink
from plugin.state import SqliteStateStore

STUDY, SOP = "1.2.826.0.1.3680043.8.498.10", "1.2.826.0.1.3680043.8.498.11"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """umask 000: anything not given its mode explicitly comes out world-writable."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("permissive_umask")
def test_spool_and_state_database_are_owner_only(tmp_path: Path) -> None:
    storage = tmp_path / "var"
    store = SqliteStateStore(storage / "state.sqlite3")
    sink = SpoolSink(storage / "spool", store)
    sink.accept(
        ReceivedInstance(b"DICM", "1.2.840.10008.5.1.4.1.1.77.1.7", SOP, STUDY, "MOD", "a1")
    )
    database = storage / "state.sqlite3"
    sidecars = [database.with_name(database.name + s) for s in ("-wal", "-shm")]
    assert all(p.exists() for p in sidecars)  # WAL mode, with rows written
    for path in (database, *sidecars, storage / "spool" / STUDY / f"{SOP}.dcm"):
        assert _mode(path) == 0o600, path
    for folder in (storage, storage / "spool", storage / "spool" / STUDY):
        assert _mode(folder) == 0o700, folder
    store.close()


@pytest.mark.usefixtures("permissive_umask")
def test_files_are_0600_and_new_folders_0700_under_any_umask(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    private_directory(shared / "a" / "b")
    assert (_mode(shared / "a"), _mode(shared / "a" / "b")) == (0o700, 0o700)
    assert _mode(shared) == 0o755  # a folder that was there is not ours to change
    write_bytes_durably(b"x", shared / "a" / "b" / "f")
    assert _mode(shared / "a" / "b" / "f") == 0o600


def test_an_older_release_s_world_readable_files_are_tightened(tmp_path: Path) -> None:
    database = tmp_path / "state.sqlite3"
    SqliteStateStore(database).close()
    database.chmod(0o644)
    folder = tmp_path / "outbox"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    SqliteStateStore(database).close()
    private_directory(folder, tighten=True)
    assert (_mode(database), _mode(folder)) == (0o600, 0o700)
