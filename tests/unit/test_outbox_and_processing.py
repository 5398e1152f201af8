"""Outbox retries and study processing with small fakes (the real servers are in integration).

Failure handling: refused deliveries and unreadable outbox files are parked and do not hold up
the queue; a study that keeps failing is parked, its good images reported; nothing a pass
raises stops the loop, and no log line or parked reason quotes a header value.
"""

from __future__ import annotations

import errno
import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest

from dicom_io.images import DermoscopyImage
from dicom_io.sender import CStoreSender, PacsRejectedError, PacsUnavailableError
from fhir_io import FhirClient, FhirRejectedError, FhirUnavailableError
from monai_bundle.scripts.metadata import encode_missing
from plugin.demographics import ConflictPolicy
from plugin.domain import Demographics, Finding, ModelIdentity
from plugin.model import Explanation
from plugin.outbox import EXPLANATION, FHIR, PACS, Backoff, FhirDestination, Outbox, PacsDestination
from plugin.pipeline import Overlay, ReportFiles, ReportPipeline
from plugin.service import SpoolSink, StudyProcessor, StudyScorer
from plugin.state import InstanceRow, OutboxItem, SqliteStateStore
from plugin.workers import Worker
from tests.conftest import SAMPLES

# Stands for a header value an exception text might quote: it must reach no log and no reason.
MARKED_VALUE = "DOE^JANE-19700230"


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


def _processor(store: SqliteStateStore, tmp_path: Path, fusion_model, fhir=None, capture=None):  # type: ignore[no-untyped-def]
    return StudyProcessor(
        store=store,
        pipeline=ReportPipeline(
            model=fusion_model, patient_identifier_system="urn:test", capture_writer=capture
        ),
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
    due = sorted(i.destination for i in store.due_outbox(now=10.0, limit=10))
    assert due == [EXPLANATION, FHIR, PACS]
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
    assert len(store.due_outbox(now=1e9, limit=10)) == 3  # SR, Bundle, overlay


def test_spool_sink_refuses_a_uid_that_is_not_a_uid(tmp_path: Path) -> None:
    from dicom_io.listener import ReceivedInstance

    sink = SpoolSink(tmp_path / "spool", SqliteStateStore(tmp_path / "s.db"))
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        sink.accept(ReceivedInstance(b"x", "1.2", "1.2.3", "../../etc", "SCU", "a"))
    assert not (tmp_path / "etc").exists()


class RefusingDestination:
    """Refuses the keys in ``refuse`` with ``error``; delivers everything else."""

    def __init__(self, refuse: set[str], error: Exception) -> None:
        self.refuse = refuse
        self.error = error
        self.delivered: list[str] = []

    def deliver(self, item: OutboxItem) -> None:
        if item.key in self.refuse:
            raise self.error
        self.delivered.append(item.key)


def _owe(store: SqliteStateStore, *keys: str, destination: str = PACS) -> None:
    items = [OutboxItem(k, destination, Path(f"/outbox/{k}"), 0) for k in keys]
    store.complete([], [], items, now=0.0)


@pytest.mark.parametrize(
    "refusal",
    [
        PacsRejectedError("status 0xA700 (out of resources)", 0xA700),
        PacsRejectedError("status 0xC000", 0xC000),
        FhirRejectedError("transaction: FHIR server rejected it with 422: invalid", status=422),
    ],
    ids=["dicom-A700", "dicom-C000", "fhir-422"],
)
def test_a_refused_delivery_is_parked_after_max_attempts_and_the_next_item_still_goes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, refusal: Exception
) -> None:
    store = SqliteStateStore(tmp_path / "s.db")
    _owe(store, "sr:bad", "sr:good")
    peer = RefusingDestination({"sr:bad"}, refusal)
    outbox = Outbox(store, {PACS: peer}, Backoff(1, 60), max_attempts=3)
    with caplog.at_level(logging.WARNING):
        assert outbox.deliver_due(now=0.0) == 1  # refused (1 of 3); the good one goes anyway
        assert outbox.deliver_due(now=1.0) == 0  # refused (2 of 3)
        assert outbox.deliver_due(now=3.0) == 0  # refused (3 of 3): parked
        assert outbox.deliver_due(now=1e9) == 0  # never tried again
    assert peer.delivered == ["sr:good"]
    (parked,) = store.parked()
    assert (parked.kind, parked.key, parked.attempts) == ("outbox", "sr:bad", 3)
    assert parked.reason.startswith("refused or unreadable: ") and str(refusal) in parked.reason
    assert store.outbox_counts() == {"owed": 0, "parked": 1, "delivered": 1}
    assert sum("parked after 3 refused attempt(s)" in r.getMessage() for r in caplog.records) == 1

    _owe(store, "sr:next")  # a parked item does not hold up what comes after it
    assert outbox.deliver_due(now=2e9) == 1 and peer.delivered[-1] == "sr:next"
    peer.refuse.clear()
    assert store.requeue_parked_deliveries(now=3e9) == 1
    assert outbox.deliver_due(now=3e9) == 1 and peer.delivered[-1] == "sr:bad"


