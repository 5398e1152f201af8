"""Issue 3's acceptance tests: `dermfusion serve` between a real Orthanc and a real FHIR server.

Studies go in with DCMTK storescu (into Orthanc, which auto-routes them with the shipped config,
or straight to dermfusion); SRs are found over Orthanc's REST API, reports in the FHIR server.
"""

from __future__ import annotations

import io
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_io.capture import SECONDARY_CAPTURE_IMAGE_STORAGE as SECONDARY_CAPTURE
from dicom_io.sr import ReportedFinding, read_reported_finding
from fhir_io import FhirClient
from fhir_io.reports import STUDY_UID_SYSTEM
from tests.conftest import dermfusion_command, require_tool
from tests.integration.dermfusion_process import (
    DermfusionProcess,
    eventually,
    free_port,
    running_dermfusion,
    write_config,
)
from tests.integration.orthanc_server import OrthancServer, in_private_network, running_orthanc
from tests.integration.studies import dermoscopy_study, storescu

pytestmark = pytest.mark.integration
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
PATIENT_SYSTEM = "urn:dermfusion:patient-id"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    if not in_private_network():
        pytest.skip("Orthanc binds every interface: run inside `unshare -n` (make test does)")
    dermfusion_port = free_port()
    with running_orthanc(
        tmp_path_factory.mktemp("orthanc"),
        dicom_port=free_port(),
        http_port=free_port(),
        dermfusion_port=dermfusion_port,
    ) as server:
        server.dermfusion_port = dermfusion_port  # type: ignore[attr-defined]
        yield server


@pytest.fixture(scope="module")
def service(
    orthanc: OrthancServer, fhir_base_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DermfusionProcess]:
    workdir = tmp_path_factory.mktemp("dermfusion")
    config = write_config(
        workdir / "dermfusion.toml",
        port=orthanc.dermfusion_port,  # type: ignore[attr-defined]
        storage=workdir / "var",
        pacs_port=orthanc.dicom_port,
        fhir_url=fhir_base_url,
        secondary_capture=True,
    )
    process = DermfusionProcess(workdir, orthanc.dermfusion_port, config)  # type: ignore[attr-defined]
    process.start()
    yield process
    process.kill(signal.SIGTERM)


def _study(
    tmp_path: Path, patient_id: str, *, age: str | None, sex: str | None, images: int = 1
) -> tuple[str, list[Path]]:
    return dermoscopy_study(tmp_path, patient_id=patient_id, images=images, age=age, sex=sex)


def _storescu(ae_title: str, port: int, files: list[Path]) -> None:
    run = storescu(ae_title, port, files)
    assert run.returncode == 0, run.stderr


def _srs_in_orthanc(orthanc: OrthancServer, study_uid: str) -> list[ReportedFinding]:
    found = []
    for instance in orthanc.study_instances(study_uid):
        if orthanc.instance_metadata(instance["ID"]).get("SopClassUid") == COMPREHENSIVE_3D_SR:
            raw = httpx.get(f"{orthanc.http}/instances/{instance['ID']}/file").content
            found.append(read_reported_finding(pydicom.dcmread(io.BytesIO(raw))))
    return found


def _captures_in_orthanc(orthanc: OrthancServer, study_uid: str) -> list[pydicom.Dataset]:
    found = []
    for instance in orthanc.study_instances(study_uid):
        if orthanc.instance_metadata(instance["ID"]).get("SopClassUid") == SECONDARY_CAPTURE:
            raw = httpx.get(f"{orthanc.http}/instances/{instance['ID']}/file").content
            found.append(pydicom.dcmread(io.BytesIO(raw)))
    return found


def _reports_for_study(fhir_base_url: str, study_uid: str) -> list[dict[str, Any]]:
    with FhirClient(fhir_base_url) as client:
        return client.search(
            "DiagnosticReport",
            {
                "identifier": f"{STUDY_UID_SYSTEM}|urn:oid:{study_uid}",
                "_include": ["DiagnosticReport:subject", "DiagnosticReport:result"],
            },
        )


