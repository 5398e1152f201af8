"""fhir_io against a real sekmet-fhir R4 server: idempotent resend, read-back, Patient lookup,
rejection with rollback, and an unreachable server."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fhir_io import (
    FhirClient,
    FhirRejectedError,
    FhirUnavailableError,
    demographics_from_patient,
    report_bundle,
)
from plugin.domain import Demographics, Finding, ImageRef, ModelIdentity, SiteCode, Source, Sourced
from plugin.outbox import FhirDestination
from plugin.state import OutboxItem
from tests.integration.fhir_server import running_fhir_server

pytestmark = pytest.mark.integration

FHIR_VENV = Path(__file__).resolve().parents[2] / ".venv-fhir"
PATIENT_SYSTEM = "urn:oid:1.2.3.4.5.1"
MODEL = ModelIdentity("fusionnet", "1.2.0")
ISSUED = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
DEMOGRAPHICS = Demographics(
    age=Sourced(45.0, Source.DICOM, "PatientAge"),
    sex=Sourced("female", Source.FHIR, "Patient.gender"),
    site=Sourced("torso", Source.DICOM, "AnatomicRegionSequence"),
    site_code=SiteCode("77568009", "Back"),
)


def _image(n: int) -> ImageRef:
    root = "1.2.826.0.1.3680043.8.498"
    return ImageRef(
        f"{root}.{n}.1", f"{root}.{n}.2", f"{root}.{n}.3", "1.2.840.10008.5.1.4.1.1.77.1.7"
    )


@pytest.fixture(scope="module")
def fhir_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One empty server for this module (the session-wide one in conftest is shared with
    other tests, and these count resources)."""
    if not (FHIR_VENV / "bin" / "sekmet").exists():
        raise RuntimeError(f"{FHIR_VENV} has no sekmet: run `make fhir-server-install`")
    with running_fhir_server(FHIR_VENV, tmp_path_factory.mktemp("fhir-reports")) as base_url:
        yield base_url


def _ids(response: dict) -> list[tuple[str, str]]:
    """(status, Type/id) per transaction-response entry."""
    out = []
    for entry in response["entry"]:
        location = entry["response"]["location"]
        assert "/_history/" in location
        type_id = "/".join(location.split("/_history/")[0].split("/")[-2:])
        out.append((entry["response"]["status"], type_id))
    return out


