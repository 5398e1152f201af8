"""`dermfusion serve`: the listener, study assembly, scoring and the outbox, in one process.

An instance is acknowledged only after it is in the spool (fsync'd) and recorded in the state
store. A worker thread scores studies that are complete (their one association released, or,
spread over several, none open and quiet for ``stable_seconds``) and another delivers what the
outbox owes, the Grad-CAM overlays included (drawn after the SR and Bundle have left, from the
scoring pass: plugin.explanations); both resume after a restart.
Neither can die silently: every pass is guarded, a supervisor restarts a thread that ends anyway
and reports the service unhealthy meanwhile, and a study that keeps failing is parked with its
reason after ``[study] max_attempts`` instead of being retried for ever.
"""

from __future__ import annotations

import logging
import signal
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Protocol

from dicom_io.demographics import demographics_from_dataset
from dicom_io.images import DermoscopyImage, UnsupportedInstanceError, read_image
from dicom_io.listener import AssociationLimits, ReceivedInstance, StorageListener
from dicom_io.sender import CStoreSender
from dicom_io.spool import private_directory, write_bytes_durably
from dicom_io.stow import StowRsSender
from dicom_io.tls import server_tls_context
from fhir_io import FhirClient, FhirRejectedError, FhirUnavailableError, demographics_from_patient
from plugin.audit import audit_trail
from plugin.config import STOW_RS, ConfigError, ListenerSettings, Settings
from plugin.demographics import ConflictPolicy, merge, needs_lookup
from plugin.domain import Demographics, is_uid
from plugin.explanations import ExplanationDestination, ScoredImages, owe_explanation
from plugin.failures import describe, is_environmental
from plugin.model import use_threads
from plugin.monitoring import ServiceHealth, ServiceMetrics, StateGauges, StatusServer
from plugin.outbox import (
    EXPLANATION,
    FHIR,
    PACS,
    Backoff,
    Destination,
    FhirDestination,
    Outbox,
    PacsDestination,
)
from plugin.peers import fhir_client, pacs_tls_context
from plugin.pipeline import ImageReport, ReportPipeline, report_pipeline
from plugin.retention import MIB, FreeSpaceWatermark, Retention
from plugin.state import InstanceRow, OutboxItem, ScoredResult, SqliteStateStore, StateStore
from plugin.workers import Supervisor, Worker

log = logging.getLogger(__name__)

WORKER_POLL_SECONDS = 0.2  # at the latest: released studies and owed reports wake them sooner
# After a failed pass (a full disk, a locked database) a worker waits 1 s, doubling up to this:
# how soon work resumes once the cause is gone, against how often the log repeats it.
WORKER_PAUSE_MAX_SECONDS = 30.0
SUPERVISOR_CHECK_SECONDS = 1.0  # how soon a dead worker thread is noticed and restarted


def listener_tls_context(listener: ListenerSettings) -> ssl.SSLContext | None:
    """The listener's TLS context from the configured PEM files; None for plain TCP."""
    if listener.tls_certificate is None or listener.tls_private_key is None:
        return None
    try:
        return server_tls_context(
            listener.tls_certificate, listener.tls_private_key, listener.tls_ca_certificates
        )
    except (OSError, ssl.SSLError) as error:  # ssl.SSLError is an OSError; named for clarity
        raise ConfigError(f"listener TLS files cannot be used: {error}") from None


def association_limits(listener: ListenerSettings) -> AssociationLimits:
    """The listener's limits from ``[listener]`` (serve and the conformance statement)."""
    return AssociationLimits(
        total=listener.max_associations,
        per_peer=listener.max_associations_per_peer,
        idle_timeout=listener.idle_timeout_seconds,
        max_instance_bytes=listener.max_instance_mb * MIB,
        max_pixels=listener.max_pixels,
    )


def _safe_uid(value: str, name: str) -> str:
    """UIDs become path components in the spool: refuse anything that is not a UID."""
    if not is_uid(value):
        raise ValueError(f"{name} is not a valid UID")
    return value


