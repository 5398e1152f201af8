"""The C-STORE sender against DCMTK storescp and pynetdicom SCPs that answer chosen statuses."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.events import Event

from dicom_io.images import read_image
from dicom_io.sender import (
    COMPREHENSIVE_3D_SR,
    CStoreSender,
    PacsRejectedError,
    PacsUnavailableError,
)
from dicom_io.sr import MeasurementReportWriter
from dicom_io.status import StoreStatus, StoreWarning
from plugin.domain import Demographics, Finding, ModelIdentity
from tests.conftest import SAMPLES, require_tool

PACS_AE = "PACS"


@pytest.fixture(scope="module")
def sr() -> Dataset:
    image = read_image(SAMPLES / "dms_jpeg_baseline.dcm")
    return MeasurementReportWriter().build(
        source=image.dataset,
        ref=image.ref,
        finding=Finding(0.75, 0.5, ModelIdentity("sender test", "1.0.0")),
        demographics=Demographics.unknown(),
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sender(port: int, peer_ae: str = PACS_AE) -> CStoreSender:
    return CStoreSender(
        calling_ae="DERMFUSION",
        peer_ae=peer_ae,
        host="127.0.0.1",
        port=port,
        connection_timeout=5,
        acse_timeout=10,
        dimse_timeout=10,
        network_timeout=10,
    )


def _storescp(port: int, out: Path, *options: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [require_tool("storescp"), "-aet", PACS_AE, "-od", str(out), *options, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not _listening(port):
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise RuntimeError(f"storescp did not start on port {port}")
        time.sleep(0.05)
    return process


def _listening(port: int) -> bool:
    """Whether a socket listens on ``port``, read from the kernel's table.

    Probing with a connection would itself be an association attempt: storescp (single
    process) handles it first, and with --refuse its failed reject garbles the next one.
    """
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
    return False


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port = _free_port()
    process = _storescp(port, tmp_path)
    yield port, tmp_path
    process.terminate()
    process.wait(timeout=10)


def _pynetdicom_scp(status: int, *syntaxes: str) -> tuple[AE, int]:
    """A Storage SCP for Comprehensive 3D SR that answers every C-STORE with ``status``."""

    def handle_store(event: Event) -> int:
        return status

    ae = AE(ae_title=PACS_AE)
    ae.add_supported_context(
        COMPREHENSIVE_3D_SR, list(syntaxes or (ExplicitVRLittleEndian, ImplicitVRLittleEndian))
    )
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)]
    )
    assert server is not None
    return ae, int(server.server_address[1])


def test_sr_arrives_at_storescp(
    storescp: tuple[int, Path], sr: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    port, out = storescp
    with caplog.at_level(logging.INFO, logger="dicom_io.sender"):
        _sender(port).send(sr)
    (received,) = out.iterdir()
    back = pydicom.dcmread(received)
    assert back.SOPClassUID == COMPREHENSIVE_3D_SR
    assert back.SOPInstanceUID == sr.SOPInstanceUID
    (line,) = [r.getMessage() for r in caplog.records if r.name == "dicom_io.sender"]
    assert sr.SOPInstanceUID in line and "success" in line


def test_sr_file_path_is_sent(storescp: tuple[int, Path], sr: Dataset, tmp_path: Path) -> None:
    port, out = storescp
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    _sender(port).send(path)
    assert any(f.name.endswith(sr.SOPInstanceUID) for f in out.iterdir())


def test_nothing_listening_is_unavailable(sr: Dataset) -> None:
    with pytest.raises(PacsUnavailableError, match="connection refused"):
        _sender(_free_port()).send(sr)


def test_storescp_refusing_the_association_is_unavailable(sr: Dataset, tmp_path: Path) -> None:
    port = _free_port()
    process = _storescp(port, tmp_path, "--refuse")
    try:
        # Also checks the workaround for pynetdicom losing a quick A-ASSOCIATE-RJ (it would
        # say "aborted" about 2 times in 3 here).
        with pytest.raises(
            PacsUnavailableError,
            match=r"association rejected: Rejected \(Permanent\), DUL service-user",
        ):
            _sender(port).send(sr)
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_failure_status_is_rejected_with_the_status(sr: Dataset) -> None:
    ae, port = _pynetdicom_scp(StoreStatus.OUT_OF_RESOURCES)
    try:
        with pytest.raises(PacsRejectedError) as raised:
            _sender(port).send(sr)
    finally:
        ae.shutdown()
    assert raised.value.status == 0xA700


def test_warning_status_counts_as_success(sr: Dataset, caplog: pytest.LogCaptureFixture) -> None:
    ae, port = _pynetdicom_scp(StoreWarning.COERCION_OF_DATA_ELEMENTS)
    try:
        with caplog.at_level(logging.INFO, logger="dicom_io.sender"):
            _sender(port).send(sr)
    finally:
        ae.shutdown()
    (record,) = [r for r in caplog.records if r.name == "dicom_io.sender"]
    assert record.levelno == logging.WARNING
    assert "0xB000 COERCION_OF_DATA_ELEMENTS" in record.getMessage()


def test_sop_class_not_accepted_is_rejected_without_status(sr: Dataset) -> None:
    ae = AE(ae_title=PACS_AE)
    ae.add_supported_context("1.2.840.10008.1.1")  # Verification only
    server = ae.start_server(("127.0.0.1", 0), block=False)
    assert server is not None
    try:
        with pytest.raises(PacsRejectedError, match="no presentation context") as raised:
            _sender(int(server.server_address[1])).send(sr)
    finally:
        ae.shutdown()
    assert raised.value.status is None
