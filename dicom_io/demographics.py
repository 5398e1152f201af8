"""Age, sex and lesion site from an image's DICOM header, each with where it came from.

A value that is malformed is treated as missing (FHIR may still supply it) and logged once per
instance by tag name only: patient attributes are identifiers, so their values never reach a log.
Anatomic codes are not identifiers, so an unmapped code is logged with its value.
"""

from __future__ import annotations

import datetime as dt
import logging
import re

from pydicom import Dataset

from plugin.domain import (
    SNOMED,
    SNOMED_SITES,
    Demographics,
    SiteCode,
    Source,
    Sourced,
    site_from_body_part,
    site_from_snomed,
)

try:  # SNOMED RT ("SRT", retired) -> SNOMED CT concept ids, shipped with pydicom.
    from pydicom.sr.coding import snomed_mapping as _SNOMED_MAPPING
except ImportError:  # pragma: no cover - a pydicom without the table: SRT codes stay unmapped
    _SNOMED_MAPPING = {}

__all__ = ["demographics_from_dataset", "age_from_patient_age"]

log = logging.getLogger(__name__)

_AGE = re.compile(r"^(\d{3})([DWMY])$")
_DAYS_PER_YEAR = 365.25
_PER_YEAR = {"D": _DAYS_PER_YEAR, "W": _DAYS_PER_YEAR / 7, "M": 12.0, "Y": 1.0}
_MAX_AGE_YEARS = 130.0
_SEX = {"M": "male", "F": "female"}
# A birth date is combined with the first of these that the instance has.
_REFERENCE_DATES = ("StudyDate", "AcquisitionDate", "ContentDate")
_LEGACY_SNOMED = "SRT"


def demographics_from_dataset(ds: Dataset) -> Demographics:
    """Demographics from the header; anything absent or unusable is ``Sourced.missing()``."""
    site, site_code = _site(ds)
    return Demographics(age=_age(ds), sex=_sex(ds), site=site, site_code=site_code)


def age_from_patient_age(value: str) -> float | None:
    """PatientAge (VR AS, e.g. ``045Y``, ``018M``) in years; None if it is not a valid AS."""
    match = _AGE.match(value.strip())
    if match is None:
        return None
    years = int(match.group(1)) / _PER_YEAR[match.group(2)]
    return years if years <= _MAX_AGE_YEARS else None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _malformed(keyword: str, why: str = "malformed") -> None:
    log.warning("%s is %s; treated as missing", keyword, why)


def _age(ds: Dataset) -> Sourced:
    raw = _text(ds, "PatientAge")
    if raw:
        years = age_from_patient_age(raw)
        if years is not None:
            return Sourced(years, Source.DICOM, "PatientAge")
        _malformed("PatientAge")
    birth_raw = _text(ds, "PatientBirthDate")
    if not birth_raw:
        return Sourced.missing()
    birth = _date(birth_raw)
    if birth is None:
        _malformed("PatientBirthDate")
        return Sourced.missing()
    for keyword in _REFERENCE_DATES:
        ref_raw = _text(ds, keyword)
        if not ref_raw:
            continue
        ref = _date(ref_raw)
        if ref is None:
            _malformed(keyword)
            continue
        years = _years_between(birth, ref)
        if not 0.0 <= years <= _MAX_AGE_YEARS:
            _malformed("PatientBirthDate", f"inconsistent with {keyword}")
            return Sourced.missing()
        return Sourced(years, Source.DICOM, f"PatientBirthDate+{keyword}")
    return Sourced.missing()


def _years_between(birth: dt.date, ref: dt.date) -> float:
    """Age in years: completed years plus the elapsed fraction of the current year of life.

    Exact on birthdays (so it agrees with an AS ``045Y`` written the same day); negative when
    ``ref`` precedes ``birth``.
    """
    if ref < birth:
        return (ref - birth).days / _DAYS_PER_YEAR
    years = ref.year - birth.year - ((ref.month, ref.day) < (birth.month, birth.day))
    last = _anniversary(birth, birth.year + years)
    following = _anniversary(birth, birth.year + years + 1)
    return years + (ref - last).days / (following - last).days


def _anniversary(birth: dt.date, year: int) -> dt.date:
    """Birthday in ``year``; 29 February falls on 1 March in common years."""
    try:
        return birth.replace(year=year)
    except ValueError:
        return dt.date(year, 3, 1)


def _date(value: str) -> dt.date | None:
    """VR DA (YYYYMMDD), and the ACR-NEMA YYYY.MM.DD some old devices still write."""
    for fmt in ("%Y%m%d", "%Y.%m.%d"):
        try:
            return dt.datetime.strptime(value, fmt).date()
        except ValueError:
            continue
    return None


def _sex(ds: Dataset) -> Sourced:
    raw = _text(ds, "PatientSex").upper()
    if raw in _SEX:
        return Sourced(_SEX[raw], Source.DICOM, "PatientSex")
    if raw not in ("", "O"):
        _malformed("PatientSex")
    return Sourced.missing()


def _site(ds: Dataset) -> tuple[Sourced, SiteCode | None]:
    regions = ds.get("AnatomicRegionSequence")
    if regions:
        item = regions[0]
        scheme = _text(item, "CodingSchemeDesignator").upper()
        value = _text(item, "CodeValue")
        meaning = _text(item, "CodeMeaning")
        if scheme == _LEGACY_SNOMED:
            value = _SNOMED_MAPPING.get(_LEGACY_SNOMED, {}).get(value, value)
            scheme = SNOMED
        if scheme == SNOMED and value:
            category = site_from_snomed(value)
            if category is not None:
                meaning = meaning or SNOMED_SITES[value][0]
                return (
                    Sourced(category, Source.DICOM, "AnatomicRegionSequence"),
                    SiteCode(value, meaning),
                )
        log.warning(
            "AnatomicRegionSequence code (%s, %s) has no site category; trying BodyPartExamined",
            value or "-",
            scheme or "-",
        )
    body_part = _text(ds, "BodyPartExamined")
    if body_part:
        category = site_from_body_part(body_part)
        if category is not None:
            return Sourced(category, Source.DICOM, "BodyPartExamined"), None
        log.warning("BodyPartExamined %s has no site category", body_part)
    return Sourced.missing(), None