@dataclass
class SpoolSink:
    """Makes each received instance durable (spool file and state row) before it is acked.

    The row is committed while the file is flushed (``write_bytes_durably(alongside=...)``), so
    the acknowledgement waits for about one flush, not three in a row. A power cut during it can
    leave the row with a partial file: that instance was not acknowledged, and the row carries
    the file's CRC-32 so that ``forget_unspooled_instances`` drops it at start. Free space is
    read at most every ``SPACE_CHECK_SECONDS`` and every 1/``SPACE_CHECK_SHARE`` of the
    watermark accepted, not per instance.
    """

    spool_dir: Path
    store: StateStore
    clock: Callable[[], float] = time.time
    watermark: FreeSpaceWatermark | None = None
    metrics: ServiceMetrics | None = None
    # told when an association ends (its study may now be ready: the scorer need not poll)
    on_association_closed: Callable[[], None] | None = None
    SPACE_CHECK_SECONDS = 0.5
    SPACE_CHECK_SHARE = 16
    _space_read_at: float = field(default=float("-inf"), init=False, repr=False)
    _bytes_since_read: int = field(default=0, init=False, repr=False)
    _space_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def accept(self, instance: ReceivedInstance) -> None:
        study = _safe_uid(instance.study_instance_uid, "StudyInstanceUID")
        sop = _safe_uid(instance.sop_instance_uid, "SOPInstanceUID")
        if self.watermark is not None:
            self._check_space(self.watermark, len(instance.encoded))
        path = self.spool_dir / study / f"{sop}.dcm"
        row = InstanceRow(sop, study, instance.sop_class_uid, path)
        write_bytes_durably(
            instance.encoded,
            path,
            make_parents=True,  # the study's folder (and the spool's), with its entry flushed
            alongside=lambda checksum: self.store.record_instance(
                row, instance.association_id, self.clock(), checksum
            ),
        )
        if self.metrics is not None:
            self.metrics.instances_received.inc()

    def _check_space(self, watermark: FreeSpaceWatermark, size: int) -> None:
        """Refuse (0xA700) rather than take an instance without room to report it. A recent
        reading is trusted for a little more data: the reserve can shrink by at most
        1/SPACE_CHECK_SHARE of itself (plus what others write meanwhile) before it is re-read;
        below the watermark every instance re-reads it."""
        now = time.monotonic()
        with self._space_lock:
            if (
                now - self._space_read_at < self.SPACE_CHECK_SECONDS
                and self._bytes_since_read + size
                <= watermark.min_free_bytes // self.SPACE_CHECK_SHARE
            ):
                self._bytes_since_read += size
                return
        watermark.check()
        with self._space_lock:
            self._space_read_at, self._bytes_since_read = now, size

    def association_closed(self, association_id: str) -> None:
        self.store.close_association(association_id, self.clock())
        if self.on_association_closed is not None:
            self.on_association_closed()


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
    metrics: ServiceMetrics | None = None
    # feature maps kept for the delivery worker's overlays (plugin.explanations)
    scored: ScoredImages = field(default_factory=ScoredImages)

    def process(self, study_uid: str, now: float, *, one_by_one: bool = False) -> None:
        """Score the study's pending instances together, or (after a failed pass) one image at
        a time, so that one image that cannot be reported does not hold back the others."""
        rows = self.store.pending_instances(study_uid)
        if not one_by_one:
            self._process_rows(study_uid, rows, now)
            return
        failures: list[Exception] = []
        for row in rows:
            try:
                self._process_rows(study_uid, [row], now)
            except Exception as error:  # noqa: BLE001 - the other images still get their report
                if is_environmental(error):
                    raise
                failures.append(error)
        if failures:
            raise failures[0]

    def _process_rows(self, study_uid: str, rows: list[InstanceRow], now: float) -> None:
        started = time.monotonic()
        images: list[DermoscopyImage] = []
        sources: dict[str, Path] = {}
        failed: list[tuple[str, str]] = []
        for row in rows:
            try:
                images.append(read_image(row.path))
                sources[row.sop_instance_uid] = row.path
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
        reports = self.pipeline.report(images, demographics) if images else []
        owed = [
            item
            for report in reports
            for item in self._stage(report, sources[report.image.ref.sop_instance_uid])
        ]
        self.store.complete(
            reported=[r.image.ref.sop_instance_uid for r in reports],
            failed=failed,
            outbox=owed,
            now=now,
            results=[_scored_result(r, now) for r in reports],
        )
        if self.metrics is not None:
            self.metrics.studies_scored.inc()
            self.metrics.images_scored.inc(len(reports))
            self.metrics.instances_failed.inc(len(failed))
            self.metrics.scoring_seconds.observe(time.monotonic() - started)
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

    def _stage(self, report: ImageReport, source: Path) -> list[OutboxItem]:
        """Write both reports to the outbox folder; owe them to the configured destinations,
        and owe their Grad-CAM overlay (drawn by the delivery worker, so they need not wait)."""
        files = report.write_reports(self.outbox_dir)
        study = report.image.ref.study_instance_uid  # recorded so `dermfusion resend` finds them
        owed = []
        if PACS in self.destinations:
            sr_key = f"sr:{report.sr.SOPInstanceUID}"
            owed.append(OutboxItem(sr_key, PACS, files.sr, 0, study_instance_uid=study))
        if FHIR in self.destinations:
            key = f"fhir:{report.sr.SOPInstanceUID}"
            owed.append(OutboxItem(key, FHIR, files.bundle, 0, study_instance_uid=study))
        owed.append(owe_explanation(report, source, self.outbox_dir, study))
        self.scored.keep(report.overlay)
        return owed


