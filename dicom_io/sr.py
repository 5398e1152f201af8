"""TID 1500 Measurement Report (Comprehensive 3D SR) for one scored dermoscopy image.

The report holds, per source image, one TID 1501 measurement group: the melanoma probability
(DCM 111047), the decision at the operating point, the algorithm (TID 4019, family DCM 123110),
the finding site, and the demographics the model used with their sources.

The decision is coded as melanoma (SNOMED 1162635006) with a finding-context value, "Suspected"
(415684004) or "NOT suspected" (428263003), rather than as "Finding: Malignant melanoma": at a
high-sensitivity threshold many positives are benign, and a PACS shows the code meanings as is.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom import Dataset, config
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import DT, TM, validate_value

from plugin.domain import (
    Demographics,
    Finding,
    ImageRef,
    ModelIdentity,
    Source,
    derived_uid,
)

log = logging.getLogger(__name__)

PRIVATE_SCHEME = "99DERMFUSION"
PROBABILITY_OF_CANCER = Code("111047", "DCM", "Probability of cancer")
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")
MELANOMA = Code("1162635006", "SCT", "Malignant melanoma")
# The decision's values: SNOMED CT finding-context qualifiers (not a diagnosis).
SUSPECTED = Code("415684004", "SCT", "Suspected")
NOT_SUSPECTED = Code("428263003", "SCT", "NOT suspected")
EVALUATION_PROCEDURE = Code("386053000", "SCT", "Evaluation procedure")
SUBJECT_AGE = Code("121033", "DCM", "Subject Age")
SUBJECT_SEX = Code("121032", "DCM", "Subject Sex")
NO_UNITS = Code("1", "UCUM", "no units")
YEARS = Code("a", "UCUM", "year")
AREA = Code("42798000", "SCT", "Area")
DIAMETER = Code("81827009", "SCT", "Diameter")
SQUARE_MM = Code("mm2", "UCUM", "square millimeter")
MILLIMETRE = Code("mm", "UCUM", "millimeter")
LESION_AREA_FRACTION = Code("area-fraction", PRIVATE_SCHEME, "Lesion area fraction of image")
# How much each field moved the probability (with the field minus with it withheld).
ATTRIBUTION_CODES = {
    "age": Code("attr-age", PRIVATE_SCHEME, "Probability change from subject age"),
    "sex": Code("attr-sex", PRIVATE_SCHEME, "Probability change from subject sex"),
    "site": Code("attr-site", PRIVATE_SCHEME, "Probability change from lesion site"),
}
SEX_CODES = {"male": Code("M", "DCM", "Male"), "female": Code("F", "DCM", "Female")}
OPERATING_THRESHOLD = Code("threshold", PRIVATE_SCHEME, "Operating threshold")
SOURCE_CODES = {
    "age": Code("age-source", PRIVATE_SCHEME, "Source of subject age"),
    "sex": Code("sex-source", PRIVATE_SCHEME, "Source of subject sex"),
    "site": Code("site-source", PRIVATE_SCHEME, "Source of lesion site"),
}
# IHE AI Results: the algorithm in the Contributing Equipment Sequence, purpose of reference
# "Processing Algorithm" (AIR's own code, pending one in DICOM's CID 7005), and the Grad-CAM
# Secondary Capture referenced from the measurement group as a visual explanation.
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")
VISUAL_EXPLANATION = Code("130401", "DCM", "Visual explanation")
SERIES_NUMBER = 9901
MANUFACTURER = "dermfusion"


def sr_instance_uid(source: ImageRef, model: ModelIdentity) -> str:
    """Same source image and model version → same SR SOP Instance UID (so resends overwrite)."""
    return derived_uid("sr", source.sop_instance_uid, model.name, model.version)


def sr_series_uid(study_instance_uid: str, model: ModelIdentity) -> str:
    return derived_uid("series", study_instance_uid, model.name, model.version)


def _source_text(value: object, source: Source, detail: str) -> str:
    if value is None or source is Source.MISSING:
        return "missing"
    return f"{source.value}:{detail}" if detail else source.value


def _text_item(name: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


@dataclass(frozen=True)
class MeasurementReportWriter:
    """Builds the SR; ``institution_name`` etc. come from configuration, not from code."""

    manufacturer: str = MANUFACTURER
    series_number: int = SERIES_NUMBER

    def build(
        self,
        *,
        source: Dataset,
        ref: ImageRef,
        finding: Finding,
        demographics: Demographics,
        visual_explanation: Dataset | None = None,
    ) -> hd.sr.Comprehensive3DSR:
        """``source`` is the image header (no pixels needed): patient and study come from it.
        ``visual_explanation``, the Grad-CAM Secondary Capture sent with the SR, is referenced
        from the measurement group (only pass one that is sent: the reference must resolve)."""
        if not 0.0 <= finding.probability <= 1.0:
            raise ValueError(f"finding.probability {finding.probability} is outside 0..1")
        model = finding.model
        algorithm = hd.sr.AlgorithmIdentification(
            name=model.name,
            version=model.version,
            family=ARTIFICIAL_INTELLIGENCE,
            parameters=[f"threshold={finding.threshold:.6f}"],
        )
        measurements = [
            hd.sr.Measurement(
                name=PROBABILITY_OF_CANCER, value=round(finding.probability, 6), unit=NO_UNITS
            ),
            hd.sr.Measurement(
                name=OPERATING_THRESHOLD, value=round(finding.threshold, 6), unit=NO_UNITS
            ),
        ]
        for field_name, change in finding.attributions:
            measurements.append(
                hd.sr.Measurement(
                    name=ATTRIBUTION_CODES[field_name], value=round(change, 6), unit=NO_UNITS
                )
            )
        if finding.lesion is not None:
            lesion = finding.lesion
            measurements.append(
                hd.sr.Measurement(
                    name=LESION_AREA_FRACTION, value=round(lesion.area_fraction, 6), unit=NO_UNITS
                )
            )
            if lesion.area_mm2 is not None:
                measurements.append(
                    hd.sr.Measurement(name=AREA, value=round(lesion.area_mm2, 3), unit=SQUARE_MM)
                )
            if lesion.diameter_mm is not None:
                measurements.append(
                    hd.sr.Measurement(
                        name=DIAMETER, value=round(lesion.diameter_mm, 3), unit=MILLIMETRE
                    )
                )
        if demographics.age.value is not None:
            measurements.append(
                hd.sr.Measurement(name=SUBJECT_AGE, value=float(demographics.age.value), unit=YEARS)
            )
        evaluations = [
            hd.sr.QualitativeEvaluation(
                name=MELANOMA, value=SUSPECTED if finding.melanoma_suspected else NOT_SUSPECTED
            )
        ]
        if demographics.sex.value in SEX_CODES:
            evaluations.append(
                hd.sr.QualitativeEvaluation(
                    name=SUBJECT_SEX, value=SEX_CODES[str(demographics.sex.value)]
                )
            )
        site_code = demographics.finding_site_code()
        finding_sites = (
            [
                hd.sr.FindingSite(
                    anatomic_location=CodedConcept(
                        site_code.value, site_code.scheme, site_code.meaning
                    )
                )
            ]
            if site_code is not None
            else None
        )
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid("tracking", ref.sop_instance_uid),
                identifier="melanoma risk",
            ),
            algorithm_id=algorithm,
            finding_sites=finding_sites,
            measurements=measurements,
            qualitative_evaluations=evaluations,
            source_images=[
                hd.sr.SourceImageForMeasurementGroup(
                    referenced_sop_class_uid=ref.sop_class_uid,
                    referenced_sop_instance_uid=ref.sop_instance_uid,
                )
            ],
        )
        container = group[0]
        if visual_explanation is not None:
            container.ContentSequence.append(
                hd.sr.ImageContentItem(
                    name=VISUAL_EXPLANATION,
                    referenced_sop_class_uid=visual_explanation.SOPClassUID,
                    referenced_sop_instance_uid=visual_explanation.SOPInstanceUID,
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
            )
        for field, sourced in (
            ("age", demographics.age),
            ("sex", demographics.sex),
            ("site", demographics.site),
        ):
            container.ContentSequence.append(
                _text_item(
                    SOURCE_CODES[field], _source_text(sourced.value, sourced.source, sourced.detail)
                )
            )
        observation_context = hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.cid270.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=model.device_uid,
                    name=model.name,
                    manufacturer_name=self.manufacturer,
                    model_name=f"{model.name} {model.version}",
                ),
            )
        )
        report = hd.sr.MeasurementReport(
            observation_context=observation_context,
            procedure_reported=EVALUATION_PROCEDURE,
            imaging_measurements=[group],
        )
        evidence = [copyable_header(source)]
        if visual_explanation is not None:
            evidence.append(visual_explanation)
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report[0],
            series_instance_uid=sr_series_uid(ref.study_instance_uid, model),
            series_number=self.series_number,
            sop_instance_uid=sr_instance_uid(ref, model),
            instance_number=1,
            manufacturer=self.manufacturer,
            is_complete=True,
            is_final=True,
            series_description=f"{model.name} {model.version} melanoma risk",
        )
        sr.CodingSchemeIdentificationSequence = [_private_scheme(), _ihe_scheme()]
        sr.ContributingEquipmentSequence = [algorithm_equipment(model, self.manufacturer)]
        return sr


def algorithm_equipment(model: ModelIdentity, manufacturer: str = MANUFACTURER) -> Dataset:
    """The algorithm as an item of the Contributing Equipment Sequence (IHE AIR)."""
    item = Dataset()
    purpose = Dataset()
    purpose.CodeValue = PROCESSING_ALGORITHM.value
    purpose.CodingSchemeDesignator = PROCESSING_ALGORITHM.scheme_designator
    purpose.CodeMeaning = PROCESSING_ALGORITHM.meaning
    item.PurposeOfReferenceCodeSequence = [purpose]
    item.Manufacturer = manufacturer
    item.ManufacturerModelName = model.name[:64]
    item.SoftwareVersions = model.version[:64]
    item.DeviceUID = model.device_uid
    item.ContributionDescription = "Melanoma probability from dermoscopy and demographics (AI)"
    return item


# Type 2 Patient and Study attributes highdicom copies into the SR: present (maybe empty) in a
# conformant image, but a non-conformant sender may leave them out entirely, or send values
# highdicom refuses (a birth date of 19700230, a sex of X, a name with a line break).
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
# VRs whose values are checked before the header is copied into a report (highdicom copies
# every Patient and Study module attribute present, and refuses a malformed one).
_CHECKED_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UI"})
_FREE_TEXT_VRS = frozenset({"LT", "ST", "UT"})
# Control characters: none in short strings (ESC introduces ISO 2022 escapes); free text may
# also hold TAB, LF, FF and CR.
_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")
_FREE_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")


def copyable_header(source: Dataset) -> Dataset:
    """The source header made safe to copy into the SR (or SC): every absent type 2 attribute
    added empty, every malformed value emptied (type 2) or dropped (others) and named in one log
    line, never quoted. A bad header value costs that field, not the report."""
    fixes: dict[str, Any] = {keyword: None for keyword in _TYPE2_COPIED if keyword not in source}
    malformed = [
        keyword for keyword in _top_level_keywords(source) if not _valid_copy(source, keyword)
    ]
    for keyword in malformed:
        fixes[keyword] = None if keyword in _TYPE2_COPIED else _DROP
    if not fixes:
        return source
    if malformed:
        log.warning(
            "sop=%s: malformed %s left out of the report",
            source.get("SOPInstanceUID", "(none)"),
            ", ".join(malformed),
        )
    completed = copy.deepcopy(source)
    for keyword, value in fixes.items():
        if keyword in completed:
            del completed[keyword]
        if value is not _DROP:
            setattr(completed, keyword, value)
    return completed


_DROP = object()


def _top_level_keywords(source: Dataset) -> list[str]:
    """Keywords of the public, non-sequence elements (what a report may copy)."""
    out = []
    for tag in source.keys():  # noqa: SIM118 - tags, without converting raw elements
        if tag.is_private or tag.group == 0x0002:
            continue
        keyword = keyword_for_tag(tag)
        if keyword:
            out.append(keyword)
    return out


def _valid_copy(source: Dataset, keyword: str) -> bool:
    try:
        element = source[keyword]
        vr = dictionary_VR(keyword)
        if vr not in _CHECKED_VRS | _FREE_TEXT_VRS:
            return True  # sequences, binary and numeric values: not copied as text
        if vr != element.VR:
            return False  # a VR the dictionary does not give it (a damaged explicit VR)
        value = element.value
        if value is None or value == "":
            return True
        values = list(value) if element.VM > 1 else [value]
        if keyword in _TYPE2_COPIED and len(values) != 1:
            return False
        for item in values:
            text = str(item)
            validate_value(vr, text, config.RAISE)
            if (_FREE_TEXT_CONTROL if vr in _FREE_TEXT_VRS else _CONTROL).search(text):
                return False
            if vr == "DA":
                datetime.strptime(text, "%Y%m%d")
            elif vr == "TM":
                TM(text)
            elif vr == "DT":
                DT(text)
        if keyword == "PatientSex":
            return str(value) in ("M", "F", "O")
    except Exception:  # noqa: BLE001 - whatever a malformed value raises, it is malformed
        return False
    return True


def _ihe_scheme() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = PROCESSING_ALGORITHM.scheme_designator
    item.CodingSchemeName = "IHE temporary codes"
    item.CodingSchemeResponsibleOrganization = "IHE"
    return item


def _private_scheme() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "dermfusion local codes"
    item.CodingSchemeResponsibleOrganization = "dermfusion"
    return item


@dataclass(frozen=True)
class ReportedFinding:
    """What our SR says, parsed back (for tests and for operators checking a PACS)."""

    probability: float
    threshold: float
    melanoma_suspected: bool
    algorithm_name: str
    algorithm_version: str
    age: float | None
    sex: str | None
    site_code: str | None
    sources: dict[str, str]
    source_sop_instance_uid: str
    attributions: dict[str, float]
    lesion_area_fraction: float | None
    lesion_area_mm2: float | None
    device_uid: str | None = None  # the algorithm's, from the Contributing Equipment Sequence
    visual_explanation_uid: str | None = None  # the Grad-CAM Secondary Capture, when referenced


def _walk(items: Dataset | list[Dataset]):  # type: ignore[no-untyped-def]
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def _name(item: Dataset) -> tuple[str, str]:
    concept = item.ConceptNameCodeSequence[0]
    return concept.CodeValue, concept.CodingSchemeDesignator


def read_reported_finding(sr: Dataset) -> ReportedFinding:
    """Parse the first measurement group of one of our SRs."""
    values: dict[tuple[str, str], Dataset] = {}
    for item in _walk(sr.ContentSequence):
        if "ConceptNameCodeSequence" in item:
            values.setdefault(_name(item), item)

    def num(code: Code) -> float | None:
        item = values.get((code.value, code.scheme_designator))
        return None if item is None else float(item.MeasuredValueSequence[0].NumericValue)

    def coded(code: Code) -> str | None:
        item = values.get((code.value, code.scheme_designator))
        return None if item is None else str(item.ConceptCodeSequence[0].CodeValue)

    def text(code: Code) -> str:
        return str(values[(code.value, code.scheme_designator)].TextValue)

    probability = num(PROBABILITY_OF_CANCER)
    threshold = num(OPERATING_THRESHOLD)
    if probability is None or threshold is None:
        raise ValueError("SR has no probability of cancer (DCM 111047) or no operating threshold")
    decision = coded(MELANOMA)
    if decision not in (SUSPECTED.value, NOT_SUSPECTED.value):
        # Refuse rather than read an unknown or older coding as "not suspected".
        raise ValueError(f"SR has no melanoma decision (SCT 1162635006 = {decision!r})")
    sex_code = coded(SUBJECT_SEX)
    site = values.get(("363698007", "SCT"))  # Finding Site
    images = [i for i in _walk(sr.ContentSequence) if i.ValueType == "IMAGE"]
    explanation = values.get((VISUAL_EXPLANATION.value, VISUAL_EXPLANATION.scheme_designator))
    source_image = next(i for i in images if i is not explanation)
    equipment = [
        item
        for item in sr.get("ContributingEquipmentSequence", [])
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == PROCESSING_ALGORITHM.value
    ]
    return ReportedFinding(
        probability=probability,
        threshold=threshold,
        melanoma_suspected=decision == SUSPECTED.value,
        algorithm_name=str(values[("111001", "DCM")].TextValue),
        algorithm_version=str(values[("111003", "DCM")].TextValue),
        age=num(SUBJECT_AGE),
        sex={"M": "male", "F": "female"}.get(sex_code or ""),
        site_code=None if site is None else str(site.ConceptCodeSequence[0].CodeValue),
        sources={field: text(code) for field, code in SOURCE_CODES.items()},
        source_sop_instance_uid=str(source_image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID),
        attributions={
            field_name: value
            for field_name, code in ATTRIBUTION_CODES.items()
            if (value := num(code)) is not None
        },
        lesion_area_fraction=num(LESION_AREA_FRACTION),
        lesion_area_mm2=num(AREA),
        device_uid=str(equipment[0].DeviceUID) if equipment else None,
        visual_explanation_uid=None
        if explanation is None
        else str(explanation.ReferencedSOPSequence[0].ReferencedSOPInstanceUID),
    )
