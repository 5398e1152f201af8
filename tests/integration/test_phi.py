"""No patient identifiers where they do not belong (issue 19, item 6), through a real run.

Studies carrying marked PatientName, PatientID and birth dates, well-formed and malformed, go
through `dermfusion serve` with a real FHIR server (demographics looked up, reports delivered).
Every one gets its SR and its DiagnosticReport, and then everything the service wrote apart
from the reports themselves (its log, stdout and stderr included; every file and folder name
under its storage; every value in its state database; `dermfusion status`) is searched for the
marks.
"""

from __future__ import annotations

import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom import config
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from dicom_io.encapsulate import dermoscopy_dataset, write_dataset
from fhir_io.reports import STUDY_UID_SYSTEM
from plugin.domain import SiteCode
from tests.conftest import SAMPLES, dermfusion_command, require_tool
from tests.integration.dermfusion_process import eventually, running_dermfusion

pytestmark = pytest.mark.integration
PATIENT_SYSTEM = "urn:dermfusion:patient-id"
# The marks: none of them may appear in the log, a file name, the state database or status.
NAME_MARK = "Zqphiname"
ID_MARK = "ZQPHIID"
BIRTH_MARKS = ("19740105", "1974-01-05", "19700230", "1970XX01")

# Header values per study: marked and well-formed, then each kind of malformed value.
VARIANTS: dict[str, dict[str, str]] = {
    "well-formed": {},
    "no-age-sex": {"PatientAge": "", "PatientSex": ""},  # taken from the EHR's Patient
    "birth-not-a-date": {"PatientBirthDate": "19700230"},
    "birth-garbled": {"PatientBirthDate": "1970XX01"},
    "sex-x": {"PatientSex": "X"},
    "name-line-break": {"PatientName": f"{NAME_MARK}^Line\r\nBreak"},
    # valid, but highdicom warns about a name without a caret, quoting it
    "name-one-component": {"PatientName": f"{NAME_MARK} Marker"},
    "id-too-long": {"PatientID": f"{ID_MARK}-" + "7" * 70},
    "age-garbled": {"PatientAge": "0X5Y"},
    "study-date-garbled": {"StudyDate": "2024XX16"},
}


def _marked_study(folder: Path, variant: str, changes: dict[str, str]) -> tuple[str, Path]:
    study_uid = generate_uid()
    ds = dermoscopy_dataset(
        sorted(SAMPLES.glob("ISIC_*.jpg"))[1],
        transfer_syntax=JPEGBaseline8Bit,
        patient_id=f"{ID_MARK}-1",
        patient_name=f"{NAME_MARK}^Marker",
        patient_age="050Y",
        patient_sex="F",
        study_date="20240116",
        site=SiteCode("22943007", "Trunk"),
        study_uid=study_uid,
    )
    ds.PatientBirthDate = "19740105"
    with config.disable_value_validation():
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
    return study_uid, write_dataset(ds, folder / f"{variant}.dcm")


def _diagnostic_reports(fhir_base_url: str, study_uid: str) -> list[dict[str, object]]:
    bundle = httpx.get(
        f"{fhir_base_url}/DiagnosticReport",
        params={"identifier": f"{STUDY_UID_SYSTEM}|urn:oid:{study_uid}"},
    ).json()
    return [e["resource"] for e in bundle.get("entry", [])]


def test_marked_and_malformed_identifiers_reach_the_reports_and_nothing_else(
    fhir_base_url: str, tmp_path: Path
) -> None:
    created = httpx.post(  # the EHR knows the patient, with a marked name and birth date
        f"{fhir_base_url}/Patient",
        json={
            "resourceType": "Patient",
            "name": [{"family": NAME_MARK, "given": ["Marker"]}],
            "gender": "male",  # disagrees with the DICOM sex: a conflict to log
            "birthDate": "1974-01-05",
            "identifier": [{"system": PATIENT_SYSTEM, "value": f"{ID_MARK}-1"}],
        },
        headers={"Content-Type": "application/fhir+json"},
    )
    created.raise_for_status()
    studies = {
        variant: _marked_study(tmp_path, variant, changes) for variant, changes in VARIANTS.items()
    }
    with running_dermfusion(tmp_path / "svc", fhir_url=fhir_base_url) as service:
        run = subprocess.run(
            [require_tool("storescu"), "-R", "-xy", "-aec", service.ae_title, "127.0.0.1"]
            + [str(service.port), *(str(path) for _, path in studies.values())],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        for variant, (study_uid, _) in studies.items():
            service.wait_for_log(f"study={study_uid}: scored 1 image(s)", timeout=120)
            reports = eventually(
                lambda uid=study_uid: _diagnostic_reports(fhir_base_url, uid),
                60,
                f"the DiagnosticReport of the {variant} study",
            )
            assert len(reports) == 1, variant
        storage = service.workdir / "var"
        srs = [
            pydicom.dcmread(p)
            for p in (storage / "outbox").glob("*.dcm")
            if not p.name.endswith("_saliency.dcm")
        ]
        assert sorted(str(sr.StudyInstanceUID) for sr in srs) == sorted(
            uid for uid, _ in studies.values()
        )
        # the reports do carry the patient: where the value was well-formed
        names = {str(sr.StudyInstanceUID): str(sr.PatientName) for sr in srs}
        assert names[studies["well-formed"][0]] == f"{NAME_MARK}^Marker"
        assert names[studies["name-line-break"][0]] == ""
        status = subprocess.run(
            [*dermfusion_command(), "--config", str(service.config), "status"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        log = service.log_text()

    written = [log, status.stdout, status.stderr]
    written += [p.name for p in storage.rglob("*")]
    with closing(sqlite3.connect(storage / "state.sqlite3")) as db:
        written += list(db.iterdump())
    text = "\n".join(written)
    for mark in (NAME_MARK, ID_MARK, *BIRTH_MARKS):
        assert mark not in text, f"{mark} written outside the reports"
    # the malformed fields were said to be so, by name
    assert "malformed PatientBirthDate left out of the report" in log
    assert "malformed PatientName left out of the report" in log
    assert "PatientSex is malformed; treated as missing" in log
    assert "Traceback" not in log
