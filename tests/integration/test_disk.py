"""Disk and retention under a real `dermfusion serve` (issue 19, item 2).

The service runs in its own mount namespace with a small tmpfs as its storage, so the test can
fill that volume for real (through /proc/PID/root) without touching the machine's disk: a
nearly full volume refuses new associations, a full one postpones scoring without losing the
study, and once space is back everything accepted is reported exactly once.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEGBaseline8Bit, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association

from dicom_io.encapsulate import dermoscopy_dataset, write_dataset
from dicom_io.images import SopClass
from plugin.domain import SiteCode
from tests.conftest import SAMPLES, require_tool
from tests.integration.dermfusion_process import DermfusionProcess, eventually, running_dermfusion

pytestmark = pytest.mark.integration
MIB = 1024 * 1024


def _mount_namespaces() -> bool:
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def _study(folder: Path, name: str, study_uid: str | None = None) -> tuple[str, Path]:
    """A one-image study from a shipped sample JPEG, fresh UIDs (or another image of
    ``study_uid``)."""
    study_uid = study_uid or generate_uid()
    jpeg = sorted(SAMPLES.glob("ISIC_*.jpg"))[0]
    ds = dermoscopy_dataset(
        jpeg,
        transfer_syntax=JPEGBaseline8Bit,
        patient_id=f"DF-DISK-{name}",
        patient_name="Disk^Test",
        patient_age="050Y",
        patient_sex="F",
        study_date="20240116",
        site=SiteCode("22943007", "Trunk"),
        study_uid=study_uid,
    )
    return study_uid, write_dataset(ds, folder / f"{name}.dcm")


def _associate(service: DermfusionProcess) -> Association:
    """An association held open by the test (storescu releases at once)."""
    ae = AE(ae_title="DISKTEST")
    ae.add_requested_context(SopClass.DERMOSCOPIC_PHOTOGRAPHY, JPEGBaseline8Bit)
    association = ae.associate("127.0.0.1", service.port, ae_title=service.ae_title)
    assert association.is_established
    return association


def _storescu(service: DermfusionProcess, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("storescu"), "-R", "-xy", "-aec", service.ae_title, "127.0.0.1"]
        + [str(service.port), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _srs(outbox: Path, study_uid: str) -> list[Path]:
    """The SR files in the outbox for ``study_uid`` (embedded defaults: the results)."""
    out = []
    for path in sorted(outbox.glob("*.dcm")):
        if path.name.endswith("_saliency.dcm"):
            continue
        if pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID == study_uid:
            out.append(path)
    return out


def _fill(volume: Path, leave_bytes: int) -> Path:
    """Write a filler file until ``leave_bytes`` are left free (0: until the volume is full)."""
    filler = volume / f"filler-{leave_bytes}"
    remaining = shutil.disk_usage(volume).free - leave_bytes
    with filler.open("ab") as out:
        while remaining > 0:
            block = min(remaining, MIB)
            try:
                out.write(b"\0" * block)
                out.flush()
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                break
            remaining -= block
    return filler


@contextmanager
def _service_on_tmpfs(
    workdir: Path, size_mb: int, **config: object
) -> Iterator[tuple[DermfusionProcess, Path]]:
    """`dermfusion serve` whose storage folder is a tmpfs of ``size_mb`` in its own mount
    namespace; yields the service and that folder as the test sees it."""
    storage = workdir / "var"
    storage.mkdir(parents=True)
    mount = 'mount -t tmpfs -o "size=$1,mode=0700" tmpfs "$0" && shift && exec "$@"'
    wrapper = ["unshare", "-m", "sh", "-c", mount, str(storage), f"{size_mb}m"]
    with running_dermfusion(workdir, wrapper=wrapper, **config) as service:
        assert service.process is not None
        volume = Path(f"/proc/{service.process.pid}/root") / storage.relative_to("/")
        assert shutil.disk_usage(volume).total <= size_mb * MIB  # the tmpfs, not the disk
        yield service, volume


@pytest.mark.skipif(not _mount_namespaces(), reason="needs `unshare -m` (root) for a tmpfs")
def test_a_nearly_full_disk_refuses_and_a_full_one_loses_nothing(tmp_path: Path) -> None:
    # 64 MB: the storage also keeps the image branch's ONNX export (about 27 MB for bundle
    # 0.7.0's two networks), written at startup before the first study
    with _service_on_tmpfs(tmp_path / "svc", 64, min_free_mb=8, stable_seconds=3.0) as (
        service,
        volume,
    ):
        outbox = volume / "outbox"
        first_uid, first = _study(tmp_path, "first")
        assert _storescu(service, first).returncode == 0
        eventually(lambda: _srs(outbox, first_uid), 60, "the first study's SR")

        # below the watermark: the association is refused with its reason, nothing half-taken
        filler = _fill(volume, leave_bytes=4 * MIB)
        refused_uid, refused = _study(tmp_path, "refused")
        attempt = _storescu(service, refused)
        assert attempt.returncode != 0
        assert "Association Rejected" in attempt.stderr
        service.wait_for_log("below storage.min_free_mb (8)")
        filler.unlink()

        # accepted, then the disk fills up before it is scored: postponed, not counted. A study
        # over one association is scored the moment it is released, so this one comes over
        # two that overlap: once both are released it waits stable_seconds (3 s) to be scored,
        # and the volume is filled meanwhile.
        late_uid, late = _study(tmp_path, "late")
        _, late_second = _study(tmp_path, "late-2", study_uid=late_uid)
        held = _associate(service)
        assert held.send_c_store(pydicom.dcmread(late)).Status == 0
        assert _storescu(service, late_second).returncode == 0
        held.release()
        filler = _fill(volume, leave_bytes=0)
        service.wait_for_log(f"study={late_uid}: not scored, retry in", timeout=30)
        assert service.process is not None and service.process.poll() is None
        assert _srs(outbox, late_uid) == []
        filler.unlink()

        # space is back: the postponed study is reported, new studies are taken again
        eventually(lambda: _srs(outbox, late_uid), 90, "the postponed study's SR")
        after_uid, after = _study(tmp_path, "after")
        assert _storescu(service, after).returncode == 0
        eventually(lambda: _srs(outbox, after_uid), 60, "the SR of a study sent afterwards")

        for study_uid, images in ((first_uid, 1), (late_uid, 2), (after_uid, 1)):
            assert len(_srs(outbox, study_uid)) == images
        assert _srs(outbox, refused_uid) == []  # never acknowledged: the sender still has it
        log = service.log_text()
        assert log.count(f"study={late_uid}: scored 2 image(s)") == 1
        assert "thread died" not in log and "Traceback" not in log
        assert "parked after" not in log


def test_retention_deletes_what_is_over_and_keeps_the_only_copy_of_a_result(
    tmp_path: Path,
) -> None:
    keep_seconds = 4.0
    with running_dermfusion(
        tmp_path / "svc",
        stable_seconds=0.5,
        retention=[f"keep_days = {keep_seconds / 86400}", "pass_minutes = 0.02"],
    ) as service:
        storage = service.workdir / "var"
        study_uid, path = _study(tmp_path, "kept")
        assert _storescu(service, path).returncode == 0
        (sr,) = eventually(lambda: _srs(storage / "outbox", study_uid), 60, "the SR")
        assert (storage / "spool" / study_uid).is_dir()
        service.wait_for_log("retention: removed 1 studies", timeout=30)
        assert not (storage / "spool" / study_uid).exists()
        assert sr.exists()  # no destination: the outbox is where the result is read
        # the study is forgotten: the same image sent again is a new arrival, scored again,
        # and its SR (same UID: same image, same model) replaces the file
        assert _storescu(service, path).returncode == 0
        service.wait_for_log(f"study={study_uid}: scored 1 image(s)", count=2, timeout=60)
        assert _srs(storage / "outbox", study_uid) == [sr]