@pytest.mark.parametrize(
    "outage",
    [
        PacsUnavailableError("association rejected: connection refused"),
        FhirUnavailableError("transaction: FHIR server answered 503: busy", status=503),
        FhirUnavailableError("transaction: FHIR server answered 408: slow", status=408),
        FhirUnavailableError("transaction: FHIR server answered 429: wait", status=429),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=["pacs-down", "fhir-503", "fhir-408", "fhir-429", "disk-full"],
)
def test_a_peer_that_is_away_is_retried_for_as_long_as_it_takes(
    tmp_path: Path, outage: Exception
) -> None:
    store = SqliteStateStore(tmp_path / "s.db")
    _owe(store, "sr:1")
    outbox = Outbox(store, {PACS: RefusingDestination({"sr:1"}, outage)}, Backoff(1, 2), 2)
    for attempt in range(20):
        outbox.deliver_due(now=10.0 * attempt)
    (item,) = store.due_outbox(now=1e9, limit=5)
    assert (item.attempts, item.rejections) == (20, 0)
    assert store.parked() == []


def _write_truncated_sr(path: Path, keep: int) -> None:
    """A DICOM file cut short, as a crash or a full disk while writing would leave it."""
    path.write_bytes((SAMPLES / "dms_jpeg_baseline.dcm").read_bytes()[:keep])


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("garbage.dcm", lambda p: p.write_bytes(b"not DICOM at all " * 10)),
        ("cut-in-meta.dcm", lambda p: _write_truncated_sr(p, 152)),
        ("cut-before-uid.dcm", lambda p: _write_truncated_sr(p, 400)),
        ("missing.dcm", lambda p: None),
        ("bundle.json", lambda p: p.write_text('{"resourceType": "Bundle", "ty')),
    ],
)
def test_a_corrupt_outbox_file_is_parked_and_the_queue_goes_on(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    name: str,
    write: Callable[[Path], None],
) -> None:
    """The real destinations read the file: whatever that raises is the item's, not the loop's."""
    store = SqliteStateStore(tmp_path / "s.db")
    corrupt = tmp_path / name
    write(corrupt)
    destination = FHIR if name.endswith(".json") else PACS
    store.complete([], [], [OutboxItem("bad", destination, corrupt, 0)], now=0.0)
    _owe(store, "good", destination=PACS)
    peer = RefusingDestination(set(), RuntimeError("unused"))
    # Nothing listens on the PACS port: a file that read fine would fail as "unavailable".
    sender = CStoreSender(calling_ae="DF", peer_ae="PACS", host="127.0.0.1", port=9)
    fhir = FhirClient("http://127.0.0.1:9/fhir")
    real = {PACS: PacsDestination(sender), FHIR: FhirDestination(fhir)}

    class Route:
        def deliver(self, item: OutboxItem) -> None:
            (real if item.key == "bad" else {PACS: peer})[item.destination].deliver(item)

    outbox = Outbox(store, {PACS: Route(), FHIR: Route()}, Backoff(1, 1), max_attempts=2)
    with caplog.at_level(logging.INFO):
        assert outbox.deliver_due(now=0.0) == 1
        assert outbox.deliver_due(now=1.0) == 0
    fhir.close()
    assert peer.delivered == ["good"]
    (parked,) = store.parked()
    assert parked.key == "bad" and parked.reason.startswith("refused or unreadable: ")
    assert "\n" not in parked.reason


