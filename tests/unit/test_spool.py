"""Durable spool writes: whole file or nothing, fsync'd file and directory, overwrite is safe."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import JPEGBaseline8Bit

from dicom_io.spool import write_bytes_durably, write_durably
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
