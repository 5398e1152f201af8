"""Delivery of owed reports: SRs to the PACS, Bundles to the FHIR server, retried with backoff.

What is owed lives in the state store, so a restart resumes delivery. Re-delivery is harmless:
the SR's SOP Instance UID and the Bundle's conditional creates are stable.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Protocol

from dicom_io.sender import CStoreSender, PacsError
from fhir_io import FhirClient, FhirError
from plugin.state import OutboxItem, StateStore

log = logging.getLogger(__name__)

PACS = "pacs"
FHIR = "fhir"


class Destination(Protocol):
    def deliver(self, item: OutboxItem) -> None: ...


@dataclass
class PacsDestination:
    sender: CStoreSender

    def deliver(self, item: OutboxItem) -> None:
        self.sender.send(item.path)


@dataclass
class FhirDestination:
    client: FhirClient

    def deliver(self, item: OutboxItem) -> None:
        self.client.post_transaction(json.loads(item.path.read_text()))


@dataclass
class Backoff:
    initial_seconds: float
    max_seconds: float

    def delay(self, attempts: int) -> float:
        return float(min(self.max_seconds, self.initial_seconds * 2 ** min(attempts, 30)))


@dataclass
class Outbox:
    store: StateStore
    destinations: dict[str, Destination]
    backoff: Backoff

    def deliver_due(self, now: float, limit: int = 20) -> int:
        """Try every item that is due; returns how many were delivered."""
        delivered = 0
        for item in self.store.due_outbox(now, limit):
            destination = self.destinations.get(item.destination)
            if destination is None:
                log.error("outbox: no destination %r configured for %s", item.destination, item.key)
                self.store.retry_later(item.key, "destination not configured", now + 3600)
                continue
            try:
                destination.deliver(item)
            except (PacsError, FhirError, OSError) as error:
                delay = self.backoff.delay(item.attempts)
                self.store.retry_later(item.key, str(error), now + delay)
                log.warning(
                    "outbox: %s to %s failed (attempt %d), retry in %.0f s: %s",
                    item.key,
                    item.destination,
                    item.attempts + 1,
                    delay,
                    str(error).splitlines()[0] if str(error) else type(error).__name__,
                )
                continue
            self.store.delivered(item.key, now)
            log.info("outbox: delivered %s to %s", item.key, item.destination)
            delivered += 1
        return delivered