def test_study_routed_by_orthanc_gets_its_sr_and_diagnostic_report(
    orthanc: OrthancServer, service: DermfusionProcess, fhir_base_url: str, tmp_path: Path
) -> None:
    study_uid, files = _study(tmp_path, "DF-IT-0001", age="058Y", sex="M", images=2)
    _storescu(orthanc.aet, orthanc.dicom_port, files)
    srs = eventually(
        lambda: (s := _srs_in_orthanc(orthanc, study_uid)) and len(s) == 2 and s,
        90,
        "two SRs in the study in Orthanc",
    )
    sources = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert {sr.source_sop_instance_uid for sr in srs} == sources
    captures = eventually(
        lambda: (c := _captures_in_orthanc(orthanc, study_uid)) and len(c) == 2 and c,
        60,
        "two saliency Secondary Captures in the study in Orthanc",
    )
    for capture in captures:
        assert capture.Modality == "OT" and capture.SeriesNumber == 9902
        assert "SALIENCY" in capture.ImageType
        assert capture.PatientID == "DF-IT-0001"
    assert {c.SourceImageSequence[0].ReferencedSOPInstanceUID for c in captures} == sources
    assert all(sr.age == 58.0 and sr.sources["age"] == "dicom:PatientAge" for sr in srs)
    # IHE AIR: each SR's visual explanation is a capture the PACS holds; SR and capture name the
    # same algorithm device.
    assert {sr.visual_explanation_uid for sr in srs} == {c.SOPInstanceUID for c in captures}
    device_uids = {sr.device_uid for sr in srs} | {
        c.ContributingEquipmentSequence[0].DeviceUID for c in captures
    }
    (device_uid,) = device_uids
    assert device_uid is not None
    found = eventually(
        lambda: (
            (r := _reports_for_study(fhir_base_url, study_uid))
            and sum(x["resourceType"] == "DiagnosticReport" for x in r) == 2
            and r
        ),
        60,
        "two DiagnosticReports in the FHIR server",
    )
    # The EHR does not know DF-IT-0001: the report names the patient by identifier only, and
    # no Patient is created (the EHR owns patient identity).
    assert [r for r in found if r["resourceType"] == "Patient"] == []
    for report in (r for r in found if r["resourceType"] == "DiagnosticReport"):
        assert report["subject"] == {
            "identifier": {"system": PATIENT_SYSTEM, "value": "DF-IT-0001"},
            "type": "Patient",
        }
    with FhirClient(fhir_base_url) as client:
        assert client.find_patient(PATIENT_SYSTEM, "DF-IT-0001") is None
        # HL7 AI Transparency: the server holds a Provenance per report, its author the Device
        # whose DICOM UID is the one the SRs carry.
        for report in (r for r in found if r["resourceType"] == "DiagnosticReport"):
            assert report["meta"]["security"][0]["code"] == "AIAST"
            target = f"DiagnosticReport/{report['id']}"
            (provenance,) = client.search("Provenance", {"target": target})
            device = client.read(provenance["agent"][0]["who"]["reference"])
            assert device["identifier"][0]["value"] == f"urn:oid:{device_uid}"


def test_missing_age_and_sex_are_taken_from_the_fhir_patient(
    orthanc: OrthancServer, service: DermfusionProcess, fhir_base_url: str, tmp_path: Path
) -> None:
    created = httpx.post(
        f"{fhir_base_url}/Patient",
        json={
            "resourceType": "Patient",
            "gender": "female",
            "birthDate": "1961-03-10",
            "identifier": [{"system": PATIENT_SYSTEM, "value": "DF-IT-0002"}],
        },
        headers={"Content-Type": "application/fhir+json"},
    )
    created.raise_for_status()
    ehr_patient = f"Patient/{created.json()['id']}"
    study_uid, files = _study(tmp_path, "DF-IT-0002", age=None, sex=None)
    _storescu(service.ae_title, service.port, files)
    (sr,) = eventually(lambda: _srs_in_orthanc(orthanc, study_uid), 60, "the SR in Orthanc")
    assert (sr.age, sr.sex) == (62.0, "female")  # born 1961-03-10, studied 2024-01-16
    assert sr.sources == {
        "age": "fhir:Patient.birthDate",
        "sex": "fhir:Patient.gender",
        "site": "dicom:AnatomicRegionSequence",
    }
    # The report's subject is the Patient the EHR returned for the identifier.
    found = eventually(
        lambda: _reports_for_study(fhir_base_url, study_uid), 60, "the DiagnosticReport"
    )
    (report,) = [r for r in found if r["resourceType"] == "DiagnosticReport"]
    assert report["subject"]["reference"] == ehr_patient
    assert [f"Patient/{r['id']}" for r in found if r["resourceType"] == "Patient"] == [ehr_patient]