def _scored_result(report: ImageReport, now: float) -> ScoredResult:
    finding = report.finding
    return ScoredResult(
        sop_instance_uid=report.image.ref.sop_instance_uid,
        study_instance_uid=report.image.ref.study_instance_uid,
        sr_sop_instance_uid=str(report.sr.SOPInstanceUID),
        probability=finding.probability,
        threshold=finding.threshold,
        suspected=finding.melanoma_suspected,
        model=f"{finding.model.name} {finding.model.version}",
        scored_at=now,
    )


class Processor(Protocol):
    """What the scorer needs of StudyProcessor (a stand-in in tests)."""

    def process(self, study_uid: str, now: float, *, one_by_one: bool = False) -> None: ...


@dataclass
class StudyScorer:
    """One pass over the ready studies. A study that fails is retried with backoff, one image
    at a time after the first failure, and parked with its reason after ``max_attempts``."""

    store: StateStore
    processor: Processor
    stable_seconds: float
    backoff: Backoff
    max_attempts: int
    metrics: ServiceMetrics | None = None
    # asked between studies: a stop request is not held up by a long queue of ready studies
    stopping: Callable[[], bool] = lambda: False
    # told after each study scored (it owes deliveries now: the delivery worker need not poll)
    on_scored: Callable[[], None] | None = None

    def score_ready(self, now: float) -> int:
        """Process every ready study; returns how many passed without failing."""
        passed = 0
        for study_uid in self.store.ready_studies(now, self.stable_seconds):
            if self.stopping():
                break
            attempts = self.store.study_attempts(study_uid)
            try:
                self.processor.process(study_uid, now, one_by_one=attempts > 0)
            except Exception as error:  # noqa: BLE001 - one bad study must not stop the others
                self._failed(study_uid, error, attempts, now)
                continue
            if attempts:
                self.store.clear_study_failures(study_uid)
            passed += 1
            if self.on_scored is not None:
                self.on_scored()
        return passed

    def _failed(self, study_uid: str, error: Exception, attempts: int, now: float) -> None:
        """Log the failure once (first, so its cause survives a store that fails too), then
        record it. A full disk is not the study's fault: it is retried without counting."""
        cause = describe(error)
        if self.metrics is not None:
            self.metrics.study_failures.inc()
        if is_environmental(error):
            retry_at = now + self.backoff.max_seconds
            log.warning(
                "study=%s: not scored, retry in %.0f s (not counted towards parking): %s",
                study_uid,
                retry_at - now,
                cause,
            )
            self.store.postpone_study(study_uid, retry_at, now)
            return
        attempts += 1
        reason = f"scoring failed: {cause}"
        if attempts >= self.max_attempts:
            log.error("study=%s: parked after %d failed attempt(s): %s", study_uid, attempts, cause)
            self.store.record_study_failure(study_uid, reason, now, None)
            return
        delay = self.backoff.delay(attempts - 1)
        log.warning(
            "study=%s: processing failed (attempt %d of %d), retry in %.0f s: %s",
            study_uid,
            attempts,
            self.max_attempts,
            delay,
            cause,
        )
        self.store.record_study_failure(study_uid, reason, now, now + delay)


