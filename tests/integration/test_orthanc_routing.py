"""Orthanc auto-routes dermoscopy studies to the "DERMFUSION" AE once, and keeps SRs sent back.

Real parts only, no dermfusion code: Debian's Orthanc with ``configs/orthanc`` plays the PACS,
DCMTK ``storescp`` plays the dermfusion listener and ``storescu`` plays the modality (and
dermfusion storing its SR back). Orthanc listens on all interfaces, so these tests only run
inside a private network namespace:

    unshare -n sh -c 'ip link set lo up && .venv/bin/python -m pytest tests/integration/...'

Orthanc's routing is asynchronous and a study that gets nothing more is silent, so "nothing
was forwarded" is proved with a barrier: routing runs one event at a time in arrival order,
so once a later dermoscopy study has arrived at storescp, the earlier stable study's routing
has finished.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes

from tests.conftest import require_tool
from tests.integration.orthanc_server import (
    FORWARDED_MARK,
    OrthancServer,
    free_port,
    in_private_network,
    orthanc_binary,
    running_orthanc,
)

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data"
DMS_FILE = DATA / "dms_jpeg_baseline.dcm"
DMS = "1.2.840.10008.5.1.4.1.1.77.1.7"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
STUDY_CLASSES = sorted([DMS, VL_PHOTOGRAPHIC, COMPREHENSIVE_3D_SR])  # after the SR came back
DERMFUSION_AE = "DERMFUSION"
TIMEOUT_S = 30.0  # generous: CI machines are shared; a pass takes ~2 s per stable study
TOOL_ENV = dict(os.environ, TCP_NODELAY="1")  # DCMTK leaves Nagle on otherwise (~50 ms/C-STORE)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> None:
    """Poll until ``condition()`` holds; fail the test naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def study_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


@dataclass
class FakeDermfusion:
    """DCMTK storescp answering as the dermfusion listener; files land in ``folder``."""

    folder: Path
    port: int

    def received(self) -> list[str]:
        """SOP Instance UIDs of every C-STORE so far, sorted, repeats kept (``+uf``)."""
        uids = []
        for path in self.folder.iterdir():
            # A file still being written is skipped until the next poll.
            with contextlib.suppress(InvalidDicomError, EOFError, OSError, ValueError, KeyError):
                uids.append(sop_uid(path))
        return sorted(uids)


@dataclass
class Routing:
    orthanc: OrthancServer
    dermfusion: FakeDermfusion
    tmp: Path

    def send(self, *files: Path, calling_ae: str = "MODALITY") -> None:
        """C-STORE files into Orthanc, proposing their own SOP classes and JPEG Baseline."""
        # -R: propose only the files' SOP classes; storescu's default list lacks DMS and
        # Comprehensive 3D SR. -xy: propose JPEG Baseline (else storescu tries to transcode).
        args = [require_tool("storescu"), "-R", "-xy", "-aet", calling_ae, "-aec", "ORTHANC"]
        args += ["127.0.0.1", str(self.orthanc.dicom_port), *map(str, files)]
        run = subprocess.run(args, capture_output=True, text=True, env=TOOL_ENV, check=False)
        assert run.returncode == 0, run.stderr

    def make_image(self, name: str, *options: str, jpeg: str = "ISIC_0024307.jpg") -> Path:
        """img2dcm from a sample JPEG (a new study unless options say otherwise)."""
        out = self.tmp / name
        args = [require_tool("img2dcm"), *options, str(DATA / jpeg), str(out)]
        subprocess.run(args, check=True, capture_output=True, env=TOOL_ENV)
        return out

    def wait_forwarded(self, uids: set[str]) -> None:
        wait_for(lambda: uids <= set(self.dermfusion.received()), f"storescp to get {uids}")


@contextlib.contextmanager
def fake_dermfusion(folder: Path) -> Iterator[FakeDermfusion]:
    """storescp as AE DERMFUSION: all transfer syntaxes (Orthanc forwards JPEG as is), and
    unique file names, so that an instance received twice shows up twice."""
    folder.mkdir()
    port = free_port()
    args = [require_tool("storescp"), "-aet", DERMFUSION_AE, "+xa", "+uf", "-od", str(folder)]
    log_path = folder.with_suffix(".log")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*args, str(port)], env=TOOL_ENV, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 10.0
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"storescp did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        yield FakeDermfusion(folder, port)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def routing(tmp_path: Path) -> Iterator[Routing]:
    """A fresh Orthanc routing to a fresh fake dermfusion, both on loopback."""
    if not in_private_network():
        pytest.skip(
            "Orthanc listens on every interface: run under "
            "`unshare -n sh -c 'ip link set lo up && ...'`"
        )
    orthanc_binary()  # not installed: an error (`make orthanc-install`), not a skip
    with (
        fake_dermfusion(tmp_path / "received") as dermfusion,
        running_orthanc(
            tmp_path / "orthanc",
            dicom_port=free_port(),
            http_port=free_port(),
            dermfusion_port=dermfusion.port,
            dermfusion_ae=DERMFUSION_AE,
        ) as orthanc,
    ):
        yield Routing(orthanc, dermfusion, tmp_path)


