"""Issue 2's acceptance test: real images → DICOM (DCMTK img2dcm and pydicom) → `dermfusion infer`
→ SR checked by dciodvfy and dsrdump, probability equal to `dermfusion predict`, FHIR Bundle
accepted by a real FHIR server and read back with its Observations (and no Patient created)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

from dicom_io.encapsulate import dermoscopy_dataset, write_dataset
from dicom_io.sr import read_reported_finding
from fhir_io import FhirClient
from plugin.domain import SiteCode
from tests.conftest import (
    dciodvfy_errors,
    dermfusion_command,
    predicted_probabilities,
    require_tool,
)

pytestmark = pytest.mark.integration

# (kind, age, sex, ISIC 2020 site the DICOM encodes); age and site differ so a mix-up shows.
CASES = {
    "vlp": ("img2dcm VL Photographic", 45, "female", "torso"),
    "sc": ("img2dcm Secondary Capture", 70, "male", "lower extremity"),
    "dms_jpeg": ("pydicom Dermoscopic Photography, JPEG baseline", 30, "male", "upper extremity"),
    "dms_j2k": ("pydicom Dermoscopic Photography, JPEG 2000", 60, "female", "head/neck"),
}
SNOMED_FOR = {
    "upper extremity": SiteCode("53120007", "Upper limb"),
    "head/neck": SiteCode("774007", "Head and Neck"),
}
BODY_PART_FOR = {"torso": "BACK", "lower extremity": "LEG"}


def _pick_images(shared_data: Path) -> dict[str, Path]:
    """Two ISIC 2020 (512 px) and two HAM10000 (224 px) images, melanomas among them."""
    isic = pd.read_csv(shared_data / "isic2020" / "metadata.csv")
    present = {p.stem for p in (shared_data / "isic2020" / "images").glob("*.jpg")}
    isic = isic[isic.image_name.isin(present)].sort_values("image_name")
    ham = pd.read_csv(shared_data / "ham10000" / "metadata.csv").sort_values("image_id")
    names = [
        ("isic2020", isic[isic.target == 1].image_name.iloc[3]),
        ("isic2020", isic[isic.target == 0].image_name.iloc[5]),
        ("ham10000", ham[ham.melanoma == 1].image_id.iloc[7]),
        ("ham10000", ham[ham.melanoma == 0].image_id.iloc[11]),
    ]
    return {
        key: shared_data / source / "images" / f"{name}.jpg"
        for key, (source, name) in zip(CASES, names, strict=True)
    }


def _img2dcm(jpeg: Path, out: Path, *, vlp: bool, age: int, sex: str, site: str) -> None:
    args = [require_tool("img2dcm")]
    if vlp:
        args.append("-vlp")
    args += [
        "-k",
        f"PatientAge={age:03d}Y",
        "-k",
        f"PatientSex={'F' if sex == 'female' else 'M'}",
        "-k",
        f"BodyPartExamined={BODY_PART_FOR[site]}",
        "-k",
        "PatientID=DF-TEST-0001",
        "-k",
        "PatientName=Test^Patient",
        str(jpeg),
        str(out),
    ]
    subprocess.run(args, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def inferred(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:  # type: ignore[type-arg]
    work = tmp_path_factory.mktemp("e2e")
    images = _pick_images(shared_data)
    dicom_dir = work / "dicom"
    dicom_dir.mkdir()
    files: dict[str, Path] = {}
    for key, (_, age, sex, site) in CASES.items():
        out = dicom_dir / f"{key}.dcm"
        if key in ("vlp", "sc"):
            _img2dcm(images[key], out, vlp=key == "vlp", age=age, sex=sex, site=site)
        else:
            ds = dermoscopy_dataset(
                images[key],
                transfer_syntax=JPEGBaseline8Bit if key == "dms_jpeg" else JPEG2000Lossless,
                patient_id="DF-TEST-0002",
                patient_name="Test^Other",
                patient_age=f"{age:03d}Y",
                patient_sex="F" if sex == "female" else "M",
                site=SNOMED_FOR[site],
            )
            write_dataset(ds, out)
        files[key] = out
    not_dicom = dicom_dir / "notes.dcm"
    not_dicom.write_text("this is not a DICOM file\n")

    out_dir = work / "out"
    result = subprocess.run(
        [
            *dermfusion_command(),
            "infer",
            *map(str, files.values()),
            str(not_dicom),
            "--out",
            str(out_dir),
        ],
        capture_output=True,
        text=True,
    )
    # predict on the source JPEGs, with the same demographics as an ISIC 2020 CSV
    jpeg_dir = work / "jpeg"
    jpeg_dir.mkdir()
    with (work / "metadata.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_name", "sex", "age_approx", "anatom_site_general_challenge"])
        for key, (_, age, sex, site) in CASES.items():
            shutil.copy(images[key], jpeg_dir / f"{key}.jpg")
            writer.writerow([key, sex, age, site])
    predicted_csv = work / "predicted.csv"
    predicted = predicted_probabilities(jpeg_dir, work / "metadata.csv", predicted_csv)
    srs = {}
    for path in sorted(out_dir.glob("*.dcm")):
        sr = pydicom.dcmread(path)
        finding = read_reported_finding(sr)
        key = next(
            k
            for k, f in files.items()
            if pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            == finding.source_sop_instance_uid
        )
        srs[key] = (path, sr, finding)
    return {
        "result": result,
        "srs": srs,
        "predicted": predicted,
        "files": files,
        "not_dicom": not_dicom,
    }


def test_bad_file_gets_one_line_and_nonzero_exit_while_the_rest_run(inferred: dict) -> None:  # type: ignore[type-arg]
    result = inferred["result"]
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("dermfusion infer:")]
    assert len(errors) == 1 and "notes.dcm" in errors[0], result.stderr
    assert set(inferred["srs"]) == set(CASES)


def test_every_sr_passes_dciodvfy(inferred: dict) -> None:  # type: ignore[type-arg]
    for key, (path, _, _) in inferred["srs"].items():
        assert dciodvfy_errors(path) == [], key


def test_dsrdump_reads_every_sr(inferred: dict) -> None:  # type: ignore[type-arg]
    for key, (path, _, finding) in inferred["srs"].items():
        run = subprocess.run([require_tool("dsrdump"), str(path)], capture_output=True, text=True)
        assert run.returncode == 0, f"{key}: {run.stderr}"
        assert "Probability of cancer" in run.stdout
        assert (
            f"{finding.probability:.6f}".rstrip("0") in run.stdout
            or str(finding.probability) in run.stdout
        )


def test_sr_probability_equals_predict_on_the_source_image(inferred: dict) -> None:  # type: ignore[type-arg]
    for key, (_, _, finding) in inferred["srs"].items():
        assert finding.probability == pytest.approx(inferred["predicted"][key], abs=1e-4), key


def test_sr_carries_the_demographics_used_and_their_sources(inferred: dict) -> None:  # type: ignore[type-arg]
    for key, (_, sr, finding) in inferred["srs"].items():
        _, age, sex, site = CASES[key]
        assert finding.age == age and finding.sex == sex, key
        assert finding.sources["age"] == "dicom:PatientAge"
        assert finding.sources["sex"] == "dicom:PatientSex"
        expected_site_source = (
            "dicom:BodyPartExamined" if key in ("vlp", "sc") else "dicom:AnatomicRegionSequence"
        )
        assert finding.sources["site"] == expected_site_source, key
        source = pydicom.dcmread(inferred["files"][key], stop_before_pixels=True)
        assert sr.StudyInstanceUID == source.StudyInstanceUID
        assert sr.SeriesInstanceUID != source.SeriesInstanceUID
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
        assert finding.algorithm_name and finding.algorithm_version
        assert finding.melanoma_suspected == (finding.probability >= finding.threshold)
    assert inferred["srs"]["dms_jpeg"][2].site_code == "53120007"


def test_fhir_bundle_accepted_and_report_reads_back(inferred: dict, fhir_base_url: str) -> None:  # type: ignore[type-arg]
    with FhirClient(fhir_base_url) as client:
        for key, (path, _, finding) in inferred["srs"].items():
            bundle = json.loads(path.with_suffix(".json").read_text())
            response = client.post_transaction(bundle)
            statuses = [e["response"]["status"] for e in response["entry"]]
            assert all(s.startswith(("200", "201")) for s in statuses), statuses
            report_id = next(
                e["resource"]["identifier"][0]
                for e in bundle["entry"]
                if e["resource"]["resourceType"] == "DiagnosticReport"
            )
            found = client.search(
                "DiagnosticReport",
                {
                    "identifier": f"{report_id['system']}|{report_id['value']}",
                    "_include": ["DiagnosticReport:subject", "DiagnosticReport:result"],
                },
            )
            reports = [r for r in found if r["resourceType"] == "DiagnosticReport"]
            assert len(reports) == 1, key
            report = reports[0]
            observations = [r for r in found if r["resourceType"] == "Observation"]
            # Files from `infer` name the patient by identifier only: no Patient is created.
            assert [r for r in found if r["resourceType"] == "Patient"] == []
            source = pydicom.dcmread(inferred["files"][key], stop_before_pixels=True)
            assert report["subject"]["identifier"]["value"] == source.PatientID
            values = [o["valueQuantity"]["value"] for o in observations if "valueQuantity" in o]
            assert values == [pytest.approx(finding.probability, abs=1e-6)], key
            assert {r["reference"] for r in report["result"]} == {
                f"Observation/{o['id']}" for o in observations
            }
