"""Outbox retries and study processing with small fakes (the real servers are in integration)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from dicom_io.sender import PacsUnavailableError
from fhir_io import FhirUnavailableError
from plugin.demographics import ConflictPolicy
from plugin.outbox import FHIR, PACS, Backoff, Outbox
from plugin.pipeline import ReportPipeline
from plugin.service import SpoolSink, StudyProcessor
from plugin.state import InstanceRow, OutboxItem, SqliteStateStore
from tests.conftest import SAMPLES


class FlakyDestination:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.delivered: list[str] = []

    def deliver(self, item: OutboxItem) -> None:
        if self.failures:
            self.failures -= 1
            raise PacsUnavailableError("association rejected: connection refused")
        self.delivered.append(item.key)


def test_backoff_doubles_up_to_the_cap() -> None:
    backoff = Backoff(initial_seconds=1, max_seconds=10)
    assert [backoff.delay(n) for n in range(6)] == [1, 2, 4, 8, 10, 10]


def test_failed_delivery_is_retried_after_backoff_and_delivered_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SqliteStateStore(tmp_path / "s.db")
    store.complete([], [], [OutboxItem("sr:1", PACS, tmp_path / "1.dcm", 0)], now=0.0)
    pacs = FlakyDestination(failures=2)
    outbox = Outbox(store, {PACS: pacs}, Backoff(1, 60))
    with caplog.at_level(logging.WARNING):
        assert outbox.deliver_due(now=0.0) == 0  # attempt 1 fails: retry at 1
        assert outbox.deliver_due(now=0.5) == 0  # not due yet
        assert outbox.deliver_due(now=1.0) == 0  # attempt 2 fails: retry at 3
        assert outbox.deliver_due(now=2.9) == 0
        assert outbox.deliver_due(now=3.0) == 1
        assert outbox.deliver_due(now=100.0) == 0
    assert pacs.delivered == ["sr:1"]
    failures = [r.getMessage() for r in caplog.records]
    assert len(failures) == 2 and "attempt 2" in failures[1] and "connection refused" in failures[1]


@pytest.fixture
def spooled(tmp_path: Path) -> tuple[SqliteStateStore, str]:
    """The DMS sample and a broken file of the same study, as the listener would leave them."""
    import pydicom

    store = SqliteStateStore(tmp_path / "s.db")
    source = pydicom.dcmread(SAMPLES / "dms_jpeg_baseline.dcm", stop_before_pixels=True)
    study = source.StudyInstanceUID
    spool = tmp_path / "spool" / study
    spool.mkdir(parents=True)
    shutil.copy(SAMPLES / "dms_jpeg_baseline.dcm", spool / "good.dcm")
    (spool / "broken.dcm").write_bytes(b"DICM but not really")
    store.record_instance(
        InstanceRow(source.SOPInstanceUID, study, source.SOPClassUID, spool / "good.dcm"), "a", 1.0
    )
    store.record_instance(
        InstanceRow("9.9.9", study, source.SOPClassUID, spool / "broken.dcm"), "a", 1.0
    )
    store.close_association("a", 1.0)
    return store, study


class DownFhir:
    def find_patient(self, system: str, value: str) -> None:
        raise FhirUnavailableError("connect failed: connection refused")


def _processor(store: SqliteStateStore, tmp_path: Path, fusion_model, fhir=None):  # type: ignore[no-untyped-def]
    return StudyProcessor(
        store=store,
        pipeline=ReportPipeline(model=fusion_model, patient_identifier_system="urn:test"),
        outbox_dir=tmp_path / "outbox",
        destinations=frozenset({PACS, FHIR}),
        fhir=fhir,
        patient_identifier_system="urn:test",
        conflict_policy=ConflictPolicy.DICOM,
        fhir_wait_seconds=10,
        backoff=Backoff(1, 4),
    )


def test_a_broken_instance_is_kept_and_named_while_the_rest_is_scored(
    spooled,
    tmp_path: Path,
    fusion_model,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    store, study = spooled
    with caplog.at_level(logging.INFO):
        _processor(store, tmp_path, fusion_model).process(study, now=10.0)
    assert store.ready_studies(now=100.0, stable_seconds=0) == []
    assert sorted(i.destination for i in store.due_outbox(now=10.0, limit=10)) == [FHIR, PACS]
    assert len(list((tmp_path / "outbox").glob("*.dcm"))) == 1
    assert (tmp_path / "spool" / study / "broken.dcm").exists()  # kept for inspection
    assert any("broken.dcm" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_fhir_down_postpones_the_study_then_scores_without_it(
    spooled,
    tmp_path: Path,
    fusion_model,  # type: ignore[no-untyped-def]
) -> None:
    store, study = spooled
    # the DMS sample has age and sex, so make the lookup necessary: drop them from the spool
    import pydicom

    good = tmp_path / "spool" / study / "good.dcm"
    ds = pydicom.dcmread(good)
    del ds.PatientAge, ds.PatientSex
    ds.save_as(good)
    processor = _processor(store, tmp_path, fusion_model, fhir=DownFhir())
    processor.process(study, now=100.0)
    assert store.ready_studies(now=100.5, stable_seconds=0) == []  # postponed
    assert store.due_outbox(now=1e9, limit=10) == []
    processor.process(study, now=111.0)  # waited longer than fhir_wait_seconds
    assert len(store.due_outbox(now=1e9, limit=10)) == 2


def test_spool_sink_refuses_a_uid_that_is_not_a_uid(tmp_path: Path) -> None:
    from dicom_io.listener import ReceivedInstance

    sink = SpoolSink(tmp_path / "spool", SqliteStateStore(tmp_path / "s.db"))
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        sink.accept(ReceivedInstance(b"x", "1.2", "1.2.3", "../../etc", "SCU", "a"))
    assert not (tmp_path / "etc").exists()
