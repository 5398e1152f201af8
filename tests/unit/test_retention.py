"""Disk and retention: which studies retention may delete (only those that owe nothing), what it
deletes (spool and delivered report files, then rows), and the free-space watermark that turns
a nearly full disk into a refusal instead of a half-taken instance."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from dicom_io.status import StoreStatus, status_for
from plugin.retention import MIB, FreeSpaceWatermark, LowDiskSpaceError, Retention
from plugin.state import InstanceRow, OutboxItem, SqliteStateStore

DAY = 86400.0
VLP = "1.2.840.10008.5.1.4.1.1.77.1.4"


@pytest.fixture
def store(tmp_path: Path) -> SqliteStateStore:
    return SqliteStateStore(tmp_path / "state.sqlite3")


def _received(store: SqliteStateStore, spool: Path, study: str, sop: str, at: float) -> Path:
    path = spool / study / f"{sop}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"DICM")
    store.record_instance(InstanceRow(sop, study, VLP, path), f"assoc-{sop}", at)
    store.close_association(f"assoc-{sop}", at)
    return path


def _reports(outbox: Path, sr_uid: str) -> list[Path]:
    outbox.mkdir(parents=True, exist_ok=True)
    files = [outbox / f"{sr_uid}{suffix}" for suffix in (".dcm", ".json", "_saliency.png")]
    for f in files:
        f.write_bytes(b"report")
    return files


def _scored(
    store: SqliteStateStore, outbox: Path, study: str, sop: str, sr_uid: str, at: float
) -> list[Path]:
    files = _reports(outbox, sr_uid)
    owed = [
        OutboxItem(f"sr:{sr_uid}", "pacs", files[0], 0, study_instance_uid=study),
        OutboxItem(f"fhir:{sr_uid}", "fhir", files[1], 0, study_instance_uid=study),
    ]
    store.complete(reported=[sop], failed=[], outbox=owed, now=at)
    return files


def test_only_studies_that_owe_nothing_and_are_old_enough_expire(
    store: SqliteStateStore, tmp_path: Path
) -> None:
    spool, outbox = tmp_path / "spool", tmp_path / "outbox"
    # 1.1: scored, both reports delivered 40 days ago: over
    _received(store, spool, "1.1", "1.1.1", at=0.0)
    _scored(store, outbox, "1.1", "1.1.1", "9.1", at=1.0)
    store.delivered("sr:9.1", 2.0)
    store.delivered("fhir:9.1", 2.0)
    # 1.2: scored, the FHIR report still owed: never deleted, however old
    _received(store, spool, "1.2", "1.2.1", at=0.0)
    _scored(store, outbox, "1.2", "1.2.1", "9.2", at=1.0)
    store.delivered("sr:9.2", 2.0)
    # 1.3: a delivery parked
    _received(store, spool, "1.3", "1.3.1", at=0.0)
    _scored(store, outbox, "1.3", "1.3.1", "9.3", at=1.0)
    store.delivered("sr:9.3", 2.0)
    store.reject_delivery("fhir:9.3", "HTTP 422", now=3.0, next_attempt_at=None)
    # 1.4: the study parked
    _received(store, spool, "1.4", "1.4.1", at=0.0)
    store.record_study_failure("1.4", "scoring failed", now=1.0, retry_at=None)
    # 1.5: never scored yet (instance still 'received')
    _received(store, spool, "1.5", "1.5.1", at=0.0)
    # 1.6: delivered long ago but re-sent yesterday (`dermfusion resend`)
    _received(store, spool, "1.6", "1.6.1", at=0.0)
    _scored(store, outbox, "1.6", "1.6.1", "9.6", at=1.0)
    store.delivered("sr:9.6", 39 * DAY)
    store.delivered("fhir:9.6", 2.0)
    # 1.7: scored with no destination (embedded defaults): over, no report rows
    _received(store, spool, "1.7", "1.7.1", at=0.0)
    store.complete(reported=["1.7.1"], failed=[], outbox=[], now=1.0)
    # 1.8: an instance that could not be scored: over
    _received(store, spool, "1.8", "1.8.1", at=0.0)
    store.complete(reported=[], failed=[("1.8.1", "not an image")], outbox=[], now=1.0)

    expired = store.expired_studies(cutoff=40 * DAY - 30 * DAY, limit=100)
    assert sorted(e.study_instance_uid for e in expired) == ["1.1", "1.7", "1.8"]
    (first,) = [e for e in expired if e.study_instance_uid == "1.1"]
    assert first.spool_files == (spool / "1.1" / "1.1.1.dcm",)
    assert first.report_files == (outbox / "9.1.dcm", outbox / "9.1.json")
    assert store.expired_studies(cutoff=0.0, limit=100) == []  # nothing received before


def test_retention_deletes_files_then_rows_and_keeps_what_is_owed(
    store: SqliteStateStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool, outbox = tmp_path / "spool", tmp_path / "outbox"
    old = _received(store, spool, "1.1", "1.1.1", at=0.0)
    old_reports = _scored(store, outbox, "1.1", "1.1.1", "9.1", at=1.0)
    store.delivered("sr:9.1", 2.0)
    store.delivered("fhir:9.1", 2.0)
    owed = _received(store, spool, "1.2", "1.2.1", at=0.0)
    owed_reports = _scored(store, outbox, "1.2", "1.2.1", "9.2", at=1.0)
    embedded = _received(store, spool, "1.3", "1.3.1", at=0.0)
    embedded_reports = _reports(outbox, "9.3")  # written, owed to no one
    store.complete(reported=["1.3.1"], failed=[], outbox=[], now=1.0)
    elsewhere = tmp_path / "not-ours.dcm"
    elsewhere.write_bytes(b"x")

    retention = Retention(store, keep_seconds=30 * DAY, spool_dir=spool, outbox_dir=outbox)
    with caplog.at_level(logging.INFO, logger="plugin.retention"):
        assert retention.purge(now=40 * DAY) == 2
    assert not old.exists() and not (spool / "1.1").exists()
    assert not any(f.exists() for f in old_reports)
    assert not embedded.exists()
    assert all(f.exists() for f in embedded_reports)  # the only copy of a result
    assert owed.exists() and all(f.exists() for f in owed_reports)
    assert elsewhere.exists()
    assert "retention: removed 2 studies over and older than 30 days (5 files)" in caplog.text
    # the rows went with the files: a second pass finds nothing; the owed study is untouched
    assert retention.purge(now=40 * DAY) == 0
    assert not store.knows_study("1.1")
    assert store.knows_study("1.2")
    assert store.outbox_counts() == {"owed": 2, "parked": 0, "delivered": 0}
    # an instance of a forgotten study sent again is a new arrival, scored again
    _received(store, spool, "1.1", "1.1.1", at=41 * DAY)
    assert store.ready_studies(now=42 * DAY, stable_seconds=0) == ["1.1"]


def test_retention_tolerates_files_already_gone(store: SqliteStateStore, tmp_path: Path) -> None:
    """A crash between deleting the files and the rows leaves rows whose files are gone."""
    spool, outbox = tmp_path / "spool", tmp_path / "outbox"
    path = _received(store, spool, "1.1", "1.1.1", at=0.0)
    store.complete(reported=["1.1.1"], failed=[], outbox=[], now=1.0)
    path.unlink()
    retention = Retention(store, keep_seconds=DAY, spool_dir=spool, outbox_dir=outbox)
    assert retention.purge(now=2 * DAY) == 1
    assert not store.knows_study("1.1")


def test_a_row_pointing_outside_the_spool_is_left_alone(
    store: SqliteStateStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool, outbox = tmp_path / "spool", tmp_path / "outbox"
    outside = tmp_path / "elsewhere" / "1.1.1.dcm"
    outside.parent.mkdir()
    outside.write_bytes(b"DICM")
    store.record_instance(InstanceRow("1.1.1", "1.1", VLP, outside), "a", 0.0)
    store.close_association("a", 0.0)
    store.complete(reported=["1.1.1"], failed=[], outbox=[], now=1.0)
    with caplog.at_level(logging.WARNING, logger="plugin.retention"):
        Retention(store, DAY, spool, outbox).purge(now=2 * DAY)
    assert outside.exists()
    assert "left 1.1.1.dcm alone" in caplog.text


def test_the_watermark_refuses_below_the_free_space_it_keeps(tmp_path: Path) -> None:
    generous = FreeSpaceWatermark(tmp_path, min_free_bytes=1)
    assert generous.shortfall() is None
    generous.check()
    assert FreeSpaceWatermark(tmp_path, min_free_bytes=0).shortfall() is None
    impossible = FreeSpaceWatermark(tmp_path, min_free_bytes=1 << 60)
    reason = impossible.shortfall()
    assert reason is not None
    assert reason.endswith(
        f"free on the storage volume, below storage.min_free_mb ({(1 << 60) // MIB})"
    )
    with pytest.raises(LowDiskSpaceError) as refused:
        impossible.check()
    assert status_for(refused.value) is StoreStatus.OUT_OF_RESOURCES
    missing = FreeSpaceWatermark(tmp_path / "gone", min_free_bytes=1)
    assert missing.shortfall() == "the storage volume cannot be read: No such file or directory"


def test_a_full_state_database_is_out_of_resources_not_a_processing_failure() -> None:
    assert status_for(sqlite3.OperationalError("database or disk is full")) == 0xA700
    assert status_for(sqlite3.OperationalError("database is locked")) == 0xA700
    assert status_for(sqlite3.IntegrityError("UNIQUE constraint failed")) == 0x0110


def test_the_spool_refuses_an_instance_below_the_watermark_and_records_nothing(
    store: SqliteStateStore, tmp_path: Path
) -> None:
    from dicom_io.listener import ReceivedInstance
    from plugin.service import SpoolSink

    spool = tmp_path / "spool"
    instance = ReceivedInstance(b"DICM", VLP, "1.1.1", "1.1", "MODALITY", "assoc")
    full = SpoolSink(spool, store, watermark=FreeSpaceWatermark(tmp_path, 1 << 60))
    with pytest.raises(LowDiskSpaceError) as refused:
        full.accept(instance)
    assert status_for(refused.value) is StoreStatus.OUT_OF_RESOURCES
    assert not (spool / "1.1").exists() and not store.knows_study("1.1")
    roomy = SpoolSink(spool, store, watermark=FreeSpaceWatermark(tmp_path, 1))
    roomy.accept(instance)
    assert (spool / "1.1" / "1.1.1.dcm").read_bytes() == b"DICM"
    assert store.knows_study("1.1")
