"""Demographics from the tags, completed from the EHR where the tags lack them."""

from __future__ import annotations

import logging
from dataclasses import replace
from enum import StrEnum

from plugin.domain import Demographics, Sourced

log = logging.getLogger(__name__)

AGE_TOLERANCE_YEARS = 1.0  # DICOM ages are whole years (AS), FHIR's come from a birth date


class ConflictPolicy(StrEnum):
    """Which source wins when DICOM and FHIR both have a value and disagree."""

    DICOM = "dicom"
    FHIR = "fhir"


def needs_lookup(demographics: Demographics) -> bool:
    """The EHR has age and sex, not the lesion site: ask only when one of those is missing."""
    return demographics.age.value is None or demographics.sex.value is None


def _disagree(field: str, a: Sourced, b: Sourced) -> bool:
    if a.value is None or b.value is None:
        return False
    if field == "age":
        return abs(float(a.value) - float(b.value)) > AGE_TOLERANCE_YEARS
    return a.value != b.value


def merge(
    dicom: Demographics, fhir: Demographics, policy: ConflictPolicy, instance: str
) -> Demographics:
    """Fill what DICOM lacks from FHIR; where both have a value and disagree, ``policy`` decides.

    A disagreement is logged as one line naming the field and the instance, never the values.
    """
    chosen = {}
    for field in ("age", "sex"):
        from_dicom: Sourced = getattr(dicom, field)
        from_fhir: Sourced = getattr(fhir, field)
        if _disagree(field, from_dicom, from_fhir):
            log.warning(
                "demographics conflict: %s differs between DICOM and FHIR for sop=%s; using %s",
                field,
                instance,
                policy.value,
            )
            chosen[field] = from_fhir if policy is ConflictPolicy.FHIR else from_dicom
        else:
            chosen[field] = from_dicom if from_dicom.value is not None else from_fhir
    return replace(dicom, **chosen)
