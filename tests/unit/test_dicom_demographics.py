"""dicom_io.demographics: age, sex and site from the tags, each with its source and the tag it
came from; malformed values are missing and logged by tag name, never by value."""

from __future__ import annotations

import logging
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset, config, uid
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence

from dicom_io.demographics import age_from_patient_age, demographics_from_dataset
from plugin.domain import Demographics, SiteCode, Source, Sourced

SAMPLES = Path(__file__).resolve().parents[1] / "data"


def dataset(**attrs: object) -> Dataset:
    """A header as it arrives from a file: malformed values included, without pydicom's own
    validation warnings (which would put those values in the log while the test builds it)."""
    ds = Dataset()
    with config.disable_value_validation():
        for keyword, value in attrs.items():
            setattr(ds, keyword, value)
    return ds


def from_file(ds: Dataset) -> Dataset:
    """``ds`` written and read back, so values are parsed by pydicom's reader."""
    buffer = BytesIO()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    with config.disable_value_validation():
        ds.save_as(buffer, implicit_vr=False, little_endian=True)
    return pydicom.dcmread(BytesIO(buffer.getvalue()), force=True)


def region(value: str, scheme: str = "SCT", meaning: str = "") -> Sequence:
    item = dataset(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)
    return Sequence([item])


@pytest.mark.parametrize(
    ("patient_age", "years"),
    [
        ("045Y", 45.0),
        ("000Y", 0.0),
        ("018M", 1.5),
        ("026W", 26 * 7 / 365.25),
        ("010D", 10 / 365.25),
    ],
)
def test_patient_age_in_years(patient_age: str, years: float) -> None:
    demo = demographics_from_dataset(dataset(PatientAge=patient_age))
    assert demo.age == Sourced(pytest.approx(years), Source.DICOM, "PatientAge")