def test_resend_creates_nothing_and_the_report_reads_back(fhir_server: str) -> None:
    image = _image(1)
    bundle = report_bundle(
        finding=Finding(0.83, 0.5, MODEL),
        demographics=DEMOGRAPHICS,
        image=image,
        patient_id="MRN-1",
        patient_identifier_system=PATIENT_SYSTEM,
        issued=ISSUED,
        model_card="https://example.org/dermfusion/model-card",
    )
    with FhirClient(fhir_server) as client:
        first = _ids(client.post_transaction(bundle))
        second = _ids(client.post_transaction(bundle))
        assert [s for s, _ in first] == ["201 Created"] * 5
        assert second == [("200 OK", type_id) for _, type_id in first]
        device_ref, probability_ref, decision_ref, report_ref, provenance_ref = [
            t for _, t in first
        ]
        for resource_type, count in [
            ("Patient", 0),
            ("Device", 1),
            ("Observation", 2),
            ("Provenance", 1),
        ]:
            assert len(client.search(resource_type, {})) == count, resource_type
        assert len(client.search("DiagnosticReport", {})) == 1

        found = client.search(
            "DiagnosticReport",
            {
                "identifier": f"urn:dermfusion:report|{image.sop_instance_uid}:fusionnet:1.2.0",
                "_include": ["DiagnosticReport:subject", "DiagnosticReport:result"],
            },
        )
        by_ref = {f"{r['resourceType']}/{r['id']}": r for r in found}
        assert sorted(by_ref) == sorted([report_ref, probability_ref, decision_ref])
        report = by_ref[report_ref]
        subject = {"identifier": {"system": PATIENT_SYSTEM, "value": "MRN-1"}, "type": "Patient"}
        assert report["subject"] == subject  # a patient the EHR does not know: identifier only
        assert report["result"] == [{"reference": probability_ref}, {"reference": decision_ref}]
        assert report["status"] == "final"
        assert report["issued"] == "2024-05-06T07:08:09Z"

        probability, decision = by_ref[probability_ref], by_ref[decision_ref]
        assert probability["valueQuantity"] == {
            "value": 0.83,
            "unit": "1",
            "system": "http://unitsofmeasure.org",
            "code": "1",
        }
        assert [
            c.get("extension", [{}])[0].get("valueString") for c in probability["component"]
        ] == [
            None,
            "dicom:PatientAge",
            "fhir:Patient.gender",
            "dicom:AnatomicRegionSequence",
        ]
        assert decision["valueCodeableConcept"]["coding"][0]["code"] == "415684004"  # Suspected
        assert decision["derivedFrom"] == [{"reference": probability_ref}]
        for observation in (probability, decision):
            assert observation["subject"] == subject
            assert observation["device"] == {"reference": device_ref}
            assert observation["meta"]["security"][0]["code"] == "AIAST"
        assert report["meta"]["security"][0]["code"] == "AIAST"
        device = client.read(device_ref)
        assert device["identifier"] == [
            {"system": "urn:dicom:uid", "value": f"urn:oid:{MODEL.device_uid}"},
            {"system": "urn:dermfusion:device", "value": "fusionnet-1.2.0"},
        ]
        assert device["type"]["coding"][0]["code"] == "123110"  # Artificial Intelligence
        assert device["note"] == [{"text": "Model card: https://example.org/dermfusion/model-card"}]
        # HL7 AI Transparency: the server keeps who made the results, found from the report.
        (provenance,) = client.search("Provenance", {"target": report_ref})
        assert f"Provenance/{provenance['id']}" == provenance_ref
        assert sorted(t["reference"] for t in provenance["target"]) == sorted(
            [report_ref, probability_ref, decision_ref]
        )
        assert [a["who"] for a in provenance["agent"]] == [{"reference": device_ref}]
        assert provenance["entity"][0]["what"]["identifier"]["value"] == (
            f"urn:oid:{image.sop_instance_uid}"
        )

        by_study = client.search(
            "DiagnosticReport", {"identifier": f"urn:dicom:uid|urn:oid:{image.study_instance_uid}"}
        )
        assert [f"DiagnosticReport/{r['id']}" for r in by_study] == [report_ref]


def test_report_without_patient_id(fhir_server: str) -> None:
    bundle = report_bundle(
        finding=Finding(0.12, 0.5, MODEL),
        demographics=Demographics.unknown(),
        image=_image(2),
        patient_id=None,
        patient_identifier_system=PATIENT_SYSTEM,
        issued=ISSUED,
    )
    with FhirClient(fhir_server) as client:
        statuses = [s for s, _ in _ids(client.post_transaction(bundle))]
        # The Device may exist from an earlier test (then it is matched, not created again).
        assert statuses[0] in ("200 OK", "201 Created")
        assert statuses[1:] == ["201 Created"] * 4  # Observations, report, Provenance
        (report,) = client.search(
            "DiagnosticReport", {"identifier": f"urn:oid:{_image(2).study_instance_uid}"}
        )
        assert "subject" not in report
        assert report["conclusion"].startswith("Not suspicious for melanoma by AI")


