"""Dermoscopy studies made from the shipped sample JPEGs, and DCMTK storescu to send them: what
every integration test that plays the modality or the PACS needs."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from pydicom.uid import JPEGBaseline8Bit, generate_uid

from dicom_io.encapsulate import dermoscopy_dataset, write_dataset
from plugin.domain import SiteCode
from tests.conftest import SAMPLES, require_tool


def dermoscopy_study(
    folder: Path,
    *,
    patient_id: str,
    images: int = 1,
    first_image: int = 0,
    patient_name: str = "Integration^Test",
    age: str | None = "050Y",
    sex: str | None = "F",
    birth_date: str | None = None,
) -> tuple[str, list[Path]]:
    """A new study (fresh UIDs every time) of ``images`` JPEG-baseline dermoscopy instances."""
    folder.mkdir(parents=True, exist_ok=True)
    jpegs = sorted(SAMPLES.glob("ISIC_*.jpg"))
    study_uid = generate_uid()
    files = []
    for index in range(images):
        ds = dermoscopy_dataset(
            jpegs[(first_image + index) % len(jpegs)],
            transfer_syntax=JPEGBaseline8Bit,
            patient_id=patient_id,
            patient_name=patient_name,
            patient_age=age,
            patient_sex=sex,
            study_date="20240116",
            site=SiteCode("22943007", "Trunk"),
            study_uid=study_uid,
        )
        if birth_date is not None:
            ds.PatientBirthDate = birth_date
        files.append(write_dataset(ds, folder / f"{study_uid}-{index}.dcm"))
    return study_uid, files


def storescu(
    called_ae: str, port: int, files: Sequence[Path], calling_ae: str = "STORESCU"
) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu as a modality runs it: its own SOP classes (-R), JPEG as is (-xy)."""
    return subprocess.run(
        [require_tool("storescu"), "-R", "-xy", "-aet", calling_ae, "-aec", called_ae]
        + ["127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
