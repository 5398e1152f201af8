import logging

import pytest

from plugin.demographics import ConflictPolicy, merge, needs_lookup
from plugin.domain import Demographics, Source, Sourced


def _dicom(age: float | None, sex: str | None) -> Demographics:
    def s(v: object, tag: str) -> Sourced:
        return Sourced(v, Source.DICOM, tag) if v is not None else Sourced.missing()

    return Demographics(s(age, "PatientAge"), s(sex, "PatientSex"), s("torso", "BodyPartExamined"))


FHIR = Demographics(
    Sourced(52.0, Source.FHIR, "Patient.birthDate"),
    Sourced("female", Source.FHIR, "Patient.gender"),
    Sourced.missing(),
)


def test_fhir_fills_only_what_the_tags_lack() -> None:
    merged = merge(_dicom(None, "female"), FHIR, ConflictPolicy.DICOM, "1.2")
    assert merged.age == FHIR.age
    assert merged.sex.source is Source.DICOM
    assert merged.site.value == "torso" and merged.site.source is Source.DICOM


@pytest.mark.parametrize(
    ("policy", "winner"), [(ConflictPolicy.DICOM, Source.DICOM), (ConflictPolicy.FHIR, Source.FHIR)]
)
def test_conflict_is_logged_and_the_policy_decides(
    policy: ConflictPolicy, winner: Source, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        merged = merge(_dicom(None, "male"), FHIR, policy, "1.2.3")
    assert merged.sex.source is winner
    (record,) = caplog.records
    assert "sex differs" in record.getMessage() and "1.2.3" in record.getMessage()
    assert "male" not in record.getMessage()


def test_ages_within_a_year_agree_and_lookup_only_when_needed() -> None:
    merged = merge(_dicom(52.6, None), FHIR, ConflictPolicy.FHIR, "1")
    assert merged.age.source is Source.DICOM  # no conflict: DICOM kept
    assert not needs_lookup(_dicom(40, "male"))
    assert needs_lookup(_dicom(None, "male")) and needs_lookup(_dicom(40, None))
