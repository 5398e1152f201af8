"""Durable spool writes: whole file or nothing, fsync'd file and directory, overwrite is safe;
with the caller's record flushed beside a new file, a checksum that tells a partial one."""

from __future__ import annotations

import os
import stat
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import JPEGBaseline8Bit

from dicom_io.spool import is_whole, write_bytes_durably, write_durably
from tests.conftest import SAMPLES


def test_bytes_are_written_whole_with_no_temp_left(tmp_path: Path) -> None:
    path = tmp_path / "1.2.3.dcm"
    write_bytes_durably(b"first", path)
    assert path.read_bytes() == b"first"
    write_bytes_durably(b"second, longer", path)  # same path again: replaced, not appended
    assert path.read_bytes() == b"second, longer"
    assert [p.name for p in tmp_path.iterdir()] == ["1.2.3.dcm"]


def test_file_and_directory_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    write_bytes_durably(b"data", tmp_path / "x.dcm")
    assert synced == ["file", "dir"]  # the data before the rename, the rename after it


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "x.dcm"
    write_bytes_durably(b"old", path)

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        write_bytes_durably(b"new", path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.dcm"]


def test_dataset_keeps_its_transfer_syntax_and_pixel_bytes(tmp_path: Path) -> None:
    source = pydicom.dcmread(SAMPLES / "dms_jpeg_baseline.dcm")
    path = tmp_path / "copy.dcm"
    write_durably(source, path)
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert back.SOPInstanceUID == source.SOPInstanceUID
    assert back.PixelData == source.PixelData


def test_dataset_without_transfer_syntax_is_refused(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3"
    with pytest.raises(ValueError, match=r"Transfer Syntax UID \(0002,0010\)"):
        write_durably(ds, tmp_path / "x.dcm")
    assert not list(tmp_path.iterdir())


def test_a_new_file_is_flushed_with_the_callers_record_and_its_checksum(tmp_path: Path) -> None:
    path = tmp_path / "study" / "1.2.3.dcm"
    seen: list[tuple[int | None, bytes, list[str]]] = []

    def record(checksum: int | None) -> None:  # runs while the file is flushed
        seen.append((checksum, path.read_bytes(), sorted(p.name for p in path.parent.iterdir())))

    write_bytes_durably(b"instance", path, make_parents=True, alongside=record)
    # the file had its final name and all its bytes before the record was made; no temp left
    assert seen == [(zlib.crc32(b"instance"), b"instance", ["1.2.3.dcm"])]
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert is_whole(path, zlib.crc32(b"instance"))


def test_a_file_that_replaces_another_is_recorded_before_the_rename(tmp_path: Path) -> None:
    path = tmp_path / "1.2.3.dcm"
    write_bytes_durably(b"first", path)
    seen: list[tuple[int | None, bytes]] = []
    write_bytes_durably(
        b"second", path, alongside=lambda checksum: seen.append((checksum, path.read_bytes()))
    )
    assert seen == [(None, b"first")]  # no checksum: whatever is at the path is whole
    assert path.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["1.2.3.dcm"]


def test_every_flush_is_done_when_the_write_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New folders' entries, the bytes and the file's entry are all fsync'd, beside the record."""
    synced: list[int] = []  # inode numbers
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.fstat(fd).st_ino)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    spool = tmp_path / "spool"
    path = spool / "study" / "1.2.3.dcm"
    write_bytes_durably(b"x", path, make_parents=True, alongside=lambda checksum: None)
    expected = [p.stat().st_ino for p in (tmp_path, spool, spool / "study", path)]
    assert sorted(synced) == sorted(expected)


def test_a_failing_record_is_raised_and_the_whole_file_stays(tmp_path: Path) -> None:
    path = tmp_path / "1.2.3.dcm"

    def failing(checksum: int | None) -> None:
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):
        write_bytes_durably(b"instance", path, alongside=failing)
    assert path.read_bytes() == b"instance"  # whole, never acknowledged: a re-send replaces it
    assert [p.name for p in tmp_path.iterdir()] == ["1.2.3.dcm"]


def test_is_whole_tells_a_partial_file_from_a_whole_one(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    assert not is_whole(path, None) and not is_whole(path, zlib.crc32(b"whole"))
    path.write_bytes(b"who")  # cut short by a power cut
    assert not is_whole(path, zlib.crc32(b"whole"))
    assert is_whole(path, None)
    path.write_bytes(b"whole")
    assert is_whole(path, zlib.crc32(b"whole"))
