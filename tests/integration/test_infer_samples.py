"""`dermfusion infer` on the shipped sample DICOM files (runs on a clone without ../shared)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest

from dicom_io.sr import read_reported_finding
from tests.conftest import SAMPLES, dciodvfy_errors, dermfusion_command, predicted_probabilities

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:  # type: ignore[type-arg]
    work = tmp_path_factory.mktemp("infer")
    # an SR is a DICOM file, but not an image we score: a wrong SOP class
    wrong_class = work / "sr_as_input.dcm"
    subprocess.run(
        [
            *dermfusion_command(),
            "infer",
            str(SAMPLES / "dms_jpeg_baseline.dcm"),
            "--out",
            str(work / "first"),
        ],
        check=True,
        capture_output=True,
    )
    first_sr = next((work / "first").glob("*.dcm"))
    wrong_class.write_bytes(first_sr.read_bytes())
    truncated = work / "truncated.dcm"
    truncated.write_bytes((SAMPLES / "vlp_img2dcm.dcm").read_bytes()[:2000])
    result = subprocess.run(
        [
            *dermfusion_command(),
            "infer",
            str(SAMPLES / "dms_jpeg_baseline.dcm"),
            str(wrong_class),
            str(truncated),
            str(SAMPLES / "vlp_img2dcm.dcm"),
            "--out",
            str(work / "out"),
        ],
        capture_output=True,
        text=True,
    )
    return result, work / "out"


def test_bad_inputs_get_one_line_each_and_the_good_ones_are_scored(outputs) -> None:  # type: ignore[no-untyped-def]
    result, out = outputs
    assert result.returncode == 1
    errors = result.stderr.strip().splitlines()
    errors = [e for e in errors if e.startswith("dermfusion infer:")]
    assert len(errors) == 2, result.stderr
    assert "sr_as_input.dcm" in errors[0] and "1.2.840.10008.5.1.4.1.1.88.34" in errors[0]
    assert "truncated.dcm" in errors[1]
    assert len(list(out.glob("*.dcm"))) == 2 and len(list(out.glob("*.json"))) == 2
    assert len(list(out.glob("*_saliency.png"))) == 2


def test_sample_srs_pass_dciodvfy_and_match_predict(outputs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, out = outputs
    predicted_csv = tmp_path / "p.csv"
    predicted = predicted_probabilities(SAMPLES, SAMPLES / "samples.csv", predicted_csv)
    by_source = {}
    for path in out.glob("*.dcm"):
        assert dciodvfy_errors(path) == [], path
        finding = read_reported_finding(pydicom.dcmread(path))
        by_source[finding.source_sop_instance_uid] = finding
    dms = pydicom.dcmread(SAMPLES / "dms_jpeg_baseline.dcm", stop_before_pixels=True)
    finding = by_source[dms.SOPInstanceUID]
    # dms_jpeg_baseline.dcm is ISIC_0024525.jpg with the same age/sex/site as samples.csv
    assert finding.probability == pytest.approx(predicted["ISIC_0024525"], abs=1e-4)
    assert (finding.age, finding.sex, finding.site_code) == (65.0, "male", "53120007")
    vlp = pydicom.dcmread(SAMPLES / "vlp_img2dcm.dcm", stop_before_pixels=True)
    assert by_source[vlp.SOPInstanceUID].sources == {
        "age": "missing",
        "sex": "missing",
        "site": "missing",
    }


def test_resending_gives_the_same_sr_uid(outputs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, out = outputs
    subprocess.run(
        [
            *dermfusion_command(),
            "infer",
            str(SAMPLES / "dms_jpeg_baseline.dcm"),
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    again = {p.name for p in tmp_path.glob("*.dcm")}
    assert again <= {p.name for p in out.glob("*.dcm")}
