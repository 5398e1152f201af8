"""The service's sink for received instances: the spool file and its state row, made durable
together (the row carries the file's checksum when they were flushed at once), and a free-space
reading that is not taken for every instance."""

from __future__ import annotations

import sqlite3
import zlib
from contextlib import closing
from pathlib import Path

import pytest

from dicom_io.listener import ReceivedInstance
from plugin.retention import FreeSpaceWatermark, LowDiskSpaceError
from plugin.service import SpoolSink
from plugin.state import SqliteStateStore

VLP = "1.2.840.10008.5.1.4.1.1.77.1.4"
STUDY, SOP = "1.2.826.0.1.3680043.8.498.20", "1.2.826.0.1.3680043.8.498.21"


def _instance(data: bytes, association: str = "a1") -> ReceivedInstance:
    return ReceivedInstance(data, VLP, SOP, STUDY, "MODALITY", association)


def _crc(database: Path) -> int | None:
    """The checksum recorded with the instance's row."""
    with closing(sqlite3.connect(database)) as db:
        (crc,) = db.execute(
            "SELECT spool_crc32 FROM instances WHERE sop_instance_uid = ?", (SOP,)
        ).fetchone()
    return None if crc is None else int(crc)


def test_a_new_instance_is_recorded_with_its_files_checksum_and_a_resend_without(
    tmp_path: Path,
) -> None:
    database = tmp_path / "state.sqlite3"
    store = SqliteStateStore(database)
    sink = SpoolSink(tmp_path / "spool", store)
    sink.accept(_instance(b"DICM first"))
    path = tmp_path / "spool" / STUDY / f"{SOP}.dcm"
    assert path.read_bytes() == b"DICM first"
    assert _crc(database) == zlib.crc32(b"DICM first")
    sink.accept(_instance(b"DICM again", "a2"))  # re-sent: replaced after its row is updated
    assert path.read_bytes() == b"DICM again"
    assert _crc(database) is None  # whatever is at the path is whole
    assert [r.path for r in store.pending_instances(STUDY)] == [path]
    assert store.forget_unspooled_instances() == 0
    store.close()


class CountingWatermark(FreeSpaceWatermark):
    def __init__(self, folder: Path, min_free_bytes: int) -> None:
        super().__init__(folder, min_free_bytes)
        self.readings = 0
        self.full = False

    def shortfall(self) -> str | None:
        self.readings += 1
        return "full" if self.full else None


def test_free_space_is_read_again_after_a_while_or_a_share_of_the_watermark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqliteStateStore(tmp_path / "state.sqlite3")
    watermark = CountingWatermark(tmp_path, 16 * 1000)  # re-read after 1000 bytes at most
    sink = SpoolSink(tmp_path / "spool", store, watermark=watermark)
    now = [100.0]
    monkeypatch.setattr("plugin.service.time.monotonic", lambda: now[0])
    sink.accept(_instance(b"x" * 400))
    sink.accept(_instance(b"x" * 400))
    assert watermark.readings == 1  # the first reading is trusted for a little more data
    sink.accept(_instance(b"x" * 400))  # 1200 bytes since the reading: read again
    assert watermark.readings == 2
    now[0] += SpoolSink.SPACE_CHECK_SECONDS  # and after a while, whatever was taken
    sink.accept(_instance(b"x"))
    assert watermark.readings == 3
    watermark.full = True
    now[0] += SpoolSink.SPACE_CHECK_SECONDS
    for _ in range(2):  # below the watermark: every instance reads it, every one is refused
        with pytest.raises(LowDiskSpaceError):
            sink.accept(_instance(b"x"))
    assert watermark.readings == 5
    store.close()