def make_sr(source: Path, out: Path) -> Path:
    """A minimal Comprehensive 3D SR in the source image's study, as dermfusion would send."""
    image = pydicom.dcmread(source, stop_before_pixels=True)
    root = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurementReport, template_id="1500")
    comment = hd.sr.TextContentItem(
        name=codes.DCM.Comment,
        value="routing test",
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    root.ContentSequence = hd.sr.ContentSequence([comment])
    sr = hd.sr.Comprehensive3DSR(
        evidence=[image],
        content=root,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="dermfusion routing test",
    )
    sr.save_as(out)
    return out


def test_dermoscopy_study_is_forwarded_once_and_the_sr_joins_it(routing: Routing) -> None:
    orthanc = routing.orthanc
    # One study, two series: the Dermoscopic Photography sample and a VL Photographic image.
    vlp = routing.make_image("vlp.dcm", "-vlp", "-stf", str(DMS_FILE))
    study = study_uid(DMS_FILE)
    assert study_uid(vlp) == study
    images = {sop_uid(DMS_FILE), sop_uid(vlp)}

    routing.send(DMS_FILE, vlp)
    routing.wait_forwarded(images)
    assert routing.dermfusion.received() == sorted(images)
    for item in orthanc.study_instances(study):
        assert FORWARDED_MARK in orthanc.instance_metadata(item["ID"])

    # dermfusion stores its SR back: the study turns unstable, then stable again.
    sr = make_sr(DMS_FILE, routing.tmp / "sr.dcm")
    routing.send(sr, calling_ae=DERMFUSION_AE)
    wait_for(lambda: len(orthanc.study_instances(study)) == 3, "the SR in Orthanc")
    wait_for(lambda: orthanc.is_stable(study), "the study to be stable again")
    assert orthanc.sop_classes_in_study(study) == STUDY_CLASSES

    # Barrier: a later study's images arrive only after the first study's routing ran again.
    barrier = routing.make_image("barrier.dcm", "-vlp", jpeg="ISIC_0024525.jpg")
    routing.send(barrier)
    routing.wait_forwarded({sop_uid(barrier)})
    assert routing.dermfusion.received() == sorted(images | {sop_uid(barrier)}), "re-sent"

    [sr_item] = [
        item
        for item in orthanc.study_instances(study)
        if item["MainDicomTags"]["SOPInstanceUID"] == sop_uid(sr)
    ]
    sr_meta = orthanc.instance_metadata(sr_item["ID"])
    assert sr_meta["SopClassUid"] == COMPREHENSIVE_3D_SR
    assert sr_meta["RemoteAET"] == DERMFUSION_AE
    assert FORWARDED_MARK not in sr_meta

    # The PACS restarts on the same storage: the study and the forwarded marks survive.
    orthanc.stop()
    orthanc.start()
    assert orthanc.sop_classes_in_study(study) == STUDY_CLASSES
    marked = [
        instance_id
        for instance_id in orthanc.get_json("/instances")
        if FORWARDED_MARK in orthanc.instance_metadata(instance_id)
    ]
    assert len(marked) == 3  # the two images and the barrier


def test_non_dermoscopy_study_is_not_forwarded(routing: Routing) -> None:
    # img2dcm's default is Secondary Capture with Modality OT: not a dermoscopy image.
    other = routing.make_image("sc_ot.dcm")
    routing.send(other)
    wait_for(lambda: routing.orthanc.is_stable(study_uid(other)), "the OT study to be stable")

    # Barrier, and the rule's other side: Secondary Capture with Modality XC is forwarded.
    xc = routing.make_image("sc_xc.dcm", "-k", "(0008,0060)=XC", jpeg="ISIC_0024525.jpg")
    routing.send(xc)
    routing.wait_forwarded({sop_uid(xc)})
    assert routing.dermfusion.received() == [sop_uid(xc)]