def test_sr_waits_for_a_stopped_pacs_and_is_delivered_when_it_is_back(
    orthanc: OrthancServer, service: DermfusionProcess, tmp_path: Path
) -> None:
    study_uid, files = _study(tmp_path, "DF-IT-0003", age="040Y", sex="F")
    orthanc.stop()
    try:
        _storescu(service.ae_title, service.port, files)
        service.wait_for_log(f"study={study_uid}: scored 1 image(s)", timeout=60)
        service.wait_for_log("to pacs failed (attempt 2)", timeout=60)
    finally:
        orthanc.start()
    (sr,) = eventually(lambda: _srs_in_orthanc(orthanc, study_uid), 60, "the SR after restart")
    assert sr.source_sop_instance_uid == pydicom.dcmread(files[0]).SOPInstanceUID


def test_sigkill_after_ack_then_restart_reports_exactly_once(
    orthanc: OrthancServer, fhir_base_url: str, tmp_path: Path
) -> None:
    with running_dermfusion(
        tmp_path / "svc",
        pacs_port=orthanc.dicom_port,
        fhir_url=fhir_base_url,
        stable_seconds=5.0,
    ) as service:
        study_uid, files = _study(tmp_path, "DF-IT-0004", age="071Y", sex="M", images=2)
        _storescu(service.ae_title, service.port, files)  # exit 0: both acknowledged
        service.kill(signal.SIGKILL)
        assert f"study={study_uid}" not in service.log_text()
        service.start()
        service.wait_for_log(f"study={study_uid}: scored 2 image(s)", timeout=60)
        srs = eventually(
            lambda: (s := _srs_in_orthanc(orthanc, study_uid)) and len(s) == 2 and s,
            60,
            "two SRs in Orthanc",
        )
        reports = eventually(
            lambda: [
                r
                for r in _reports_for_study(fhir_base_url, study_uid)
                if r["resourceType"] == "DiagnosticReport"
            ],
            60,
            "DiagnosticReports",
        )
        time.sleep(3)  # long enough for a duplicate delivery or a second scoring to show
        assert len(_srs_in_orthanc(orthanc, study_uid)) == 2
        later = [
            r
            for r in _reports_for_study(fhir_base_url, study_uid)
            if r["resourceType"] == "DiagnosticReport"
        ]
        assert len(srs) == 2 and len(reports) == 2 and len(later) == 2
        assert service.log_text().count(f"study={study_uid}: scored") == 1


