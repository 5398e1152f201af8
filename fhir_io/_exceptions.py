"""Errors raised by fhir_io, split by what the caller should do next.

::

    FhirError                    a FHIR exchange failed (also: an answer that is not FHIR)
    ├── FhirUnavailableError     connect refused, timeout, 408, 429 or 5xx: retry later
    └── FhirRejectedError        other 4xx: the server refused this request; resending it
                                 unchanged fails again. ``str()`` is one line with the
                                 OperationOutcome diagnostics.

The outbox retries on ``FhirUnavailableError`` and, after a bounded number of attempts, parks the
item on ``FhirRejectedError``. Every request fhir_io sends is idempotent (conditional creates,
reads, searches), so a retry after a timeout whose request did reach the server is safe.
"""

from __future__ import annotations


class FhirError(Exception):
    """Base class: a FHIR exchange failed."""


class FhirUnavailableError(FhirError):
    """The server could not be reached or failed on its side (connect/timeout/408/429/5xx)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class FhirRejectedError(FhirError):
    """The server answered 4xx (not 408/429); ``diagnostics``: the OperationOutcome on one line."""

    def __init__(self, message: str, *, status: int | None = None, diagnostics: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.diagnostics = diagnostics
