"""Demographics from an EHR Patient, for the fields the DICOM header lacked.

A Patient gives age (from ``birthDate``, at the *study* date, not today: a study re-scored a year
later must get the same input) and sex. It has no lesion site, so site is always missing here.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Mapping
from typing import Any

from plugin.domain import Demographics, Source, Sourced

log = logging.getLogger(__name__)

BIRTH_DATE_DETAIL = "Patient.birthDate"
GENDER_DETAIL = "Patient.gender"
# FHIR `date`: YYYY, YYYY-MM or YYYY-MM-DD (no time, no zone).
_FHIR_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")
_SEXES = {"male": "male", "female": "female"}  # 'other'/'unknown' carry no model input
MAX_AGE_YEARS = 130  # beyond this a birthDate is a placeholder (e.g. 1900-01-01), not an age


def demographics_from_patient(patient: Mapping[str, Any], on_date: dt.date) -> Demographics:
    """Age (whole years at ``on_date``) and sex from a FHIR Patient; site is missing.

    Partial birth dates are taken at the middle of the period they name (``YYYY`` → 1 July,
    ``YYYY-MM`` → the 15th): unbiased, and never more than half a year off. A birth date after
    ``on_date`` (a data error, or a partial one whose midpoint is still ahead) gives age 0 when
    the period has started by ``on_date`` and missing otherwise. As in ``dicom_io``, a malformed
    or implausible (> 130 years) ``birthDate`` is logged (without its value) and left missing:
    a bad EHR field must not stop the image from being scored.
    """
    if not isinstance(patient, Mapping) or patient.get("resourceType") != "Patient":
        raise ValueError("patient must be a FHIR Patient resource (dict)")
    if not isinstance(on_date, dt.date) or isinstance(on_date, dt.datetime):
        raise ValueError(f"on_date must be a datetime.date, got {type(on_date).__name__}")
    return Demographics(
        age=_age(patient.get("birthDate"), on_date),
        sex=_sex(patient.get("gender")),
        site=Sourced.missing(),
    )


def age_in_years(birth_date: str, on_date: dt.date) -> int | None:
    """Whole years from a FHIR ``date`` to ``on_date``; None when born after ``on_date``."""
    match = _FHIR_DATE.match(birth_date)
    if not match:
        raise ValueError(f"birthDate is not a FHIR date (YYYY[-MM[-DD]]): {birth_date!r}")
    year_text, month_text, day_text = match.groups()
    year = int(year_text)
    try:
        if month_text is None:
            start, born = dt.date(year, 1, 1), dt.date(year, 7, 1)
        elif day_text is None:
            start, born = dt.date(year, int(month_text), 1), dt.date(year, int(month_text), 15)
        else:
            start = born = dt.date(year, int(month_text), int(day_text))
    except ValueError as exc:
        raise ValueError(f"birthDate is not a valid date: {birth_date!r}") from exc
    if start > on_date:
        return None
    years = on_date.year - born.year - ((on_date.month, on_date.day) < (born.month, born.day))
    return max(years, 0)


def _age(birth_date: object, on_date: dt.date) -> Sourced:
    if birth_date is None:
        return Sourced.missing()
    try:
        if not isinstance(birth_date, str):
            raise ValueError("not a string")
        years = age_in_years(birth_date, on_date)
    except ValueError:
        log.warning("%s is malformed; age treated as missing", BIRTH_DATE_DETAIL)
        return Sourced.missing()
    if years is None or years > MAX_AGE_YEARS:
        log.warning("%s is after the study date or implausible; age missing", BIRTH_DATE_DETAIL)
        return Sourced.missing()
    return Sourced(float(years), Source.FHIR, BIRTH_DATE_DETAIL)


def _sex(gender: object) -> Sourced:
    sex = _SEXES.get(gender) if isinstance(gender, str) else None
    return Sourced(sex, Source.FHIR, GENDER_DETAIL) if sex else Sourced.missing()
