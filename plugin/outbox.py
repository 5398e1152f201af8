"""Delivery of owed reports: SRs to the PACS, Bundles to the FHIR server, retried with backoff.

What is owed lives in the state store, so a restart resumes delivery. Re-delivery is harmless:
the SR's SOP Instance UID and the Bundle's conditional creates are stable.

Failures are of two kinds. The peer being away (no association, connection refused, timeout,
FHIR 5xx/408/429) or our disk being full is retried with backoff for as long as it takes. A peer
that answered no (a DICOM failure status, FHIR 4xx) or a file that cannot be read or sent will
fail the same way again: after ``max_attempts`` of those the item is parked with its reason, so
it neither retries forever nor holds up the items behind it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dicom_io.sender import PacsUnavailableError
from fhir_io import FhirClient, FhirUnavailableError, subject_identifier, with_subject
from plugin.failures import describe, is_environmental
from plugin.state import OutboxItem, StateStore

log = logging.getLogger(__name__)

PACS = "pacs"
FHIR = "fhir"
# Grad-CAM overlays owed like deliveries (plugin.explanations): drawn locally, nothing is sent
EXPLANATION = "explanation"


class ResultAudit(Protocol):
    """Hears of each result delivered, refused (to be retried) or parked (the audit trail)."""

    def results_sent(
        self, study_uid: str | None, destination: str, outcome: str, key: str = ""
    ) -> None: ...


class Destination(Protocol):
    def deliver(self, item: OutboxItem) -> None: ...


class PacsSender(Protocol):
    """dicom_io's C-STORE or STOW-RS sender: returns once stored, else raises
    PacsUnavailableError (retry) or PacsRejectedError (counts towards parking)."""

    def send(self, instance: Path) -> None: ...


@dataclass
class PacsDestination:
    sender: PacsSender

    def deliver(self, item: OutboxItem) -> None:
        self.sender.send(item.path)


@dataclass
class FhirDestination:
    """Posts the Bundle with its subject resolved now, against the EHR as it is at delivery:
    the Patient found for the identifier, or the identifier alone. Never creates a Patient.
    Several Patients for one identifier is a refusal (parked after max_attempts): picking one
    could file the result under the wrong person."""

    client: FhirClient

    def deliver(self, item: OutboxItem) -> None:
        bundle = json.loads(item.path.read_text())
        identifier = subject_identifier(bundle)
        if identifier is not None:
            patient = self.client.find_patient(*identifier)
            reference = f"Patient/{patient['id']}" if patient and patient.get("id") else None
            bundle = with_subject(bundle, reference)
        self.client.post_transaction(bundle)


@dataclass
class Backoff:
    initial_seconds: float
    max_seconds: float

    def delay(self, attempts: int) -> float:
        return float(min(self.max_seconds, self.initial_seconds * 2 ** min(attempts, 30)))


def is_transient(error: BaseException) -> bool:
    """Will trying the same item again later plausibly succeed? (fhir_io maps 408/429 and 5xx
    to FhirUnavailableError, other 4xx to FhirRejectedError; dicom_io a failure status to
    PacsRejectedError.)"""
    return isinstance(error, PacsUnavailableError | FhirUnavailableError) or is_environmental(error)


@dataclass
class Outbox:
    store: StateStore
    destinations: dict[str, Destination]
    backoff: Backoff
    max_attempts: int = 10  # refusals (or unreadable file) before an item is parked
    audit: ResultAudit | None = None

    def deliver_due(self, now: float, limit: int = 20) -> int:
        """Try every item that is due; returns how many were delivered.

        Any error from a destination is the item's outcome, never the loop's: it is recorded
        and the next item is tried. Only the state store failing propagates.
        """
        delivered = 0
        for item in self.store.due_outbox(now, limit):
            destination = self.destinations.get(item.destination)
            if destination is None:
                log.error("outbox: no destination %r configured for %s", item.destination, item.key)
                self.store.retry_later(item.key, "destination not configured", now + 3600)
                continue
            try:
                destination.deliver(item)
            except Exception as error:  # noqa: BLE001 - every failure is this item's outcome
                self._failed(item, error, now)
                continue
            self.store.delivered(item.key, now)
            log.info("outbox: delivered %s to %s", item.key, item.destination)
            self._tell_audit(item, "delivered")
            delivered += 1
        return delivered

    def _failed(self, item: OutboxItem, error: Exception, now: float) -> None:
        cause = describe(error)
        if is_transient(error):
            delay = self.backoff.delay(item.attempts)
            self.store.retry_later(item.key, cause, now + delay)
            log.warning(
                "outbox: %s to %s failed (attempt %d), retry in %.0f s: %s",
                item.key,
                item.destination,
                item.attempts + 1,
                delay,
                cause,
            )
            return
        reason = f"refused or unreadable: {cause}"
        rejections = item.rejections + 1
        if rejections >= self.max_attempts:
            self.store.reject_delivery(item.key, reason, now, None)
            self._tell_audit(item, "parked")
            log.error(
                "outbox: %s to %s parked after %d refused attempt(s): %s",
                item.key,
                item.destination,
                rejections,
                cause,
            )
            return
        delay = self.backoff.delay(rejections - 1)
        self.store.reject_delivery(item.key, reason, now, now + delay)
        self._tell_audit(item, "refused")
        log.warning(
            "outbox: %s to %s refused (attempt %d, %d of %d before parking), retry in %.0f s: %s",
            item.key,
            item.destination,
            item.attempts + 1,
            rejections,
            self.max_attempts,
            delay,
            cause,
        )

    def _tell_audit(self, item: OutboxItem, outcome: str) -> None:
        """A transient failure (peer away) is not audited: nothing was sent or refused. Neither is
        an overlay drawn: it leaves the system later, as the Secondary Capture to the PACS."""
        if self.audit is None or item.destination == EXPLANATION:
            return
        try:
            self.audit.results_sent(item.study_instance_uid, item.destination, outcome, item.key)
        except Exception:  # noqa: BLE001 - auditing must never change what the outbox does
            log.exception("outbox: audit observer failed")
