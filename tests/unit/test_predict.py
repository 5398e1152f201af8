"""`dermfusion predict` and the bundle run standalone, on the shipped sample images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dicom_io.images import read_image
from monai_bundle.scripts.inference import read_metadata_csv
from monai_bundle.scripts.transforms import load_rgb
from plugin.cli import main
from plugin.domain import Demographics, Source, Sourced
from tests.conftest import REPO_ROOT, SAMPLES

MELANOMAS = {"ISIC_0024525", "ISIC_0337631"}  # from samples.csv's target column
BENIGN = {"ISIC_0024307", "ISIC_0162627"}
COLUMNS = ["image_name", "melanoma_probability", "melanoma_suspected"]


def _check_decisions(frame: pd.DataFrame) -> None:
    """melanoma_suspected is 1 exactly where the probability reaches the shipped threshold."""
    operating_point = REPO_ROOT / "monai_bundle" / "models" / "operating_point.json"
    threshold = json.loads(operating_point.read_text())["threshold"]
    assert list(frame.columns) == COLUMNS
    assert set(frame.melanoma_suspected) <= {0, 1}
    # The CSV rounds to 6 decimals; only a probability that close to the threshold is ambiguous.
    clear = (frame.melanoma_probability - threshold).abs() > 1e-6
    expected = (frame.melanoma_probability >= threshold).astype(int)
    assert (frame.melanoma_suspected[clear] == expected[clear]).all()


def _demographics(age: float | None, sex: str | None, site: str | None) -> Demographics:
    def sourced(value: object) -> Sourced:
        return Sourced(value, Source.CSV, "csv") if value is not None else Sourced.missing()

    return Demographics(sourced(age), sourced(sex), sourced(site))


def _predict_frame(tmp_path: Path, *extra: str) -> pd.DataFrame:
    out = tmp_path / "out.csv"
    assert main(["predict", "--images", str(SAMPLES), "--out", str(out), *extra]) == 0
    frame = pd.read_csv(out)
    _check_decisions(frame)
    return frame.set_index("image_name")


def _predict(tmp_path: Path, *extra: str) -> pd.Series:
    return _predict_frame(tmp_path, *extra).melanoma_probability


def test_predict_equals_the_service_model_and_ranks_the_sample_melanomas_first(
    tmp_path: Path, fusion_model
) -> None:  # type: ignore[no-untyped-def]
    frame = _predict_frame(tmp_path, "--metadata", str(SAMPLES / "samples.csv"))
    predicted = frame.melanoma_probability
    table = read_metadata_csv(SAMPLES / "samples.csv")
    assert set(predicted.index) == MELANOMAS | BENIGN
    for name, probability in predicted.items():
        fields = table[str(name)]
        finding = fusion_model.score(
            [load_rgb(SAMPLES / f"{name}.jpg")],
            [_demographics(fields["age"], fields["sex"], fields["site"])],
        )[0]
        assert probability == pytest.approx(finding.probability, abs=1e-5), name
        if abs(finding.probability - finding.threshold) > 1e-5:  # same decision as SR/FHIR
            assert frame.melanoma_suspected[name] == int(finding.melanoma_suspected), name
    assert min(predicted[list(MELANOMAS)]) > max(predicted[list(BENIGN)])


def test_ham10000_columns_and_missing_cells(tmp_path: Path) -> None:
    isic_style = _predict(tmp_path, "--metadata", str(SAMPLES / "samples.csv"))
    ham = tmp_path / "ham.csv"
    ham.write_text(
        "image_id,lesion_id,dx,age,sex,localization\n"
        "ISIC_0024525,HAM_1,mel,65.0,male,upper extremity\n"
        "ISIC_0024307,HAM_2,nv,50.0,male,lower extremity\n"
        "ISIC_0337631,x,mel,55.0,female,back\n"
        "ISIC_0162627,x,nv,,unknown,unknown\n"
    )
    ham_style = _predict(tmp_path, "--metadata", str(ham))
    for name in ("ISIC_0024525", "ISIC_0024307", "ISIC_0337631"):  # back maps to torso
        assert ham_style[name] == pytest.approx(isic_style[name], abs=1e-6)
    names_only = tmp_path / "names.csv"
    names_only.write_text("image_name\nISIC_0162627\n")
    no_metadata = _predict(tmp_path, "--metadata", str(names_only))
    no_csv = _predict(tmp_path)
    assert ham_style["ISIC_0162627"] == pytest.approx(no_metadata["ISIC_0162627"], abs=1e-6)
    assert no_csv["ISIC_0162627"] == pytest.approx(no_metadata["ISIC_0162627"], abs=1e-6)
    assert isic_style["ISIC_0162627"] != pytest.approx(no_metadata["ISIC_0162627"], abs=1e-6)


def test_csv_without_an_image_column_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("name,age\nx,3\n")
    with pytest.raises(ValueError, match="no image-name column"):
        read_metadata_csv(bad)


def test_bundle_runs_standalone_with_monai_bundle_run(tmp_path: Path, fusion_model) -> None:  # type: ignore[no-untyped-def]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "monai_bundle/configs/inference.json",
            "--meta_file",
            "monai_bundle/configs/metadata.json",
            "--dataset_dir",
            str(SAMPLES),
            "--output_dir",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    predicted = pd.read_csv(tmp_path / "predictions.csv")
    _check_decisions(predicted)
    predicted = predicted.set_index("image_name")
    image = read_image(SAMPLES / "dms_jpeg_baseline.dcm")  # the pixels of ISIC_0024525.jpg
    unknown = fusion_model.score([image.rgb], [Demographics.unknown()])[0].probability
    assert predicted.melanoma_probability["ISIC_0024525"] == pytest.approx(unknown, abs=1e-5)


# Runs the bundle as MONAI does, from the bundle's own folder, with any import of the service's
# code (``plugin``) or of the training code turned into an error.
_STANDALONE = """
import runpy, sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("plugin", "training", "dicom_io", "fhir_io"):
            raise ImportError(f"the bundle imported {name}")
        return None

sys.meta_path.insert(0, Refuse())
sys.argv = ["monai.bundle", "run", "--config_file", "configs/inference.json",
            "--meta_file", "configs/metadata.json", "--bundle_root", ".",
            "--dataset_dir", sys.argv[1], "--output_dir", sys.argv[2]]
runpy.run_module("monai.bundle", run_name="__main__")
"""


def test_bundle_runs_from_its_own_folder_without_the_service_or_training_code(
    tmp_path: Path,
) -> None:
    run = subprocess.run(
        [sys.executable, "-c", _STANDALONE, str(SAMPLES), str(tmp_path)],
        cwd=REPO_ROOT / "monai_bundle",
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    predicted = pd.read_csv(tmp_path / "predictions.csv")
    assert list(predicted.columns) == ["image_name", "melanoma_probability", "melanoma_suspected"]
    assert len(predicted) == len(list(SAMPLES.glob("*.jpg")))
