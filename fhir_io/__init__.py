"""FHIR R4 in and out: Patient lookup for missing demographics, results as a transaction Bundle.

Imports nothing from the project but ``plugin.domain``. Models are ``fhir.resources.R4B``
(EHRs speak R4); HTTP is ``httpx``.
"""

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
