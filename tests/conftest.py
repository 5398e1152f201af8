"""Shared fixtures: where things are, the shipped model, the real FHIR server and Orthanc."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.integration.orthanc_server import OrthancServer

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT.parent / "shared" / "data").resolve()
SAMPLES = REPO_ROOT / "tests" / "data"
BIN = REPO_ROOT / ".venv" / "bin"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The full training data; absent on a user's clone, present in CI."""
    if not (SHARED_DATA / "ham10000" / "metadata.csv").is_file():
        pytest.skip(f"needs the training data at {SHARED_DATA} (not shipped with the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def fusion_model():  # type: ignore[no-untyped-def]
    from plugin.model import FusionModel

    return FusionModel.load(REPO_ROOT / "monai_bundle")


def require_tool(name: str) -> str:
    """Path of a DCMTK/dicom3tools program; `make test` installs them, so absence is an error."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not on PATH: run `make system-deps`")
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines dicom3tools' dciodvfy flags as errors (warnings are allowed)."""
    result = subprocess.run(
        [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, check=False
    )
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]


@pytest.fixture(scope="session")
def fhir_base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real sekmet-fhir server on loopback for the whole test session."""
    from tests.integration.fhir_server import running_fhir_server

    venv = REPO_ROOT / ".venv-fhir"
    if not (venv / "bin" / "sekmet").exists():
        raise RuntimeError(f"{venv} has no sekmet: run `make fhir-server-install`")
    with running_fhir_server(venv, tmp_path_factory.mktemp("fhir")) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """A real Orthanc of the test module's own, as the PACS dermfusion delivers to (nothing is
    routed to dermfusion: tests send studies to it straight). test_service.py has its own,
    routing one."""
    from tests.integration.orthanc_server import free_port, in_private_network, running_orthanc

    if not in_private_network():
        pytest.skip("Orthanc binds every interface: run inside `unshare -n` (make test does)")
    with running_orthanc(
        tmp_path_factory.mktemp("orthanc"),
        dicom_port=free_port(),
        http_port=free_port(),
        dermfusion_port=free_port(),
    ) as server:
        yield server


@pytest.fixture(autouse=True)
def _tcp_nodelay(monkeypatch: pytest.MonkeyPatch) -> None:
    """DCMTK tools leave Nagle on unless told otherwise (~50 ms per C-STORE on loopback)."""
    monkeypatch.setenv("TCP_NODELAY", "1")


def predicted_probabilities(images: Path, metadata: Path, out: Path) -> dict[str, float]:
    """`dermfusion predict` as a user runs it, read back as image name -> probability."""
    subprocess.run(
        [
            *dermfusion_command(),
            "predict",
            "--images",
            str(images),
            "--metadata",
            str(metadata),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    with out.open() as handle:
        return {
            row["image_name"]: float(row["melanoma_probability"]) for row in csv.DictReader(handle)
        }


def dermfusion_command() -> list[str]:
    exe = BIN / "dermfusion"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "plugin"]