def _image_copy(source: Path, target: Path, sop_instance_uid: str, **tags: str) -> InstanceRow:
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = sop_instance_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target)
    return InstanceRow(sop_instance_uid, ds.StudyInstanceUID, ds.SOPClassUID, target)


@dataclass
class _FakeReport:
    """What StudyProcessor needs of an ImageReport, without the model."""

    image: DermoscopyImage

    @property
    def sr(self) -> SimpleNamespace:
        return SimpleNamespace(SOPInstanceUID=f"{self.image.ref.sop_instance_uid}.9")

    finding = Finding(0.2, 0.5, ModelIdentity("fake model", "0"))
    explanation = Explanation(None, encode_missing(1)[0])

    @property
    def overlay(self) -> Overlay:
        return Overlay(self.image, self.explanation, self.finding.model, self.sr.SOPInstanceUID)

    def write_reports(self, folder: Path) -> ReportFiles:
        folder.mkdir(parents=True, exist_ok=True)
        uid = self.sr.SOPInstanceUID
        files = ReportFiles(folder / f"{uid}.dcm", folder / f"{uid}.json")
        for path in (files.sr, files.bundle):
            path.write_bytes(b"report")
        return files


class FakePipeline:
    """Reports every image but those named, for which it raises what highdicom raises on a
    malformed header value: an error whose text quotes the value."""

    def __init__(self, refuse: set[str]) -> None:
        self.refuse = refuse
        self.batches: list[list[str]] = []

    def report(
        self, images: Sequence[DermoscopyImage], demographics: Sequence[Demographics]
    ) -> list[_FakeReport]:
        self.batches.append([i.ref.sop_instance_uid for i in images])
        for image in images:
            if image.ref.sop_instance_uid in self.refuse:
                raise ValueError(f"Unable to convert '{MARKED_VALUE}' to 'PN'")
        return [_FakeReport(image) for image in images]


def test_a_study_that_keeps_failing_is_parked_and_its_good_images_are_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SqliteStateStore(tmp_path / "s.db")
    spool = tmp_path / "spool"
    good = _image_copy(SAMPLES / "dms_jpeg_baseline.dcm", spool / "good.dcm", "1.2.826.0.1.1")
    bad = _image_copy(SAMPLES / "dms_jpeg_baseline.dcm", spool / "bad.dcm", "1.2.826.0.1.2")
    for row in (good, bad):
        store.record_instance(row, "a", 1.0)
    store.close_association("a", 1.0)
    pipeline = FakePipeline(refuse={bad.sop_instance_uid})
    processor = StudyProcessor(
        store=store,
        pipeline=pipeline,  # type: ignore[arg-type]
        outbox_dir=tmp_path / "outbox",
        destinations=frozenset({PACS}),
        fhir=None,
        patient_identifier_system="urn:test",
        conflict_policy=ConflictPolicy.DICOM,
        fhir_wait_seconds=10,
        backoff=Backoff(1, 4),
    )
    scorer = StudyScorer(store, processor, stable_seconds=0, backoff=Backoff(1, 4), max_attempts=3)
    study = good.study_instance_uid
    with caplog.at_level(logging.INFO):
        assert scorer.score_ready(now=10.0) == 0  # the study together: fails (1 of 3)
        assert store.due_outbox(now=1e9, limit=5) == []
        assert scorer.score_ready(now=10.5) == 0  # not due yet
        assert scorer.score_ready(now=11.0) == 0  # one image at a time: good reported (2 of 3)
        assert [i.key for i in store.due_outbox(now=1e9, limit=5)] == [
            "sr:1.2.826.0.1.1.9",
            "explain:1.2.826.0.1.1.9",  # the overlay, drawn by the delivery worker
        ]
        assert scorer.score_ready(now=13.0) == 0  # the bad one alone (3 of 3): parked
        assert scorer.score_ready(now=1e9) == 0  # and no longer tried
    assert pipeline.batches == [
        [good.sop_instance_uid, bad.sop_instance_uid],
        [good.sop_instance_uid],
        [bad.sop_instance_uid],
        [bad.sop_instance_uid],
    ]
    (parked,) = store.parked()
    assert (parked.kind, parked.key, parked.attempts) == ("study", study, 3)
    assert parked.reason.startswith("scoring failed: ValueError at ")
    assert "tests/unit/test_outbox_and_processing.py" in parked.reason  # where it was raised
    messages = [r.getMessage() for r in caplog.records]
    assert not any(MARKED_VALUE in m for m in messages) and MARKED_VALUE not in parked.reason
    assert sum(f"study={study}: parked after 3 failed attempt(s)" in m for m in messages) == 1
    assert sum(f"study={study}: processing failed" in m for m in messages) == 2

    pipeline.refuse.clear()  # the cause is fixed: an operator re-queues the study
    assert store.requeue_parked_studies([study]) == 1
    assert scorer.score_ready(now=2e9) == 1
    assert len(store.due_outbox(now=3e9, limit=5)) == 4 and store.parked() == []


