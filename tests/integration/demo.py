"""`make demo`: Orthanc, a FHIR server and `dermfusion serve` on loopback, a few studies through.

Sample studies come from ../shared/data (ISIC 2020 images with their metadata) when it is there,
else from tests/data. Each is sent into Orthanc with DCMTK storescu; Orthanc auto-routes it with
the shipped configs/orthanc config; the table shows where each SR and DiagnosticReport landed.
Run inside a private network namespace (the Makefile does): Orthanc binds every interface.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pandas as pd
import pydicom
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from dicom_io.encapsulate import dermoscopy_dataset, write_dataset
from dicom_io.sr import read_reported_finding
from fhir_io import FhirClient
from fhir_io.reports import STUDY_UID_SYSTEM
from plugin.domain import CATEGORY_CODES, site_from_name
from tests.conftest import REPO_ROOT, SAMPLES, SHARED_DATA
from tests.integration.dermfusion_process import free_port, running_dermfusion
from tests.integration.fhir_server import running_fhir_server
from tests.integration.orthanc_server import in_private_network, running_orthanc

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
STUDIES = 4


def _cases() -> list[dict[str, object]]:
    """Image path and metadata per study: ISIC 2020 (half melanoma) or the shipped samples."""
    if (SHARED_DATA / "isic2020" / "metadata.csv").is_file():
        table = pd.read_csv(SHARED_DATA / "isic2020" / "metadata.csv")
        images = SHARED_DATA / "isic2020" / "images"
        present = {p.stem for p in images.glob("*.jpg")}
        table = table[table.image_name.isin(present)].sort_values("image_name")
        picked = pd.concat([table[table.target == 1].head(2), table[table.target == 0].head(2)])
        folder = images
    else:
        picked = pd.read_csv(SAMPLES / "samples.csv")
        folder = SAMPLES
    cases = []
    for row in picked.head(STUDIES).itertuples():
        site = row.anatom_site_general_challenge
        cases.append(
            {
                "image": folder / f"{row.image_name}.jpg",
                "name": row.image_name,
                "age": None if pd.isna(row.age_approx) else f"{int(row.age_approx):03d}Y",
                "sex": {"male": "M", "female": "F"}.get(str(row.sex)),
                "site": site_from_name(site if isinstance(site, str) else None),
            }
        )
    return cases


def main() -> int:
    if not in_private_network():
        print("make demo runs Orthanc, which binds every interface: run it via `make demo`")
        return 2
    work = Path(tempfile.mkdtemp(prefix="dermfusion-demo-"))
    dermfusion_port = free_port()
    with (
        running_fhir_server(REPO_ROOT / ".venv-fhir", work / "fhir") as fhir_url,
        running_orthanc(
            work / "orthanc",
            dicom_port=free_port(),
            http_port=free_port(),
            dermfusion_port=dermfusion_port,
        ) as orthanc,
        running_dermfusion(
            work / "dermfusion",
            port=dermfusion_port,
            pacs_port=orthanc.dicom_port,
            fhir_url=fhir_url,
        ),
    ):
        studies = []
        for index, case in enumerate(_cases()):
            site = case["site"]
            ds = dermoscopy_dataset(
                case["image"],
                transfer_syntax=JPEGBaseline8Bit,
                patient_id=f"DEMO-{index + 1:04d}",
                patient_name=f"Demo^Patient{index + 1}",
                patient_age=case["age"],
                patient_sex=case["sex"],
                site=CATEGORY_CODES[str(site)] if site else None,
                study_uid=generate_uid(),
            )
            path = write_dataset(ds, work / f"study{index}.dcm")
            studies.append((case, ds.StudyInstanceUID, path))
        subprocess.run(
            [
                "storescu",
                "-R",
                "-xy",
                "-aec",
                orthanc.aet,
                "127.0.0.1",
                str(orthanc.dicom_port),
                *(str(p) for _, _, p in studies),
            ],
            check=True,
            capture_output=True,
        )
        print(f"sent {len(studies)} studies into Orthanc; waiting for the reports...")
        rows = []
        with FhirClient(fhir_url) as fhir:
            for case, study_uid, _ in studies:
                rows.append(_wait_for_result(orthanc, fhir, case, study_uid))
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"\nlogs and data: {work}")
    return 0


def _wait_for_result(orthanc, fhir: FhirClient, case: dict, study_uid: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for instance in orthanc.study_instances(study_uid):
            if orthanc.instance_metadata(instance["ID"]).get("SopClassUid") != SR_CLASS:
                continue
            raw = httpx.get(f"{orthanc.http}/instances/{instance['ID']}/file").content
            finding = read_reported_finding(pydicom.dcmread(io.BytesIO(raw)))
            reports = [
                r
                for r in fhir.search(
                    "DiagnosticReport", {"identifier": f"{STUDY_UID_SYSTEM}|urn:oid:{study_uid}"}
                )
                if r["resourceType"] == "DiagnosticReport"
            ]
            if not reports:
                break
            return {
                "study": f"...{study_uid[-12:]}",
                "image": case["name"],
                "site": case["site"] or "unknown",
                "probability": f"{finding.probability:.3f}",
                "decision": "melanoma suspected" if finding.melanoma_suspected else "negative",
                "SR in Orthanc": f"/instances/{instance['ID']}",
                "DiagnosticReport": f"DiagnosticReport/{reports[0]['id']}",
            }
        time.sleep(0.5)
    raise SystemExit(f"no report for study {study_uid} within 120 s")


if __name__ == "__main__":
    sys.exit(main())
