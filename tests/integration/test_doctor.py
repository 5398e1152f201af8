"""`dermfusion doctor` as an operator runs it, against a real Orthanc and a real FHIR server:
all green, then each peer away in turn (its own line red, exit status 1)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import dermfusion_command
from tests.integration.dermfusion_process import free_port, running_dermfusion, write_config
from tests.integration.orthanc_server import OrthancServer, in_private_network, running_orthanc

pytestmark = pytest.mark.integration
DOCTOR_TIMEOUT_S = 180  # loads the model and runs one inference on a busy 2-core machine


def _doctor(config: Path) -> tuple[int, dict[str, str]]:
    """Exit status and each check's line by check name (``OK   pacs: …`` under ``pacs``)."""
    run = subprocess.run(
        [*dermfusion_command(), "doctor", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=DOCTOR_TIMEOUT_S,
    )
    lines = run.stdout.splitlines()
    by_name = {line[5:].split(":", 1)[0]: line for line in lines}
    assert len(by_name) == len(lines), run.stdout
    assert "\033[" not in run.stdout  # not a TTY: no colour
    return run.returncode, by_name


def _config(tmp_path: Path, *, pacs_port: int, fhir_url: str) -> Path:
    return write_config(
        tmp_path / "dermfusion.toml",
        port=free_port(),
        storage=tmp_path / "var",
        pacs_port=pacs_port,
        fhir_url=fhir_url,
    )


def test_all_green_against_orthanc_and_the_fhir_server(
    orthanc: OrthancServer, fhir_base_url: str, tmp_path: Path
) -> None:
    status, lines = _doctor(_config(tmp_path, pacs_port=orthanc.dicom_port, fhir_url=fhir_base_url))
    assert list(lines) == [
        "config",
        "storage",
        "free space",
        "model",
        "pacs",
        "fhir",
        "listener port",
    ]
    assert all(line.startswith("OK   ") for line in lines.values()), "\n".join(lines.values())
    assert status == 0
    assert lines["pacs"].startswith(
        f"OK   pacs: C-ECHO to ORTHANC@127.0.0.1:{orthanc.dicom_port} answered success"
    )
    assert lines["fhir"].startswith(f"OK   fhir: {fhir_base_url} (SEKMET FHIR R4 Tester")
    assert "test inference on a synthetic image in" in lines["model"]


def test_pacs_stopped_is_red(fhir_base_url: str, tmp_path: Path) -> None:
    if not in_private_network():
        pytest.skip("Orthanc binds every interface: run inside `unshare -n` (make test does)")
    with running_orthanc(
        tmp_path / "orthanc",
        dicom_port=free_port(),
        http_port=free_port(),
        dermfusion_port=free_port(),
    ) as stopped:
        pacs_port = stopped.dicom_port
    status, lines = _doctor(_config(tmp_path, pacs_port=pacs_port, fhir_url=fhir_base_url))
    assert lines["pacs"] == (
        f"FAIL pacs: C-ECHO to ORTHANC@127.0.0.1:{pacs_port} refused — is the PACS running? "
        "check [pacs] host/port"
    )
    assert lines["fhir"].startswith("OK   fhir:")
    assert status == 1


def test_fhir_server_unreachable_is_red(orthanc: OrthancServer, tmp_path: Path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}/fhir"
    status, lines = _doctor(_config(tmp_path, pacs_port=orthanc.dicom_port, fhir_url=nobody))
    assert lines["fhir"].startswith(f"FAIL fhir: GET {nobody}/metadata unreachable (ConnectError")
    assert lines["fhir"].endswith("— is the FHIR server running? check [fhir] base_url")
    assert lines["pacs"].startswith("OK   pacs:")
    assert status == 1


def test_listener_port_taken_by_a_running_service(tmp_path: Path) -> None:
    with running_dermfusion(tmp_path / "serve") as service:
        status, lines = _doctor(service.config)
    assert lines["listener port"] == (
        f"FAIL listener port: 127.0.0.1:{service.port} in use (is dermfusion serve already "
        "running?) — stop what listens there, or set [listener] port"
    )
    assert lines["pacs"] == "OK   pacs: not configured (results stay in outbox)"
    assert status == 1