class FailingProcessor:
    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    def process(self, study_uid: str, now: float, *, one_by_one: bool = False) -> None:
        self.calls += 1
        raise self.error


def _ready_study(store: SqliteStateStore, study: str = "1.2.3") -> str:
    row = InstanceRow("1.2.3.1", study, "1.2.840.10008.5.1.4.1.1.77.1.7", Path("/x.dcm"))
    store.record_instance(row, "a", 0.0)
    store.close_association("a", 0.0)
    return study


def test_a_full_disk_postpones_a_study_without_counting_it(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "s.db")
    study = _ready_study(store)
    processor = FailingProcessor(OSError(errno.ENOSPC, "No space left on device"))
    scorer = StudyScorer(store, processor, stable_seconds=0, backoff=Backoff(1, 5), max_attempts=1)
    for attempt in range(5):
        scorer.score_ready(now=10.0 * (attempt + 1))
    assert processor.calls == 5
    assert store.study_attempts(study) == 0 and store.parked() == []


class DiskFullWhenRecording(SqliteStateStore):
    """SQLite on a full disk: recording the failure raises too, ``failures`` times."""

    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(path)
        self.failures = failures

    def record_study_failure(
        self, study_instance_uid: str, reason: str, now: float, retry_at: float | None
    ) -> int:
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return super().record_study_failure(study_instance_uid, reason, now, retry_at)


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_scoring_loop_survives_the_processor_and_the_error_handler_failing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = DiskFullWhenRecording(tmp_path / "s.db", failures=2)
    study = _ready_study(store)
    processor = FailingProcessor(KeyError(MARKED_VALUE))
    scorer = StudyScorer(store, processor, stable_seconds=0, backoff=Backoff(0, 0), max_attempts=2)
    stop = threading.Event()
    worker = Worker(
        "test-scoring", scorer.score_ready, stop, poll_seconds=0.01, pause=Backoff(0, 0)
    )
    with caplog.at_level(logging.WARNING):
        worker.start()
        try:
            _wait_for(lambda: store.parked() != [])
            assert worker.is_alive()
        finally:
            stop.set()
            worker.join(5)
    assert processor.calls == 4  # two failures the store could not record, then two counted
    assert store.parked()[0].key == study
    messages = [r.getMessage() for r in caplog.records]
    passes = [m for m in messages if m.startswith("test-scoring: pass failed")]
    assert len(passes) == 2 and all(
        "OperationalError: database or disk is full" in m for m in passes
    )
    assert not any(MARKED_VALUE in m for m in messages)


