"""Age and sex from an EHR Patient: exact ages at the study date, partial dates, bad data."""

from __future__ import annotations

import datetime as dt
import logging

import pytest

from fhir_io import age_in_years, demographics_from_patient
from plugin.domain import Demographics, Source, Sourced


def _patient(**fields: str) -> dict[str, object]:
    return {"resourceType": "Patient", "id": "p1", **fields}


@pytest.mark.parametrize(
    ("birth_date", "on_date", "years"),
    [
        ("1980-06-15", dt.date(2024, 6, 14), 43),  # the day before the birthday
        ("1980-06-15", dt.date(2024, 6, 15), 44),  # on the birthday
        ("2000-02-29", dt.date(2023, 2, 28), 22),  # leap-day birthday in a common year
        ("2000-02-29", dt.date(2023, 3, 1), 23),
        ("1980-06", dt.date(2024, 6, 14), 43),  # YYYY-MM: taken as the 15th
        ("1980-06", dt.date(2024, 6, 15), 44),
        ("1980", dt.date(2024, 6, 30), 43),  # YYYY: taken as 1 July
        ("1980", dt.date(2024, 7, 1), 44),
        ("2024", dt.date(2024, 3, 1), 0),  # the birth year has begun: a baby, not missing
        ("2024-03-10", dt.date(2024, 3, 10), 0),
    ],
)
def test_age_in_whole_years_at_the_study_date(
    birth_date: str, on_date: dt.date, years: int
) -> None:
    assert age_in_years(birth_date, on_date) == years
    demo = demographics_from_patient(_patient(birthDate=birth_date), on_date)
    assert demo.age == Sourced(float(years), Source.FHIR, "Patient.birthDate")


def test_sex_from_gender_and_site_always_missing() -> None:
    demo = demographics_from_patient(
        _patient(birthDate="1970-01-01", gender="female"), dt.date(2020, 1, 1)
    )
    assert demo == Demographics(
        age=Sourced(50.0, Source.FHIR, "Patient.birthDate"),
        sex=Sourced("female", Source.FHIR, "Patient.gender"),
        site=Sourced(None, Source.MISSING, ""),
    )
    male = demographics_from_patient(_patient(gender="male"), dt.date(2020, 1, 1))
    assert male.sex == Sourced("male", Source.FHIR, "Patient.gender")
    assert male.age == Sourced.missing()


@pytest.mark.parametrize("gender", ["other", "unknown", None, 3])
def test_gender_without_a_model_value_is_missing(gender: object) -> None:
    patient = _patient() if gender is None else {**_patient(), "gender": gender}
    assert demographics_from_patient(patient, dt.date(2020, 1, 1)).sex == Sourced.missing()


@pytest.mark.parametrize(
    "birth_date",
    ["2024-03-11", "2025", "2024-04"],  # after the study date, also when partial
)
def test_birth_after_the_study_is_missing(birth_date: str) -> None:
    demo = demographics_from_patient(_patient(birthDate=birth_date), dt.date(2024, 3, 10))
    assert demo.age == Sourced.missing()


@pytest.mark.parametrize("birth_date", ["1980-13-01", "1980-02-30", "80-01-01", "1980/01/01", 1980])
def test_malformed_birth_date_is_missing_and_not_logged(
    birth_date: object, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="fhir_io")
    demo = demographics_from_patient({**_patient(), "birthDate": birth_date}, dt.date(2024, 1, 1))
    assert demo.age == Sourced.missing()
    assert "Patient.birthDate is malformed" in caplog.text
    assert str(birth_date) not in caplog.text


def test_implausible_age_is_missing() -> None:
    demo = demographics_from_patient(_patient(birthDate="1850-01-01"), dt.date(2024, 1, 1))
    assert demo.age == Sourced.missing()


def test_age_in_years_rejects_a_non_fhir_date() -> None:
    with pytest.raises(ValueError, match="birthDate"):
        age_in_years("1980-13-01", dt.date(2024, 1, 1))


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="patient"):
        demographics_from_patient({"resourceType": "Practitioner"}, dt.date(2024, 1, 1))
    with pytest.raises(ValueError, match="on_date"):
        demographics_from_patient(_patient(), dt.datetime(2024, 1, 1))  # type: ignore[arg-type]