@dataclass
class DermfusionService:
    settings: Settings
    _stop: threading.Event = field(default_factory=threading.Event)
    # rung when a study may have become ready / when reports are owed: the workers then start
    # their next pass at once instead of at their next poll
    _study_released: threading.Event = field(default_factory=threading.Event)
    _reports_owed: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        storage = self.settings.storage
        # Owner-only, also when an older release left them 0755 (they hold patient data).
        for folder in (storage.dir, storage.spool, storage.outbox, storage.cache):
            private_directory(folder, tighten=True)
        self.store = SqliteStateStore(storage.state_database)
        self.audit = audit_trail(self.settings)  # None with [audit] enabled = false
        self.metrics = ServiceMetrics()
        self.fhir = fhir_client(self.settings.fhir) if self.settings.fhir else None
        destinations: dict[str, Destination] = {}
        if self.settings.pacs is not None:
            pacs = self.settings.pacs
            # Same contract either way (PacsUnavailableError / PacsRejectedError): the outbox
            # retries and parks C-STORE and STOW-RS deliveries alike.
            sender: CStoreSender | StowRsSender
            if pacs.protocol == STOW_RS:
                sender = StowRsSender(dicomweb_url=pacs.dicomweb_url)
            else:
                sender = CStoreSender(
                    calling_ae=self.settings.listener.ae_title,
                    peer_ae=pacs.ae_title,
                    host=pacs.host,
                    port=pacs.port,
                    ssl_context=pacs_tls_context(pacs),
                )
            destinations[PACS] = PacsDestination(sender)
        if self.fhir is not None:
            destinations[FHIR] = FhirDestination(self.fhir)
        peers = frozenset(destinations)
        use_threads(self.settings.model.threads)
        pipeline = report_pipeline(self.settings)
        scored = ScoredImages()
        destinations[EXPLANATION] = ExplanationDestination(
            pipeline, self.store, storage.outbox, scored, send_capture=PACS in peers
        )
        outbox = self.settings.outbox
        self.backoff = Backoff(outbox.retry_initial_seconds, outbox.retry_max_seconds)
        self.outbox = Outbox(
            self.store, destinations, self.backoff, outbox.max_attempts, audit=self.audit
        )
        self.processor = StudyProcessor(
            store=self.store,
            pipeline=pipeline,
            outbox_dir=storage.outbox,
            destinations=peers,
            fhir=self.fhir,
            patient_identifier_system=self.settings.patient_identifier_system,
            conflict_policy=ConflictPolicy(self.settings.demographics.on_conflict),
            fhir_wait_seconds=self.settings.demographics.fhir_wait_seconds,
            backoff=self.backoff,
            metrics=self.metrics,
            scored=scored,
        )
        self.watermark = FreeSpaceWatermark(storage.dir, storage.min_free_mb * MIB)
        listener = self.settings.listener
        self.listener = StorageListener(
            ae_title=listener.ae_title,
            port=listener.port,
            host=listener.bind_address,
            allowed_calling_aes=listener.allowed_calling_aes,
            limits=association_limits(listener),
            ssl_context=listener_tls_context(listener),
            sink=SpoolSink(
                storage.spool,
                self.store,
                watermark=self.watermark,
                metrics=self.metrics,
                on_association_closed=self._study_released.set,
            ),
            capacity=self.watermark.shortfall,
            on_refusal=lambda kind, why: self.metrics.refusals.labels(kind, why).inc(),
            audit=self.audit,
        )
        self.scorer = StudyScorer(
            store=self.store,
            processor=self.processor,
            stable_seconds=self.settings.study.stable_seconds,
            backoff=self.backoff,
            max_attempts=self.settings.study.max_attempts,
            metrics=self.metrics,
            stopping=self._stop.is_set,
            on_scored=self._reports_owed.set,
        )
        # Scoring and delivery run apart, so a slow or unreachable PACS/FHIR server (connect
        # timeouts) never delays the scoring of the next study.
        pause = Backoff(1.0, WORKER_PAUSE_MAX_SECONDS)
        workers = [
            Worker(
                "dermfusion-scoring",
                self._score_ready_studies,
                self._stop,
                poll_seconds=WORKER_POLL_SECONDS,
                pause=pause,
                wake=self._study_released,
            ),
            Worker(
                "dermfusion-delivery",
                self._deliver_owed_reports,
                self._stop,
                poll_seconds=WORKER_POLL_SECONDS,
                pause=pause,
                wake=self._reports_owed,
            ),
        ]
        keep_days = self.settings.retention.keep_days
        self.retention = (
            Retention(self.store, keep_days * 86400, storage.spool, storage.outbox)
            if keep_days > 0
            else None
        )
        if self.retention is not None:
            workers.append(
                Worker(
                    "dermfusion-retention",
                    self.retention.purge,
                    self._stop,
                    poll_seconds=self.settings.retention.pass_minutes * 60,
                    pause=pause,
                )
            )
        if self.audit is not None and self.audit.forwarder is not None:
            workers.append(self.audit.forwarder.worker(self._stop))  # to the syslog collector
        self._supervisor = Supervisor(
            workers,
            self._stop,
            check_seconds=SUPERVISOR_CHECK_SECONDS,
            pause=pause,
        )
        self.health = ServiceHealth(self.store, self.healthy, outbox.stuck_after_seconds)
        self.metrics.watch(StateGauges(self.store, self.health))
        http = self.settings.http
        self.http = (
            None
            if http is None
            else StatusServer(
                host=http.bind_address,
                port=http.port,
                metrics=self.metrics,
                health=self.health,
                store=self.store,
                outbox_dir=storage.outbox,
                recent_studies=http.recent_studies,
            )
        )

    def start(self) -> None:
        reopened = self.store.close_all_associations(time.time())
        if reopened:
            log.info("recovered %d association(s) left open by the previous run", reopened)
        if unspooled := self.store.forget_unspooled_instances():
            log.warning("forgot %d unacknowledged instance(s) without a spool file", unspooled)
        if self.audit is not None:
            self.audit.service_started()
        self.listener.start()
        self._supervisor.start()
        if self.http is not None:
            self.http.start()
        counts = self.store.outbox_counts()
        parked_studies = sum(p.kind == "study" for p in self.store.parked())
        log.info(
            "listening as %s on port %d; %d deliveries owed; parked: %d deliveries, %d studies",
            self.settings.listener.ae_title,
            self.settings.listener.port,
            counts["owed"],
            counts["parked"],
            parked_studies,
        )

    def healthy(self) -> bool:
        """False before start, after stop, and while a worker thread is dead (until the
        supervisor has restarted it)."""
        return self._supervisor.healthy()

    def stop(self) -> None:
        if self.audit is not None:
            self.audit.service_stopped()
        self._stop.set()
        if self.http is not None:
            self.http.stop()
        self.listener.stop()
        self._supervisor.join(timeout=30)
        if self.fhir is not None:
            self.fhir.close()
        if self.audit is not None:
            self.audit.close()
        self.store.close()

    def run_forever(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self._stop.set())
        self.start()
        self._stop.wait()
        log.info("stopping")
        self.stop()

    def _score_ready_studies(self, now: float) -> None:
        """One pass of the scoring worker."""
        self.scorer.score_ready(now)

    def _deliver_owed_reports(self, now: float) -> None:
        """One pass of the delivery worker."""
        self.outbox.deliver_due(now)