def test_a_corrupt_outbox_item_is_parked_and_the_good_studies_behind_it_are_delivered(
    orthanc: OrthancServer, tmp_path: Path
) -> None:
    """Issue 19: one unreadable SR in the outbox used to kill the delivery thread for good."""
    with running_dermfusion(
        tmp_path / "svc", pacs_port=orthanc.dicom_port, outbox_max_attempts=3
    ) as service:
        outbox = tmp_path / "svc" / "var" / "outbox"
        bad_study, bad_files = _study(tmp_path, "DF-IT-0005", age="052Y", sex="F")
        orthanc.stop()  # so that its SR is still owed when we break it
        try:
            _storescu(service.ae_title, service.port, bad_files)
            service.wait_for_log(f"study={bad_study}: scored 1 image(s)", timeout=60)
            (owed_sr,) = [p for p in outbox.glob("*.dcm") if not p.name.endswith("_saliency.dcm")]
            broken = owed_sr.with_suffix(".broken")
            broken.write_bytes(owed_sr.read_bytes()[:100] + b"\x00garbage")  # cut, then garbage
            broken.replace(owed_sr)
        finally:
            orthanc.start()
        good = [
            _study(tmp_path, f"DF-IT-00{6 + n}", age="045Y", sex="M", images=1 + n)
            for n in range(3)
        ]
        for _, files in good:
            _storescu(service.ae_title, service.port, files)
        for (study_uid, _files), count in zip(good, (1, 2, 3), strict=True):
            eventually(
                lambda uid=study_uid, n=count: len(_srs_in_orthanc(orthanc, uid)) == n,
                90,
                f"{count} SR(s) of a good study in Orthanc",
            )
        log = service.wait_for_log("parked after 3 refused attempt(s)", timeout=60)
        assert service.process is not None and service.process.poll() is None  # still up
        echo = subprocess.run(
            [require_tool("echoscu"), "-aec", service.ae_title, "127.0.0.1", str(service.port)]
        )
        assert echo.returncode == 0  # and still answering
        with closing(sqlite3.connect(tmp_path / "svc" / "var" / "state.sqlite3")) as db:
            parked = db.execute(
                "SELECT key, last_error FROM outbox WHERE parked_at IS NOT NULL"
            ).fetchall()
        assert [key for key, _ in parked] == [f"sr:{owed_sr.stem}"]
        assert parked[0][1].startswith("refused or unreadable: ")
        assert _srs_in_orthanc(orthanc, bad_study) == []
        assert "thread died" not in log and "Traceback" not in log
        assert "DF-IT-0005" not in log  # the reason names no patient


def _outbox_of_study(service: DermfusionProcess, study_uid: str) -> dict[str, float | None]:
    """Outbox key -> delivered_at of the study's deliveries, read as an operator would."""
    with closing(sqlite3.connect(service.workdir / "var" / "state.sqlite3")) as db:
        rows = db.execute(
            "SELECT key, delivered_at FROM outbox WHERE study_instance_uid = ?", (study_uid,)
        ).fetchall()
    return dict(rows)


def _dermfusion(service: DermfusionProcess, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*dermfusion_command(), *argv, "--config", str(service.config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_resend_delivers_a_studys_reports_again_without_duplicates(
    orthanc: OrthancServer, service: DermfusionProcess, fhir_base_url: str, tmp_path: Path
) -> None:
    """Issue 20, item 3: `dermfusion resend` beside the running service; Orthanc keeps one SR
    and one saliency capture, the FHIR server one DiagnosticReport."""
    study_uid, files = _study(tmp_path, "DF-IT-0020", age="063Y", sex="F")
    _storescu(service.ae_title, service.port, files)
    eventually(lambda: len(_srs_in_orthanc(orthanc, study_uid)) == 1, 90, "the SR in Orthanc")
    first = eventually(
        lambda: (
            (o := _outbox_of_study(service, study_uid)) and len(o) == 4 and all(o.values()) and o
        ),
        60,
        "SR, capture, Bundle and the overlay drawn",
    )
    assert {key.split(":")[0] for key in first} == {"sr", "sc", "fhir", "explain"}

    resent_at = time.time()
    resend = _dermfusion(service, "resend", study_uid)
    assert resend.returncode == 0, resend.stderr
    assert resend.stdout == (
        f"resend {study_uid}: 4 deliveries re-queued (explanation 1, fhir 1, pacs 2)\n"
    )
    eventually(
        lambda: all((at or 0) >= resent_at for at in _outbox_of_study(service, study_uid).values()),
        60,
        "all four delivered (drawn) again",
    )
    log = service.log_text()
    for key in first:
        assert log.count(f"outbox: delivered {key} to ") == 2
    assert len(_srs_in_orthanc(orthanc, study_uid)) == 1
    assert len(_captures_in_orthanc(orthanc, study_uid)) == 1
    reports = _reports_for_study(fhir_base_url, study_uid)
    assert sum(r["resourceType"] == "DiagnosticReport" for r in reports) == 1

    status = _dermfusion(service, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.splitlines()[-1] == "status: ok"
    assert "outbox pacs: nothing owed" in status.stdout
    assert "DF-IT-0020" not in status.stdout + resend.stdout  # no patient identifiers

    unknown = _dermfusion(service, "resend", generate_uid())
    assert unknown.returncode == 1
    assert unknown.stderr.count("\n") == 1 and "no study" in unknown.stderr