def test_ehr_patient_is_found_and_reused(fhir_server: str, tmp_path: Path) -> None:
    patient = {
        "resourceType": "Patient",
        "id": "ehr-7",
        "identifier": [{"system": PATIENT_SYSTEM, "value": "MRN-7"}],
        "birthDate": "1970-08-20",
        "gender": "male",
    }
    put = httpx.put(
        f"{fhir_server}/Patient/ehr-7",
        json=patient,
        headers={"Content-Type": "application/fhir+json"},
        timeout=10,
    )
    assert put.status_code == 201, put.text
    with FhirClient(fhir_server) as client:
        found = client.find_patient(PATIENT_SYSTEM, "MRN-7")
        assert found is not None and found["id"] == "ehr-7"
        assert client.find_patient(PATIENT_SYSTEM, "MRN-404") is None
        demographics = demographics_from_patient(found, dt.date(2024, 8, 19))
        assert demographics.age == Sourced(53.0, Source.FHIR, "Patient.birthDate")
        assert demographics.sex == Sourced("male", Source.FHIR, "Patient.gender")
        assert demographics.site == Sourced.missing()

        bundle = report_bundle(
            finding=Finding(0.6, 0.5, MODEL),
            demographics=demographics,
            image=_image(3),
            patient_id="MRN-7",
            patient_identifier_system=PATIENT_SYSTEM,
            issued=ISSUED,
        )
        path = tmp_path / "bundle.json"
        path.write_text(json.dumps(bundle))
        # As the service delivers it: the subject resolved against the EHR just before sending.
        FhirDestination(client).deliver(OutboxItem("fhir:ehr-7", "fhir", path, 0))
        (report,) = client.search(
            "DiagnosticReport", {"identifier": f"urn:oid:{_image(3).study_instance_uid}"}
        )
        assert report["subject"]["reference"] == "Patient/ehr-7"
        assert [p["id"] for p in client.search("Patient", {})] == ["ehr-7"]  # none created
        assert client.read("Patient/ehr-7")["birthDate"] == "1970-08-20"  # not overwritten


def test_duplicate_patients_are_ambiguous(fhir_server: str) -> None:
    for rid in ("dup-1", "dup-2"):
        body = {
            "resourceType": "Patient",
            "id": rid,
            "identifier": [{"system": PATIENT_SYSTEM, "value": "MRN-DUP"}],
        }
        response = httpx.put(f"{fhir_server}/Patient/{rid}", json=body, timeout=10)
        assert response.status_code == 201, response.text
    with FhirClient(fhir_server) as client, pytest.raises(FhirRejectedError, match="^2 Patients"):
        client.find_patient(PATIENT_SYSTEM, "MRN-DUP")


def test_rejected_transaction_rolls_back(fhir_server: str) -> None:
    bundle = report_bundle(
        finding=Finding(0.7, 0.5, MODEL),
        demographics=DEMOGRAPHICS,
        image=_image(4),
        patient_id="MRN-4",
        patient_identifier_system=PATIENT_SYSTEM,
        issued=ISSUED,
    )
    bundle["entry"][-1]["resource"]["note"] = [{"text": "R5 only"}]  # not an R4 element
    with FhirClient(fhir_server) as client:
        with pytest.raises(FhirRejectedError) as info:
            client.post_transaction(bundle)
        assert info.value.status == 400
        assert "note" in info.value.diagnostics
        assert "\n" not in str(info.value)
        assert client.find_patient(PATIENT_SYSTEM, "MRN-4") is None  # rolled back


def test_stopped_server_is_unavailable(tmp_path: Path) -> None:
    with (
        running_fhir_server(FHIR_VENV, tmp_path) as base_url,
        FhirClient(base_url, timeout=5) as client,
    ):
        assert client.find_patient(PATIENT_SYSTEM, "MRN-1") is None
    # The with block stopped the server: a client for its URL now finds nobody there.
    with FhirClient(base_url, timeout=5) as client:
        with pytest.raises(FhirUnavailableError, match="unreachable"):
            client.find_patient(PATIENT_SYSTEM, "MRN-1")
        with pytest.raises(FhirUnavailableError):
            client.post_transaction(
                report_bundle(
                    finding=Finding(0.7, 0.5, MODEL),
                    demographics=DEMOGRAPHICS,
                    image=_image(5),
                    patient_id=None,
                    patient_identifier_system=PATIENT_SYSTEM,
                    issued=ISSUED,
                )
            )
