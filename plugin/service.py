"""`dermfusion serve`: the listener, study assembly, scoring and the outbox, in one process.

An instance is acknowledged only after it is in the spool (fsync'd) and recorded in the state
store. A worker thread scores studies that are complete (association released, quiet for
``stable_seconds``) and delivers what the outbox owes; both resume after a restart.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from dicom_io.demographics import demographics_from_dataset
from dicom_io.images import DermoscopyImage, UnsupportedInstanceError, read_image
from dicom_io.listener import ReceivedInstance, StorageListener
from dicom_io.sender import CStoreSender
from dicom_io.spool import write_bytes_durably
from fhir_io import FhirClient, FhirRejectedError, FhirUnavailableError, demographics_from_patient
from plugin.config import Settings
from plugin.demographics import ConflictPolicy, merge, needs_lookup
from plugin.domain import Demographics
from plugin.model import FusionModel
from plugin.outbox import FHIR, PACS, Backoff, Destination, FhirDestination, Outbox, PacsDestination
from plugin.pipeline import ImageReport, ReportPipeline, capture_writer
from plugin.state import InstanceRow, OutboxItem, SqliteStateStore, StateStore

log = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
WORKER_POLL_SECONDS = 0.2  # how often the threads look for ready studies and due deliveries


def _safe_uid(value: str, name: str) -> str:
    """UIDs become path components in the spool: refuse anything that is not a UID."""
    if not _UID.match(value) or len(value) > 64:
        raise ValueError(f"{name} is not a valid UID")
    return value


@dataclass
class SpoolSink:
    """Makes each received instance durable (spool file, then state row) before it is acked."""

    spool_dir: Path
    store: StateStore
    clock: Callable[[], float] = time.time

    def accept(self, instance: ReceivedInstance) -> None:
        study = _safe_uid(instance.study_instance_uid, "StudyInstanceUID")
        sop = _safe_uid(instance.sop_instance_uid, "SOPInstanceUID")
        path = self.spool_dir / study / f"{sop}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_durably(instance.encoded, path)
        self.store.record_instance(
            InstanceRow(sop, study, instance.sop_class_uid, path),
            instance.association_id,
            self.clock(),
        )

    def association_closed(self, association_id: str) -> None:
        self.store.close_association(association_id, self.clock())


def _study_date(image: DermoscopyImage) -> date:
    text = str(image.dataset.get("StudyDate", "") or "")
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return date.today()


@dataclass
class StudyProcessor:
    """Scores one ready study and records, atomically, what it now owes."""

    store: StateStore
    pipeline: ReportPipeline
    outbox_dir: Path
    destinations: frozenset[str]
    fhir: FhirClient | None
    patient_identifier_system: str
    conflict_policy: ConflictPolicy
    fhir_wait_seconds: float
    backoff: Backoff

    def process(self, study_uid: str, now: float) -> None:
        rows = self.store.pending_instances(study_uid)
        images: list[DermoscopyImage] = []
        failed: list[tuple[str, str]] = []
        for row in rows:
            try:
                images.append(read_image(row.path))
            except UnsupportedInstanceError as error:
                log.error("study=%s: instance not scored: %s", study_uid, error)
                failed.append((row.sop_instance_uid, str(error)))
        demographics = [demographics_from_dataset(image.dataset) for image in images]
        try:
            demographics = self._complete_from_fhir(images, demographics)
        except FhirUnavailableError as error:
            first_try = self.store.first_try(study_uid) or now
            waited = now - first_try
            if waited < self.fhir_wait_seconds:
                delay = self.backoff.delay(int(waited // max(self.backoff.initial_seconds, 0.1)))
                self.store.postpone_study(study_uid, now + delay, first_try)
                log.warning(
                    "study=%s: FHIR server unavailable for demographics, retry in %.0f s: %s",
                    study_uid,
                    delay,
                    error,
                )
                return
            log.warning(
                "study=%s: FHIR unavailable for %.0f s; scoring with DICOM demographics only",
                study_uid,
                waited,
            )
        reports = self.pipeline.run(images, demographics) if images else []
        owed = [item for report in reports for item in self._stage(report)]
        self.store.complete(
            reported=[r.image.ref.sop_instance_uid for r in reports],
            failed=failed,
            outbox=owed,
            now=now,
        )
        log.info(
            "study=%s: scored %d image(s), %d not scored, %d suspected; %d deliveries owed",
            study_uid,
            len(reports),
            len(failed),
            sum(r.finding.melanoma_suspected for r in reports),
            len(owed),
        )

    def _complete_from_fhir(
        self, images: list[DermoscopyImage], demographics: list[Demographics]
    ) -> list[Demographics]:
        if self.fhir is None:
            return demographics
        patients: dict[str, dict[str, Any] | None] = {}
        out = []
        for image, demo in zip(images, demographics, strict=True):
            patient_id = str(image.dataset.get("PatientID", "") or "")
            if not patient_id or not needs_lookup(demo):
                out.append(demo)
                continue
            if patient_id not in patients:
                try:
                    patients[patient_id] = self.fhir.find_patient(
                        self.patient_identifier_system, patient_id
                    )
                except FhirRejectedError as error:
                    log.warning("FHIR Patient lookup refused: %s", error)
                    patients[patient_id] = None
            patient = patients[patient_id]
            if patient is None:
                out.append(demo)
                continue
            from_fhir = demographics_from_patient(patient, _study_date(image))
            out.append(merge(demo, from_fhir, self.conflict_policy, image.ref.sop_instance_uid))
        return out

    def _stage(self, report: ImageReport) -> list[OutboxItem]:
        """Write both reports to the outbox folder; owe them to the configured destinations."""
        files = report.write_files(self.outbox_dir)  # the saliency PNG stays local
        owed = []
        if PACS in self.destinations:
            owed.append(OutboxItem(f"sr:{report.sr.SOPInstanceUID}", PACS, files.sr, 0))
            if report.capture is not None and files.capture is not None:
                key = f"sc:{report.capture.SOPInstanceUID}"
                owed.append(OutboxItem(key, PACS, files.capture, 0))
        if FHIR in self.destinations:
            owed.append(OutboxItem(f"fhir:{report.sr.SOPInstanceUID}", FHIR, files.bundle, 0))
        return owed


@dataclass
class DermfusionService:
    settings: Settings
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        storage = self.settings.storage
        self.store = SqliteStateStore(storage.dir / "state.sqlite3")
        self.fhir = FhirClient(self.settings.fhir.base_url) if self.settings.fhir else None
        destinations: dict[str, Destination] = {}
        if self.settings.pacs is not None:
            pacs = self.settings.pacs
            destinations[PACS] = PacsDestination(
                CStoreSender(
                    calling_ae=self.settings.listener.ae_title,
                    peer_ae=pacs.ae_title,
                    host=pacs.host,
                    port=pacs.port,
                )
            )
        if self.fhir is not None:
            destinations[FHIR] = FhirDestination(self.fhir)
        outbox = self.settings.outbox
        self.backoff = Backoff(outbox.retry_initial_seconds, outbox.retry_max_seconds)
        self.outbox = Outbox(self.store, destinations, self.backoff)
        self.processor = StudyProcessor(
            store=self.store,
            pipeline=ReportPipeline(
                model=FusionModel.load(self.settings.model.bundle_dir),
                patient_identifier_system=self.settings.patient_identifier_system,
                capture_writer=capture_writer(self.settings),
            ),
            outbox_dir=storage.outbox,
            destinations=frozenset(destinations),
            fhir=self.fhir,
            patient_identifier_system=self.settings.patient_identifier_system,
            conflict_policy=ConflictPolicy(self.settings.demographics.on_conflict),
            fhir_wait_seconds=self.settings.demographics.fhir_wait_seconds,
            backoff=self.backoff,
        )
        listener = self.settings.listener
        self.listener = StorageListener(
            ae_title=listener.ae_title,
            port=listener.port,
            host=listener.bind_address,
            allowed_calling_aes=listener.allowed_calling_aes,
            sink=SpoolSink(storage.dir / "spool", self.store),
        )
        # Scoring and delivery run apart, so a slow or unreachable PACS/FHIR server (connect
        # timeouts) never delays the scoring of the next study.
        self._threads = [
            threading.Thread(
                target=self._score_ready_studies, name="dermfusion-scoring", daemon=True
            ),
            threading.Thread(
                target=self._deliver_owed_reports, name="dermfusion-delivery", daemon=True
            ),
        ]

    def start(self) -> None:
        reopened = self.store.close_all_associations(time.time())
        if reopened:
            log.info("recovered %d association(s) left open by the previous run", reopened)
        self.listener.start()
        for thread in self._threads:
            thread.start()
        counts = self.store.outbox_counts()
        log.info(
            "listening as %s on port %d; %d deliveries owed",
            self.settings.listener.ae_title,
            self.settings.listener.port,
            counts["owed"],
        )

    def stop(self) -> None:
        self._stop.set()
        self.listener.stop()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=30)
        if self.fhir is not None:
            self.fhir.close()
        self.store.close()

    def run_forever(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self._stop.set())
        self.start()
        self._stop.wait()
        log.info("stopping")
        self.stop()

    def _score_ready_studies(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            for study_uid in self.store.ready_studies(now, self.settings.study.stable_seconds):
                try:
                    self.processor.process(study_uid, now)
                except Exception:  # noqa: BLE001 - one bad study must not stop the service
                    log.exception("study=%s: processing failed; retrying later", study_uid)
                    self.store.postpone_study(study_uid, now + self.backoff.max_seconds, now)
            self._stop.wait(WORKER_POLL_SECONDS)

    def _deliver_owed_reports(self) -> None:
        while not self._stop.is_set():
            self.outbox.deliver_due(time.time())
            self._stop.wait(WORKER_POLL_SECONDS)
