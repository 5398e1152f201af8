"""FHIR R4 in and out: Patient lookup for missing demographics, results as a transaction Bundle.

Imports nothing from the project but ``plugin.domain``. Models are ``fhir.resources.R4B``
(EHRs speak R4); HTTP is ``httpx``. The re-exports are resolved on first use (PEP 562): the
client does not load the FHIR models, the report builders do not load httpx, and importing
``fhir_io`` alone loads neither.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the names below resolve to, for type checkers and readers
    from fhir_io._exceptions import FhirError, FhirRejectedError, FhirUnavailableError
    from fhir_io._search import identifier_token
    from fhir_io.client import FhirClient
    from fhir_io.patients import age_in_years, demographics_from_patient
    from fhir_io.reports import (
        REPORT_IDENTIFIER_SYSTEM,
        SOURCE_EXTENSION,
        STUDY_UID_SYSTEM,
        conclusion_text,
        device_identifier,
        report_bundle,
        report_identifier,
        subject_identifier,
        with_subject,
    )

# exported name -> the submodule that defines it
_EXPORTS = {
    "FhirError": "fhir_io._exceptions",
    "FhirRejectedError": "fhir_io._exceptions",
    "FhirUnavailableError": "fhir_io._exceptions",
    "identifier_token": "fhir_io._search",
    "FhirClient": "fhir_io.client",
    "age_in_years": "fhir_io.patients",
    "demographics_from_patient": "fhir_io.patients",
    "REPORT_IDENTIFIER_SYSTEM": "fhir_io.reports",
    "SOURCE_EXTENSION": "fhir_io.reports",
    "STUDY_UID_SYSTEM": "fhir_io.reports",
    "conclusion_text": "fhir_io.reports",
    "device_identifier": "fhir_io.reports",
    "report_bundle": "fhir_io.reports",
    "report_identifier": "fhir_io.reports",
    "subject_identifier": "fhir_io.reports",
    "with_subject": "fhir_io.reports",
}
# submodules that ``import fhir_io`` used to load, still reachable as attributes of the package
_SUBMODULES = frozenset({"_exceptions", "_search", "client", "patients", "reports"})

__all__ = [
    "REPORT_IDENTIFIER_SYSTEM",
    "SOURCE_EXTENSION",
    "STUDY_UID_SYSTEM",
    "FhirClient",
    "FhirError",
    "FhirRejectedError",
    "FhirUnavailableError",
    "age_in_years",
    "conclusion_text",
    "demographics_from_patient",
    "identifier_token",
    "device_identifier",
    "report_bundle",
    "report_identifier",
    "subject_identifier",
    "with_subject",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})
