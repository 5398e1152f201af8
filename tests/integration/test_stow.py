"""Issue 20, item 6: STOW-RS delivery tested against Orthanc's DICOMweb plugin.

`dermfusion serve` with ``[pacs] protocol = "stow-rs"`` and the saliency capture on; a study goes
straight to dermfusion with DCMTK storescu, and the SRs and captures are read back over Orthanc's
REST API. Orthanc loads the DICOMweb plugin at /dicom-web/ (configs/orthanc/orthanc.json).
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pydicom
import pytest

from tests.conftest import dermfusion_command
from tests.integration.dermfusion_process import (
    DermfusionProcess,
    eventually,
    free_port,
    write_config,
)
from tests.integration.orthanc_server import OrthancServer
from tests.integration.test_service import (
    _captures_in_orthanc,
    _srs_in_orthanc,
    _storescu,
    _study,
)

pytestmark = pytest.mark.integration


@contextmanager
def _stow_rs_service(
    workdir: Path, dicomweb_url: str, **config: object
) -> Iterator[DermfusionProcess]:
    """`dermfusion serve` delivering to the PACS by STOW-RS only (no ae_title, host, port)."""
    workdir.mkdir(parents=True)
    port = free_port()
    path = write_config(workdir / "dermfusion.toml", port=port, storage=workdir / "var", **config)  # type: ignore[arg-type]
    with path.open("a") as site:
        site.write(f'[pacs]\nprotocol = "stow-rs"\ndicomweb_url = "{dicomweb_url}"\n')
    service = DermfusionProcess(workdir, port, path)
    service.start()
    try:
        yield service
    finally:
        service.kill(signal.SIGTERM)


def _outbox(service: DermfusionProcess) -> dict[str, tuple[float | None, float | None, str]]:
    """Outbox key -> (delivered_at, parked_at, last_error), read as an operator would."""
    with closing(sqlite3.connect(service.workdir / "var" / "state.sqlite3")) as db:
        rows = db.execute("SELECT key, delivered_at, parked_at, last_error FROM outbox").fetchall()
    return {key: (delivered, parked, error or "") for key, delivered, parked, error in rows}


def test_stow_rs_delivers_srs_and_captures_once_and_a_resend_does_not_duplicate(
    orthanc: OrthancServer, tmp_path: Path
) -> None:
    with _stow_rs_service(
        tmp_path / "svc", f"{orthanc.http}/dicom-web/", secondary_capture=True
    ) as service:
        study_uid, files = _study(tmp_path, "DF-STOW-0001", age="047Y", sex="F", images=2)
        _storescu(service.ae_title, service.port, files)
        srs = eventually(
            lambda: (s := _srs_in_orthanc(orthanc, study_uid)) and len(s) == 2 and s,
            120,
            "two SRs in the study in Orthanc",
        )
        captures = eventually(
            lambda: (c := _captures_in_orthanc(orthanc, study_uid)) and len(c) == 2 and c,
            60,
            "two saliency captures in the study in Orthanc",
        )
        sources = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
        assert {sr.source_sop_instance_uid for sr in srs} == sources
        assert {sr.visual_explanation_uid for sr in srs} == {c.SOPInstanceUID for c in captures}
        assert all(sr.age == 47.0 for sr in srs)
        # They came over HTTP, not DICOM: Orthanc notes its DICOMweb plugin as their origin and
        # no calling AE.
        for instance in orthanc.study_instances(study_uid):
            metadata = orthanc.instance_metadata(instance["ID"])
            assert (metadata["Origin"], metadata.get("RemoteAET", "")) == ("Plugins", "")
        first = eventually(
            lambda: (o := _outbox(service)) and len(o) == 6 and all(v[0] for v in o.values()) and o,
            60,
            "two SRs and two captures delivered, two overlays drawn",
        )
        log = service.log_text()
        assert log.count("STOW-RS of ") == 4 and log.count(": success (") == 4
        assert "C-STORE of" not in log and "DF-STOW-0001" not in log

        resent_at = time.time()
        resend = subprocess.run(
            [*dermfusion_command(), "resend", study_uid, "--config", str(service.config)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert resend.returncode == 0, resend.stderr
        assert resend.stdout == (
            f"resend {study_uid}: 6 deliveries re-queued (explanation 2, pacs 4)\n"
        )
        eventually(
            lambda: all((v[0] or 0) >= resent_at for v in _outbox(service).values()),
            60,
            "all six delivered (drawn) again",
        )
        log = service.log_text()
        for key in first:
            assert log.count(f"outbox: delivered {key} to ") == 2
        # Orthanc answered the re-stored instances as stored, and keeps one of each.
        assert len(_srs_in_orthanc(orthanc, study_uid)) == 2
        assert len(_captures_in_orthanc(orthanc, study_uid)) == 2
        assert len(orthanc.study_instances(study_uid)) == 4


def test_a_dicomweb_url_the_pacs_does_not_serve_is_parked_with_a_readable_reason(
    orthanc: OrthancServer, tmp_path: Path
) -> None:
    with _stow_rs_service(
        tmp_path / "svc", f"{orthanc.http}/no-dicom-web", outbox_max_attempts=2
    ) as service:
        study_uid, files = _study(tmp_path, "DF-STOW-0002", age="061Y", sex="M")
        _storescu(service.ae_title, service.port, files)
        service.wait_for_log("parked after 2 refused attempt(s)", timeout=120)
        outbox = _outbox(service)
        assert {key.split(":")[0] for key in outbox} == {"sr", "explain"}
        (delivered, parked, last_error) = next(v for k, v in outbox.items() if k.startswith("sr:"))
        assert delivered is None and parked is not None
        assert last_error == (
            "refused or unreadable: PacsRejectedError: HTTP 404 Not Found: check pacs.dicomweb_url"
        )
        assert orthanc.study_id(study_uid) is None
        assert service.process is not None and service.process.poll() is None