@pytest.mark.parametrize("bad", ["45", "45Y", "045", "045X", "0450Y", "Y045", "999Y", "abcY"])
def test_malformed_patient_age_is_missing_and_logged_by_tag_only(
    bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert age_from_patient_age(bad) is None
    with caplog.at_level(logging.DEBUG, logger="dicom_io"):
        demo = demographics_from_dataset(dataset(PatientAge=bad))
    assert demo.age == Sourced.missing()
    assert [r.getMessage() for r in caplog.records] == [
        "PatientAge is malformed; treated as missing"
    ]


def test_empty_patient_age_is_missing_without_a_log(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="dicom_io"):
        assert demographics_from_dataset(dataset(PatientAge="")) == Demographics.unknown()
    assert caplog.records == []


def test_patient_age_wins_over_birth_date() -> None:
    ds = dataset(PatientAge="044Y", PatientBirthDate="19800615", StudyDate="20250615")
    assert demographics_from_dataset(ds).age == Sourced(44.0, Source.DICOM, "PatientAge")


@pytest.mark.parametrize(
    ("dates", "years", "detail"),
    [
        ({"StudyDate": "20250615"}, 45.0, "PatientBirthDate+StudyDate"),
        ({"StudyDate": "20251215"}, 45 + 183 / 365, "PatientBirthDate+StudyDate"),
        ({"StudyDate": "20250614"}, 44 + 364 / 365, "PatientBirthDate+StudyDate"),
        ({"AcquisitionDate": "20100615"}, 30.0, "PatientBirthDate+AcquisitionDate"),
        ({"ContentDate": "20000615"}, 20.0, "PatientBirthDate+ContentDate"),
        ({"StudyDate": "", "ContentDate": "20000615"}, 20.0, "PatientBirthDate+ContentDate"),
    ],
)
def test_age_from_birth_date_and_the_first_reference_date(
    dates: dict[str, str], years: float, detail: str
) -> None:
    demo = demographics_from_dataset(dataset(PatientBirthDate="19800615", **dates))
    assert demo.age == Sourced(pytest.approx(years), Source.DICOM, detail)


def test_leap_day_birthday() -> None:
    ds = dataset(PatientBirthDate="20000229", StudyDate="20010301")
    assert demographics_from_dataset(ds).age.value == 1.0


def test_malformed_patient_age_falls_back_to_birth_date(caplog: pytest.LogCaptureFixture) -> None:
    ds = dataset(PatientAge="45", PatientBirthDate="19800615", StudyDate="20250615")
    with caplog.at_level(logging.WARNING, logger="dicom_io"):
        age = demographics_from_dataset(ds).age
    assert age == Sourced(45.0, Source.DICOM, "PatientBirthDate+StudyDate")
    assert len(caplog.records) == 1


@pytest.mark.parametrize(
    ("attrs", "tag"),
    [
        ({"PatientBirthDate": "1980-06-15", "StudyDate": "20250615"}, "PatientBirthDate"),
        ({"PatientBirthDate": "19801332", "StudyDate": "20250615"}, "PatientBirthDate"),
        ({"PatientBirthDate": "19800615", "StudyDate": "2025"}, "StudyDate"),
        ({"PatientBirthDate": "20300615", "StudyDate": "20250615"}, "PatientBirthDate"),
    ],
)
def test_unusable_dates_are_missing_and_logged_without_values(
    attrs: dict[str, str], tag: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="dicom_io"):
        demo = demographics_from_dataset(dataset(**attrs))
    assert demo.age == Sourced.missing()
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert message.startswith(tag)
    for value in attrs.values():
        assert value not in message


def test_birth_date_without_any_reference_date_is_missing() -> None:
    assert demographics_from_dataset(dataset(PatientBirthDate="19800615")).age == Sourced.missing()


def test_identifiers_never_reach_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing logs them: neither we nor pydicom's reader while we read the header."""
    ds = dataset(
        PatientName="Doe^Jane",
        PatientID="MRN-55501",
        PatientBirthDate="1980-06-15",
        PatientAge="45 years",
        PatientSex="female",
        StudyDate="20250615",
        AnatomicRegionSequence=region("99999999"),
        BodyPartExamined="ELBOWX",
    )
    ds = from_file(ds)
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        assert demographics_from_dataset(ds) == Demographics.unknown()
    logged = caplog.text
    for secret in ("Doe", "MRN-55501", "1980", "45 years", "female"):
        assert secret not in logged
    assert "99999999" in logged and "ELBOWX" in logged  # codes are not identifiers


@pytest.mark.parametrize(
    ("sex", "expected"),
    [("M", "male"), ("F", "female"), ("m", "male"), ("O", None), ("", None)],
)
def test_patient_sex(sex: str, expected: str | None) -> None:
    demo = demographics_from_dataset(dataset(PatientSex=sex))
    if expected is None:
        assert demo.sex == Sourced.missing()
    else:
        assert demo.sex == Sourced(expected, Source.DICOM, "PatientSex")


def test_malformed_patient_sex_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dicom_io"):
        assert demographics_from_dataset(dataset(PatientSex="X")).sex == Sourced.missing()
    assert [r.getMessage() for r in caplog.records] == [
        "PatientSex is malformed; treated as missing"
    ]


@pytest.mark.parametrize(
    ("code", "scheme", "meaning", "category", "site_code"),
    [
        ("77568009", "SCT", "Back", "torso", SiteCode("77568009", "Back")),
        ("61685007", "SCT", "Lower limb", "lower extremity", SiteCode("61685007", "Lower limb")),
        ("774007", "SCT", "", "head/neck", SiteCode("774007", "Head and Neck")),
        ("T-D2000", "SRT", "Trunk", "torso", SiteCode("22943007", "Trunk")),
        ("53120007", "SRT", "Upper limb", "upper extremity", SiteCode("53120007", "Upper limb")),
    ],
)
def test_anatomic_region_sequence(
    code: str, scheme: str, meaning: str, category: str, site_code: SiteCode
) -> None:
    demo = demographics_from_dataset(
        dataset(AnatomicRegionSequence=region(code, scheme, meaning), BodyPartExamined="HEAD")
    )
    assert demo.site == Sourced(category, Source.DICOM, "AnatomicRegionSequence")
    assert demo.site_code == site_code
    assert demo.finding_site_code() == site_code


def test_unmapped_region_code_falls_back_to_body_part_and_logs_the_code(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ds = dataset(AnatomicRegionSequence=region("39937001", meaning="Skin"), BodyPartExamined="LEG")
    with caplog.at_level(logging.WARNING, logger="dicom_io"):
        demo = demographics_from_dataset(ds)
    assert demo.site == Sourced("lower extremity", Source.DICOM, "BodyPartExamined")
    assert demo.site_code is None
    assert "39937001" in caplog.text


def test_region_in_another_scheme_is_not_read_as_snomed() -> None:
    ds = dataset(AnatomicRegionSequence=region("77568009", scheme="99LOCAL"))
    assert demographics_from_dataset(ds).site == Sourced.missing()


@pytest.mark.parametrize(
    ("body_part", "category"),
    [("BACK", "torso"), ("LEG", "lower extremity"), ("Upper Limb", "upper extremity")],
)
def test_body_part_examined(body_part: str, category: str) -> None:
    demo = demographics_from_dataset(dataset(BodyPartExamined=body_part))
    assert demo.site == Sourced(category, Source.DICOM, "BodyPartExamined")
    assert demo.site_code is None


def test_unmapped_body_part_is_missing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dicom_io"):
        demo = demographics_from_dataset(dataset(BodyPartExamined="SKIN"))
    assert demo.site == Sourced.missing()
    assert "SKIN" in caplog.text


def test_all_missing() -> None:
    assert demographics_from_dataset(Dataset()) == Demographics.unknown()
    empty = dataset(PatientAge="", PatientSex="", PatientBirthDate="", BodyPartExamined="")
    empty.AnatomicRegionSequence = Sequence()
    assert demographics_from_dataset(empty) == Demographics.unknown()


def test_committed_samples() -> None:
    dms = pydicom.dcmread(SAMPLES / "dms_jpeg_baseline.dcm", stop_before_pixels=True)
    assert demographics_from_dataset(dms) == Demographics(
        age=Sourced(65.0, Source.DICOM, "PatientAge"),
        sex=Sourced("male", Source.DICOM, "PatientSex"),
        site=Sourced("upper extremity", Source.DICOM, "AnatomicRegionSequence"),
        site_code=SiteCode("53120007", "Upper limb"),
    )
    vlp = pydicom.dcmread(SAMPLES / "vlp_img2dcm.dcm", stop_before_pixels=True)
    assert demographics_from_dataset(vlp) == Demographics.unknown()
