"""The transaction Bundle: exact shape, R4 validity, idempotent identities, input checks."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any
from urllib.parse import parse_qsl

import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle

from fhir_io import report_bundle, subject_identifier, with_subject
from plugin.domain import (
    Demographics,
    Finding,
    ImageRef,
    ModelIdentity,
    SiteCode,
    Source,
    Sourced,
)

MODEL = ModelIdentity("fusionnet", "1.2.0")
IMAGE = ImageRef(
    study_instance_uid="1.2.826.0.1.3680043.8.498.1",
    series_instance_uid="1.2.826.0.1.3680043.8.498.2",
    sop_instance_uid="1.2.826.0.1.3680043.8.498.3",
    sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.7",
)
DEMOGRAPHICS = Demographics(
    age=Sourced(45.0, Source.DICOM, "PatientAge"),
    sex=Sourced("female", Source.FHIR, "Patient.gender"),
    site=Sourced("torso", Source.DICOM, "AnatomicRegionSequence"),
    site_code=SiteCode("77568009", "Back"),
)
ISSUED = dt.datetime(2024, 5, 6, 9, 8, 7, tzinfo=dt.timezone(dt.timedelta(hours=2)))
PATIENT_SYSTEM = "urn:oid:1.2.3.4.5.1"
REPORT_KEY = f"{IMAGE.sop_instance_uid}:fusionnet:1.2.0"

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SCT = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
AIAST = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
SOURCE_URL = "urn:dermfusion:fhir:StructureDefinition:input-source"
UNKNOWN = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
            "code": "unknown",
            "display": "Unknown",
        }
    ]
}
AGE_CODE = {
    "coding": [
        {"system": DCM, "code": "121033", "display": "Subject Age"},
        {"system": LOINC, "code": "30525-0", "display": "Age"},
    ]
}
SEX_CODE = {
    "coding": [
        {"system": DCM, "code": "121032", "display": "Subject Sex"},
        {"system": LOINC, "code": "46098-0", "display": "Sex"},
    ]
}
SITE_CODE = {"coding": [{"system": SCT, "code": "363698007", "display": "Finding site"}]}


def _urn(system: str, value: str) -> str:
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, "urn:dermfusion:fhir")
    return f"urn:uuid:{uuid.uuid5(namespace, f'{system}|{value}')}"


def _build(
    probability: float = 0.83,
    threshold: float = 0.5,
    demographics: Demographics = DEMOGRAPHICS,
    patient_id: str | None = "MRN-4711",
    **overrides: Any,
) -> dict[str, Any]:
    args: dict[str, Any] = {
        "finding": Finding(probability, threshold, MODEL),
        "demographics": demographics,
        "image": IMAGE,
        "patient_id": patient_id,
        "patient_identifier_system": PATIENT_SYSTEM,
        "issued": ISSUED,
        **overrides,
    }
    return report_bundle(**args)


def _by_type(bundle: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for entry in bundle["entry"]:
        out.setdefault(entry["resource"]["resourceType"], []).append(entry)
    return out


SUBJECT = {"identifier": {"system": PATIENT_SYSTEM, "value": "MRN-4711"}, "type": "Patient"}
DEVICE_UID = MODEL.device_uid
DEVICE_URN = _urn("urn:dicom:uid", f"urn:oid:{DEVICE_UID}")
PROVENANCE_URN = _urn("urn:dermfusion:provenance", REPORT_KEY)
PROBABILITY_URN = _urn("urn:dermfusion:observation", f"{REPORT_KEY}:probability")
DECISION_URN = _urn("urn:dermfusion:observation", f"{REPORT_KEY}:decision")
REPORT_URN = _urn("urn:dermfusion:report", REPORT_KEY)


def test_bundle_is_a_valid_r4_transaction_of_conditional_creates() -> None:
    bundle = _build()
    Bundle.model_validate(bundle)  # R4B models reject R5-only elements such as .note
    for entry in bundle["entry"]:
        resource = entry["resource"]
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "transaction"
    assert [(e["fullUrl"], e["request"]) for e in bundle["entry"]] == [
        (
            DEVICE_URN,
            {
                "method": "POST",
                "url": "Device",
                "ifNoneExist": f"identifier=urn%3Adicom%3Auid%7Curn%3Aoid%3A{DEVICE_UID}",
            },
        ),
        (
            PROBABILITY_URN,
            {
                "method": "POST",
                "url": "Observation",
                "ifNoneExist": "identifier=urn%3Adermfusion%3Aobservation%7C"
                "1.2.826.0.1.3680043.8.498.3%3Afusionnet%3A1.2.0%3Aprobability",
            },
        ),
        (
            DECISION_URN,
            {
                "method": "POST",
                "url": "Observation",
                "ifNoneExist": "identifier=urn%3Adermfusion%3Aobservation%7C"
                "1.2.826.0.1.3680043.8.498.3%3Afusionnet%3A1.2.0%3Adecision",
            },
        ),
        (
            REPORT_URN,
            {
                "method": "POST",
                "url": "DiagnosticReport",
                "ifNoneExist": "identifier=urn%3Adermfusion%3Areport%7C"
                "1.2.826.0.1.3680043.8.498.3%3Afusionnet%3A1.2.0",
            },
        ),
        (
            PROVENANCE_URN,
            {
                "method": "POST",
                "url": "Provenance",
                "ifNoneExist": "_tag=urn%3Adermfusion%3Aprovenance%7C"
                "1.2.826.0.1.3680043.8.498.3%3Afusionnet%3A1.2.0",
            },
        ),
    ]
    # Each ifNoneExist names exactly the entry's first identifier (the Provenance, which has
    # none in R4, its first tag).
    for entry in bundle["entry"]:
        ((key, token),) = parse_qsl(entry["request"]["ifNoneExist"])
        resource = entry["resource"]
        if resource["resourceType"] == "Provenance":
            first = resource["meta"]["tag"][0]
            assert (key, token) == ("_tag", f"{first['system']}|{first['code']}")
        else:
            first = resource["identifier"][0]
            assert (key, token) == ("identifier", f"{first['system']}|{first['value']}")


def test_no_patient_is_created_and_the_device_is() -> None:
    by_type = _by_type(_build())
    assert "Patient" not in by_type  # the EHR owns patient identity
    assert by_type["Device"][0]["resource"] == {
        "resourceType": "Device",
        "identifier": [
            {"system": "urn:dicom:uid", "value": f"urn:oid:{DEVICE_UID}"},
            {"system": "urn:dermfusion:device", "value": "fusionnet-1.2.0"},
        ],
        "manufacturer": "dermfusion",
        "deviceName": [{"name": "fusionnet", "type": "model-name"}],
        "type": {
            "coding": [{"system": DCM, "code": "123110", "display": "Artificial Intelligence"}],
            "text": "Artificial Intelligence",
        },
        "version": [{"value": "1.2.0"}],
    }


def _common(identifier: str) -> dict[str, Any]:
    return {
        "meta": {"security": [AIAST]},
        "identifier": [{"system": "urn:dermfusion:observation", "value": identifier}],
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "imaging",
                        "display": "Imaging",
                    }
                ]
            }
        ],
        "subject": SUBJECT,
        "issued": "2024-05-06T07:08:07Z",
        "bodySite": {
            "coding": [{"system": SCT, "code": "77568009", "display": "Back"}],
            "text": "torso",
        },
        "device": {"reference": DEVICE_URN},
    }


def test_probability_observation_carries_the_inputs_and_their_sources() -> None:
    probability = _by_type(_build())["Observation"][0]["resource"]
    assert probability == {
        "resourceType": "Observation",
        **_common(f"{REPORT_KEY}:probability"),
        "code": {
            "coding": [{"system": DCM, "code": "111047", "display": "Probability of cancer"}],
            "text": "Melanoma probability (AI)",
        },
        "valueQuantity": {"value": 0.83, "unit": "1", "system": UCUM, "code": "1"},
        "component": [
            {
                "code": {"coding": [{"system": DCM, "code": "121071", "display": "Finding"}]},
                "valueCodeableConcept": {
                    "coding": [
                        {"system": SCT, "code": "1162635006", "display": "Malignant melanoma"}
                    ]
                },
            },
            {
                "extension": [{"url": SOURCE_URL, "valueString": "dicom:PatientAge"}],
                "code": AGE_CODE,
                "valueQuantity": {"value": 45.0, "unit": "year", "system": UCUM, "code": "a"},
            },
            {
                "extension": [{"url": SOURCE_URL, "valueString": "fhir:Patient.gender"}],
                "code": SEX_CODE,
                "valueCodeableConcept": {
                    "coding": [
                        {
                            "system": "http://hl7.org/fhir/administrative-gender",
                            "code": "female",
                            "display": "Female",
                        }
                    ]
                },
            },
            {
                "extension": [{"url": SOURCE_URL, "valueString": "dicom:AnatomicRegionSequence"}],
                "code": SITE_CODE,
                "valueCodeableConcept": {
                    "coding": [{"system": SCT, "code": "77568009", "display": "Back"}],
                    "text": "torso",
                },
            },
        ],
    }


@pytest.mark.parametrize(
    ("probability", "value", "interpretation", "text"),
    [
        (0.83, ("415684004", "Suspected"), ("POS", "Positive"), "Suspicious for melanoma"),
        (0.5, ("415684004", "Suspected"), ("POS", "Positive"), "Suspicious for melanoma"),  # ==
        (
            0.4999,
            ("428263003", "NOT suspected"),
            ("NEG", "Negative"),
            "Not suspicious for melanoma at the operating point",
        ),
    ],
)
def test_decision_observation(
    probability: float, value: tuple[str, str], interpretation: tuple[str, str], text: str
) -> None:
    decision = _by_type(_build(probability=probability))["Observation"][1]["resource"]
    assert decision == {
        "resourceType": "Observation",
        **_common(f"{REPORT_KEY}:decision"),
        "code": {
            "coding": [{"system": SCT, "code": "1162635006", "display": "Malignant melanoma"}],
            "text": "Suspicion of melanoma at the operating point (AI)",
        },
        "valueCodeableConcept": {
            "coding": [{"system": SCT, "code": value[0], "display": value[1]}],
            "text": text,
        },
        "interpretation": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        "code": interpretation[0],
                        "display": interpretation[1],
                    }
                ]
            }
        ],
        "derivedFrom": [{"reference": PROBABILITY_URN}],
        "component": [
            {
                "code": {"text": "Operating point (probability threshold)"},
                "valueQuantity": {"value": 0.5, "unit": "1", "system": UCUM, "code": "1"},
            }
        ],
    }


@pytest.mark.parametrize("probability", [0.83, 0.12])
def test_melanoma_is_never_stated_as_a_diagnosis(probability: float) -> None:
    """Melanoma is coded only as what the probability is of and what the decision is about."""
    bundle = _build(probability=probability)
    probability_obs, decision = (e["resource"] for e in _by_type(bundle)["Observation"])
    values = [
        coding["code"]
        for resource in (probability_obs, decision)
        for concept in [resource.get("valueCodeableConcept", {})]
        + [c.get("valueCodeableConcept", {}) for c in resource.get("component", [])]
        for coding in concept.get("coding", [])
    ]
    assert values.count("1162635006") == 1  # the probability's "Finding" component
    assert probability_obs["component"][0]["code"]["coding"][0]["code"] == "121071"
    assert decision["code"]["coding"][0]["code"] == "1162635006"
    report = _by_type(bundle)["DiagnosticReport"][0]["resource"]
    assert "Malignant melanoma" not in report["conclusion"]
    assert report["conclusion"].endswith("Decision support, not a diagnosis.")


def test_diagnostic_report() -> None:
    report = _by_type(_build())["DiagnosticReport"][0]["resource"]
    assert report == {
        "resourceType": "DiagnosticReport",
        "meta": {"security": [AIAST]},
        "identifier": [
            {"system": "urn:dermfusion:report", "value": REPORT_KEY},
            {"system": "urn:dicom:uid", "value": "urn:oid:1.2.826.0.1.3680043.8.498.1"},
        ],
        "status": "final",
        "category": [
            {
                "coding": [{"system": DCM, "code": "DMS", "display": "Dermoscopy"}],
                "text": "Dermoscopy",
            }
        ],
        "code": {"text": "Dermoscopy melanoma risk (AI)"},
        "subject": SUBJECT,
        "issued": "2024-05-06T07:08:07Z",
        "result": [{"reference": PROBABILITY_URN}, {"reference": DECISION_URN}],
        "conclusion": "Suspicious for melanoma by AI (fusionnet 1.2.0): probability 0.830 >= "
        "operating point 0.500. Decision support, not a diagnosis.",
    }
    negative = _by_type(_build(probability=0.12))["DiagnosticReport"][0]["resource"]
    assert negative["conclusion"] == (
        "Not suspicious for melanoma by AI (fusionnet 1.2.0): probability 0.120 < operating "
        "point 0.500. Decision support, not a diagnosis."
    )


def test_missing_inputs_are_listed_as_absent_with_source_missing() -> None:
    bundle = _build(demographics=Demographics.unknown())
    Bundle.model_validate(bundle)
    probability = _by_type(bundle)["Observation"][0]["resource"]
    assert "bodySite" not in probability
    assert probability["component"][1:] == [
        {
            "extension": [{"url": SOURCE_URL, "valueString": "missing"}],
            "code": code,
            "dataAbsentReason": UNKNOWN,
        }
        for code in (AGE_CODE, SEX_CODE, SITE_CODE)
    ]


def test_site_without_its_own_code_uses_the_category_code() -> None:
    demographics = dataclasses.replace(
        DEMOGRAPHICS, site=Sourced("head/neck", Source.CSV, ""), site_code=None
    )
    probability = _by_type(_build(demographics=demographics))["Observation"][0]["resource"]
    site = {
        "coding": [{"system": SCT, "code": "774007", "display": "Head and Neck"}],
        "text": "head/neck",
    }
    assert probability["bodySite"] == site
    assert probability["component"][3]["valueCodeableConcept"] == site
    assert probability["component"][3]["extension"][0]["valueString"] == "csv"


def test_without_patient_id_there_is_no_patient_and_no_subject() -> None:
    bundle = _build(patient_id=None)
    Bundle.model_validate(bundle)
    assert [e["resource"]["resourceType"] for e in bundle["entry"]] == [
        "Device",
        "Observation",
        "Observation",
        "DiagnosticReport",
        "Provenance",
    ]
    assert all("subject" not in e["resource"] for e in bundle["entry"])


def test_identities_are_stable_per_image_and_model_version() -> None:
    assert _build() == _build()  # same input, byte-identical bundle
    rescored = _build(issued=ISSUED + dt.timedelta(days=1))
    assert [e["fullUrl"] for e in rescored["entry"]] == [e["fullUrl"] for e in _build()["entry"]]
    new_model = _build(finding=Finding(0.83, 0.5, ModelIdentity("fusionnet", "1.3.0")))
    old_urls = {e["fullUrl"] for e in _build()["entry"]}
    assert [e["fullUrl"] in old_urls for e in new_model["entry"]] == [
        False,  # new Device, Observations, report, Provenance
        False,
        False,
        False,
        False,
    ]
    # New weights under an unchanged version: a new Device (its DICOM Device UID changes), the
    # same report identities (a resend of the same version still maps onto them).
    new_weights = _build(finding=Finding(0.83, 0.5, ModelIdentity("fusionnet", "1.2.0", "ab12")))
    assert [e["fullUrl"] in old_urls for e in new_weights["entry"]] == [
        False,
        True,
        True,
        True,
        True,
    ]


def test_identifier_values_with_search_separators_are_escaped_in_if_none_exist() -> None:
    model = ModelIdentity("net|a,b", "1")
    entries = _build(finding=Finding(0.5, 0.5, model))["entry"]
    assert entries[0]["resource"]["identifier"][1] == {
        "system": "urn:dermfusion:device",
        "value": "net|a,b-1",
    }
    assert parse_qsl(entries[3]["request"]["ifNoneExist"]) == [
        ("identifier", f"urn:dermfusion:report|{IMAGE.sop_instance_uid}:net\\|a\\,b:1")
    ]
    # The patient identifier is never a search of ours in the Bundle: it is only the subject.
    report = _by_type(_build(patient_id="A|1,2"))["DiagnosticReport"][0]["resource"]
    assert report["subject"]["identifier"] == {"system": PATIENT_SYSTEM, "value": "A|1,2"}


def test_provenance_names_the_algorithm_device_as_author_of_every_result() -> None:
    """HL7 AI Transparency on FHIR: who made the report, from what; the Device names its card."""
    bundle = _build(model_card="https://example.org/dermfusion/model-card")
    by_type = _by_type(bundle)
    (provenance,) = by_type["Provenance"]
    resource = provenance["resource"]
    assert sorted(t["reference"] for t in resource["target"]) == sorted(
        [REPORT_URN, PROBABILITY_URN, DECISION_URN]
    )
    assert resource["recorded"] == "2024-05-06T07:08:07Z"  # = issued, in UTC
    (agent,) = resource["agent"]
    assert agent["who"] == {"reference": DEVICE_URN}
    assert agent["type"]["coding"][0]["code"] == "author"
    (entity,) = resource["entity"]
    assert entity["role"] == "source"
    assert entity["what"]["identifier"] == {
        "system": "urn:dicom:uid",
        "value": f"urn:oid:{IMAGE.sop_instance_uid}",
    }
    device = by_type["Device"][0]["resource"]
    assert device["note"] == [{"text": "Model card: https://example.org/dermfusion/model-card"}]
    assert "note" not in _by_type(_build())["Device"][0]["resource"]


def test_with_subject_names_the_ehr_patient_or_keeps_the_identifier() -> None:
    bundle = _build()
    assert subject_identifier(bundle) == (PATIENT_SYSTEM, "MRN-4711")
    found = with_subject(bundle, "Patient/ehr-7")
    Bundle.model_validate(found)
    subjects = [e["resource"]["subject"] for e in found["entry"] if "subject" in e["resource"]]
    assert len(subjects) == 3  # both Observations and the report
    assert all(s == {"reference": "Patient/ehr-7", **SUBJECT} for s in subjects)
    assert with_subject(bundle, None) == bundle
    assert bundle == _build()  # not changed in place
    assert subject_identifier(_build(patient_id=None)) is None
    with pytest.raises(ValueError, match="not a Patient reference"):
        with_subject(bundle, "Observation/1")


def test_with_subject_drops_the_patient_create_of_an_old_bundle() -> None:
    """A Bundle written before 0.6 (still in an outbox) carried a conditional create of the
    Patient, referenced by its urn:uuid: it must not create one either."""
    old = _build()
    urn = _urn(PATIENT_SYSTEM, "MRN-4711")
    patient = {"resourceType": "Patient", "identifier": [SUBJECT["identifier"]]}
    old["entry"].insert(
        0,
        {
            "fullUrl": urn,
            "resource": patient,
            "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=x"},
        },
    )
    for entry in old["entry"][1:]:
        if "subject" in entry["resource"]:
            entry["resource"]["subject"] = {"reference": urn}
    assert subject_identifier(old) == (PATIENT_SYSTEM, "MRN-4711")
    for reference, subject in [
        (None, SUBJECT),
        ("Patient/p1", {"reference": "Patient/p1", **SUBJECT}),
    ]:
        fixed = with_subject(old, reference)
        assert "Patient" not in _by_type(fixed)
        assert all(
            e["resource"]["subject"] == subject
            for e in fixed["entry"]
            if "subject" in e["resource"]
        )


@pytest.mark.parametrize(
    ("overrides", "argument"),
    [
        ({"probability": 1.5}, "finding.probability"),
        ({"probability": float("nan")}, "finding.probability"),
        ({"threshold": -0.1}, "finding.threshold"),
        ({"finding": Finding(0.5, 0.5, ModelIdentity("", "1"))}, "finding.model.name"),
        ({"issued": dt.datetime(2024, 5, 6, 9, 8, 7)}, "issued"),
        (
            {"image": dataclasses.replace(IMAGE, study_instance_uid="1.2.x")},
            "image.study_instance_uid",
        ),
        ({"image": dataclasses.replace(IMAGE, sop_instance_uid="")}, "image.sop_instance_uid"),
        ({"patient_id": " 4711"}, "patient_id"),
        ({"patient_id": ""}, "patient_id"),
        ({"patient_identifier_system": " "}, "patient_identifier_system"),
        (
            {"demographics": dataclasses.replace(DEMOGRAPHICS, age=Sourced(-1.0, Source.CSV))},
            "demographics.age",
        ),
        (
            {"demographics": dataclasses.replace(DEMOGRAPHICS, sex=Sourced("M", Source.DICOM))},
            "demographics.sex",
        ),
        (
            {"demographics": dataclasses.replace(DEMOGRAPHICS, site=Sourced("leg", Source.CSV))},
            "demographics.site",
        ),
    ],
)
def test_bad_arguments_are_named(overrides: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=rf"^{argument.replace('.', '[.]')}\b"):
        _build(**overrides)


def test_arguments_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        report_bundle(Finding(0.5, 0.5, MODEL))  # type: ignore[misc]