def test_the_delivery_loop_survives_a_store_that_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class LockedOnce(SqliteStateStore):
        failed = False

        def due_outbox(self, now: float, limit: int) -> list[OutboxItem]:
            if not self.failed:
                self.failed = True
                raise sqlite3.OperationalError("database is locked")
            return super().due_outbox(now, limit)

    store = LockedOnce(tmp_path / "s.db")
    _owe(store, "sr:1")
    peer = RefusingDestination(set(), RuntimeError("unused"))
    outbox = Outbox(store, {PACS: peer}, Backoff(1, 1))
    stop = threading.Event()
    worker = Worker(
        "test-delivery", outbox.deliver_due, stop, poll_seconds=0.01, pause=Backoff(0, 0)
    )
    with caplog.at_level(logging.ERROR):
        worker.start()
        try:
            _wait_for(lambda: peer.delivered == ["sr:1"])
        finally:
            stop.set()
            worker.join(5)
    assert any("database is locked" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("ehr_patient", "subject_reference"), [("ehr-7", "Patient/ehr-7"), (None, None)]
)
def test_fhir_delivery_names_the_ehr_patient_and_never_creates_one(
    tmp_path: Path, ehr_patient: str | None, subject_reference: str | None
) -> None:
    """The subject is resolved against the EHR at delivery: its Patient for the identifier, or
    the identifier alone when it knows none. No entry of the transaction is a Patient."""
    import datetime as dt
    import json

    import httpx

    from fhir_io import report_bundle
    from plugin.domain import Finding, ImageRef, ModelIdentity

    root = "1.2.826.0.1.3680043.8.498"
    bundle = report_bundle(
        finding=Finding(0.7, 0.5, ModelIdentity("fusionnet", "1.0.0")),
        demographics=Demographics.unknown(),
        image=ImageRef(f"{root}.1", f"{root}.2", f"{root}.3", "1.2.840.10008.5.1.4.1.1.77.1.7"),
        patient_id="MRN-1",
        patient_identifier_system="urn:oid:1.2.3",
        issued=dt.datetime(2024, 1, 2, tzinfo=dt.UTC),
    )
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))
    posted: list[dict] = []

    def ehr(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/fhir/Patient/_search":
            assert b"identifier=urn%3Aoid%3A1.2.3%7CMRN-1" in request.content
            entries = (
                []
                if ehr_patient is None
                else [
                    {
                        "resource": {"resourceType": "Patient", "id": ehr_patient},
                        "search": {"mode": "match"},
                    }
                ]
            )
            return httpx.Response(
                200, json={"resourceType": "Bundle", "type": "searchset", "entry": entries}
            )
        body = json.loads(request.content)
        posted.append(body)
        answers = [{"response": {"status": "201 Created"}} for _ in body["entry"]]
        return httpx.Response(
            200, json={"resourceType": "Bundle", "type": "transaction-response", "entry": answers}
        )

    with FhirClient("http://ehr.test/fhir", transport=httpx.MockTransport(ehr)) as client:
        FhirDestination(client).deliver(OutboxItem("fhir:x", FHIR, path, 0))
    (sent,) = posted
    assert all(e["resource"]["resourceType"] != "Patient" for e in sent["entry"])
    subjects = [e["resource"]["subject"] for e in sent["entry"] if "subject" in e["resource"]]
    assert len(subjects) == 3
    for subject in subjects:
        assert subject.get("reference") == subject_reference
        assert subject["identifier"] == {"system": "urn:oid:1.2.3", "value": "MRN-1"}


def test_the_overlay_is_owed_after_the_reports_and_drawn_from_memory_or_after_a_restart(
    spooled,
    tmp_path: Path,
    fusion_model,  # type: ignore[no-untyped-def]
) -> None:
    """SR and Bundle are owed at once; the overlay is an owed item of its own. Drawn by the
    delivery worker from the scoring pass's feature map, it owes the Secondary Capture the SR
    names; after a restart (nothing in memory) it is drawn again from the spooled image."""
    import numpy as np
    from PIL import Image

    from dicom_io.capture import SaliencyCaptureWriter
    from dicom_io.sr import read_reported_finding
    from plugin.explanations import ExplanationDestination, ScoredImages

    store, study = spooled
    processor = _processor(store, tmp_path, fusion_model, capture=SaliencyCaptureWriter())
    processor.process(study, now=10.0)
    (sr_path,) = (tmp_path / "outbox").glob("*.dcm")
    uid = sr_path.stem
    assert not (tmp_path / "outbox" / f"{uid}_saliency.png").exists()  # reports did not wait
    owed = {i.key: i for i in store.due_outbox(now=10.0, limit=10)}
    assert set(owed) == {f"sr:{uid}", f"fhir:{uid}", f"explain:{uid}"}

    def drawn(scored: ScoredImages, now: float) -> np.ndarray:
        destination = ExplanationDestination(
            processor.pipeline,
            store,
            tmp_path / "outbox",
            scored,
            send_capture=True,
            clock=lambda: now,
        )
        outbox = Outbox(store, {EXPLANATION: destination}, Backoff(1, 4))
        store.requeue_study_deliveries(study, now)  # delivered or not: draw it (again)
        before = {i.key for i in store.due_outbox(now=now, limit=10)}
        assert f"explain:{uid}" in before
        outbox.deliver_due(now=now)
        with Image.open(tmp_path / "outbox" / f"{uid}_saliency.png") as png:
            return np.asarray(png).astype(int)

    from_memory = drawn(processor.scored, 20.0)
    capture = read_reported_finding(pydicom.dcmread(sr_path)).visual_explanation_uid
    assert f"sc:{capture}" in {i.key for i in store.due_outbox(now=30.0, limit=20)}
    assert pydicom.dcmread(tmp_path / "outbox" / f"{uid}_saliency.dcm").SOPInstanceUID == capture
    from_spool = drawn(ScoredImages(), 40.0)  # a restarted service: nothing kept in memory
    assert np.abs(from_memory - from_spool).max() <= 1  # the same map, up to rounding


def test_an_overlay_scored_by_another_model_version_is_parked_with_the_reason(
    spooled,
    tmp_path: Path,
    fusion_model,  # type: ignore[no-untyped-def]
) -> None:
    from dataclasses import replace

    from plugin.explanations import ExplanationDestination, ScoredImages

    store, study = spooled
    processor = _processor(store, tmp_path, fusion_model)
    processor.process(study, now=10.0)
    newer = replace(fusion_model, identity=replace(fusion_model.identity, version="99.0.0"))
    pipeline = ReportPipeline(model=newer, patient_identifier_system="urn:test")
    destination = ExplanationDestination(
        pipeline, store, tmp_path / "outbox", ScoredImages(), send_capture=False
    )
    outbox = Outbox(store, {EXPLANATION: destination}, Backoff(1, 4), max_attempts=1)
    outbox.deliver_due(now=20.0)
    (parked,) = store.parked()
    assert parked.key.startswith("explain:")
    assert "loaded model is" in parked.reason and "99.0.0" in parked.reason


def test_a_stop_request_is_not_held_up_by_a_queue_of_ready_studies(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "s.db")
    for n in range(3):
        row = InstanceRow(f"1.2.3.{n}", f"1.2.{n}", "1.2.840.10008.5.1.4.1.1.77.1.7", Path("/x"))
        store.record_instance(row, f"a{n}", 0.0)
        store.close_association(f"a{n}", 0.0)
    processor = FailingProcessor(ValueError("not reached twice"))
    stop = threading.Event()

    def process(study_uid: str, now: float, *, one_by_one: bool = False) -> None:
        stop.set()  # a SIGTERM arrives while the first study is scored
        processor.calls += 1

    processor.process = process  # type: ignore[method-assign]
    scorer = StudyScorer(store, processor, 0, Backoff(1, 4), max_attempts=3, stopping=stop.is_set)
    assert scorer.score_ready(now=10.0) == 1
    assert processor.calls == 1
