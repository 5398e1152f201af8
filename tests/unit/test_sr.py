"""The SR writer against its own reader, with pydicom's value validation turned to errors."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import config

from dicom_io.images import read_image
from dicom_io.sr import MeasurementReportWriter, read_reported_finding, sr_instance_uid
from plugin.domain import Demographics, Finding, ModelIdentity, SiteCode, Source, Sourced
from tests.conftest import SAMPLES, dciodvfy_errors

MODEL = ModelIdentity("dermfusion test model", "9.9.9")


@pytest.fixture(autouse=True)
def _strict_values() -> Iterator[None]:
    """Writes validated strictly; reads not validated, as in the service (dicom_io.redaction:
    pydicom's read warnings quote the values)."""
    before = config.settings.writing_validation_mode, config.settings.reading_validation_mode
    config.settings.writing_validation_mode = config.RAISE
    config.settings.reading_validation_mode = config.IGNORE
    yield
    config.settings.writing_validation_mode, config.settings.reading_validation_mode = before


def _demographics() -> Demographics:
    return Demographics(
        age=Sourced(63.0, Source.FHIR, "Patient.birthDate"),
        sex=Sourced("female", Source.DICOM, "PatientSex"),
        site=Sourced("palms/soles", Source.DICOM, "AnatomicRegionSequence"),
        site_code=SiteCode("57999000", "Sole of foot"),
    )


def _items(items: pydicom.Sequence) -> Iterator[pydicom.Dataset]:
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _items(item.ContentSequence)


def _decision(sr: pydicom.Dataset) -> pydicom.Dataset:
    """The one CODE item whose concept name is melanoma (SNOMED 1162635006)."""
    (item,) = [
        i
        for i in _items(sr.ContentSequence)
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "1162635006"
    ]
    return item


def _build(probability: float, demographics: Demographics) -> pydicom.Dataset:
    image = read_image(SAMPLES / "dms_jpeg_baseline.dcm")
    return MeasurementReportWriter().build(
        source=image.dataset,
        ref=image.ref,
        finding=Finding(probability, 0.25, MODEL),
        demographics=demographics,
    )


def test_round_trip_of_everything_the_report_says(tmp_path: Path) -> None:
    sr = _build(0.8125, _demographics())
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    back = read_reported_finding(pydicom.dcmread(path))
    source = pydicom.dcmread(SAMPLES / "dms_jpeg_baseline.dcm", stop_before_pixels=True)
    assert back.probability == 0.8125 and back.threshold == 0.25 and back.melanoma_suspected
    assert (back.algorithm_name, back.algorithm_version) == (MODEL.name, MODEL.version)
    assert (back.age, back.sex, back.site_code) == (63.0, "female", "57999000")
    assert back.sources == {
        "age": "fhir:Patient.birthDate",
        "sex": "dicom:PatientSex",
        "site": "dicom:AnatomicRegionSequence",
    }
    assert back.source_sop_instance_uid == source.SOPInstanceUID
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == source.PatientID
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert dciodvfy_errors(path) == []


@pytest.mark.parametrize(
    ("probability", "value", "meaning"),
    [
        (0.8125, "415684004", "Suspected"),
        (0.25, "415684004", "Suspected"),  # == threshold
        (math.nextafter(0.25, 0.0), "428263003", "NOT suspected"),
        (0.1, "428263003", "NOT suspected"),
    ],
)
def test_decision_reads_as_a_suspicion_not_a_diagnosis(
    probability: float, value: str, meaning: str
) -> None:
    sr = _build(probability, _demographics())
    item = _decision(sr)
    name, coded = item.ConceptNameCodeSequence[0], item.ConceptCodeSequence[0]
    assert (name.CodingSchemeDesignator, name.CodeMeaning) == ("SCT", "Malignant melanoma")
    assert (coded.CodingSchemeDesignator, coded.CodeValue, coded.CodeMeaning) == (
        "SCT",
        value,
        meaning,
    )
    assert item.RelationshipType == "CONTAINS"
    # Nowhere is melanoma the value of a finding (the old "Finding: Malignant melanoma").
    assert not [
        i
        for i in _items(sr.ContentSequence)
        if i.ValueType == "CODE" and i.ConceptCodeSequence[0].CodeValue == "1162635006"
    ]
    assert read_reported_finding(sr).melanoma_suspected == (meaning == "Suspected")


def test_reader_refuses_an_sr_without_a_known_decision() -> None:
    sr = _build(0.8125, _demographics())
    old_style = _decision(sr)  # rewritten to the old "Finding: Malignant melanoma"
    name, value = old_style.ConceptNameCodeSequence[0], old_style.ConceptCodeSequence[0]
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121071", "DCM", "Finding"
    value.CodeValue, value.CodeMeaning = "1162635006", "Malignant melanoma"
    with pytest.raises(ValueError, match="no melanoma decision"):
        read_reported_finding(sr)


def test_below_threshold_is_negative_and_missing_fields_say_so() -> None:
    back = read_reported_finding(_build(0.1, Demographics.unknown()))
    assert not back.melanoma_suspected
    assert (back.age, back.sex, back.site_code) == (None, None, None)
    assert back.sources == {"age": "missing", "sex": "missing", "site": "missing"}


def test_sr_uid_is_stable_per_source_image_and_model_version() -> None:
    first, second = _build(0.5, _demographics()), _build(0.6, Demographics.unknown())
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    image = read_image(SAMPLES / "dms_jpeg_baseline.dcm")
    newer = ModelIdentity(MODEL.name, "10.0.0")
    assert sr_instance_uid(image.ref, newer) != first.SOPInstanceUID
    assert len(first.SOPInstanceUID) <= 64


def test_probability_outside_0_1_is_refused() -> None:
    with pytest.raises(ValueError, match="finding.probability"):
        _build(1.5, _demographics())


def test_source_without_type2_patient_attributes_still_gives_a_valid_sr(tmp_path: Path) -> None:
    image = read_image(SAMPLES / "dms_jpeg_baseline.dcm")
    header = image.dataset
    for keyword in ("PatientSex", "PatientBirthDate", "StudyID", "AccessionNumber"):
        if keyword in header:
            delattr(header, keyword)
    sr = MeasurementReportWriter().build(
        source=header,
        ref=image.ref,
        finding=Finding(0.3, 0.25, MODEL),
        demographics=Demographics.unknown(),
    )
    assert "PatientSex" in sr and not sr.PatientSex and "PatientSex" not in header
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []


MARKER = "Zqmarker"  # in every malformed value below: the log must never quote it


@pytest.mark.parametrize(
    ("keyword", "value", "dropped"),
    [
        ("PatientBirthDate", "19700230", False),  # the right shape, not a date
        ("PatientBirthDate", "1970XX01", False),
        ("PatientSex", "X", False),
        ("PatientName", f"{MARKER}^Line\r\nbreak", False),
        ("PatientID", f"{MARKER}-" + "9" * 80, False),  # longer than LO allows
        ("StudyDate", "2024XX16", False),
        ("StudyTime", "25XX", False),
        ("AccessionNumber", f"{MARKER}-far-too-long-for-SH", False),
        ("PatientAge", "0X5Y", True),  # not type 2: left out rather than emptied
        ("PatientComments", f"{MARKER}\x00nul", True),
    ],
)
def test_a_malformed_header_value_costs_the_field_not_the_report(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, keyword: str, value: str, dropped: bool
) -> None:
    image = read_image(SAMPLES / "dms_jpeg_baseline.dcm")
    header = image.dataset
    with config.disable_value_validation():
        setattr(header, keyword, value)
    with caplog.at_level(logging.WARNING, logger="dicom_io.sr"):
        sr = MeasurementReportWriter().build(
            source=header,
            ref=image.ref,
            finding=Finding(0.3, 0.25, MODEL),
            demographics=Demographics.unknown(),
        )
    assert (keyword not in sr) if dropped else (keyword in sr and not sr[keyword].value)
    assert str(header[keyword].value) == value  # the source header is left as received
    assert caplog.messages == [
        f"sop={image.ref.sop_instance_uid}: malformed {keyword} left out of the report"
    ]
    assert MARKER not in caplog.text and value not in caplog.text
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []


def test_a_well_formed_header_is_copied_as_is(caplog: pytest.LogCaptureFixture) -> None:
    image = read_image(SAMPLES / "dms_jpeg_baseline.dcm")
    with caplog.at_level(logging.WARNING, logger="dicom_io.sr"):
        sr = _build(0.3, _demographics())
    assert caplog.messages == []
    for keyword in ("PatientName", "PatientID", "StudyDate", "StudyInstanceUID"):
        assert sr[keyword].value == image.dataset[keyword].value
