"""The Storage SCP over real associations: DCMTK storescu/echoscu as a third-party peer, and
pynetdicom's own AE as SCU where the test needs the exact DIMSE status or rejection reason."""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu import A_ASSOCIATE_RJ

from dicom_io.images import SopClass
from dicom_io.listener import VERIFICATION, AssociationLimits, ReceivedInstance, StorageListener
from dicom_io.spool import write_bytes_durably
from dicom_io.status import StoreStatus
from tests.conftest import SAMPLES, require_tool

AE_TITLE = "DERMFUSION"
DMS_FILE = SAMPLES / "dms_jpeg_baseline.dcm"
VLP_FILE = SAMPLES / "vlp_img2dcm.dcm"


class RecordingSink:
    """Writes each instance to a folder (durably, like the real spool) and records calls."""

    def __init__(self, folder: Path, fail_with: BaseException | None = None) -> None:
        self.folder = folder
        self.fail_with = fail_with
        self.instances: list[ReceivedInstance] = []
        self.closed: list[str] = []
        self._lock = threading.Lock()

    def accept(self, instance: ReceivedInstance) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        write_bytes_durably(instance.encoded, self.path_of(instance.sop_instance_uid))
        with self._lock:
            self.instances.append(instance)

    def association_closed(self, association_id: str) -> None:
        with self._lock:
            self.closed.append(association_id)

    def path_of(self, sop_instance_uid: str) -> Path:
        return self.folder / f"{sop_instance_uid}.dcm"


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Association teardown finishes in the listener's threads after the peer returns."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def sink(tmp_path: Path) -> RecordingSink:
    return RecordingSink(tmp_path)


@pytest.fixture
def listener(sink: RecordingSink) -> Iterator[StorageListener]:
    with StorageListener(ae_title=AE_TITLE, port=0, host="127.0.0.1", sink=sink) as running:
        yield running


def _storescu(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("storescu"), "-aet", "STORESCU", "-aec", AE_TITLE, *args[:-1]]
        + ["127.0.0.1", str(port), args[-1]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _scu(*contexts: tuple[str, Sequence[str]], ae_title: str = "TESTSCU") -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    return ae


def _associate(ae: AE, port: int) -> Association:
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    return assoc


def _c_store_status(port: int, ds: Dataset | Path, context: tuple[str, Sequence[str]]) -> int:
    assoc = _associate(_scu(context), port)
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _ct_file(path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.zeros((4, 4), np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# Third-party peer: DCMTK.


@pytest.mark.parametrize("source", [DMS_FILE, VLP_FILE], ids=["dermoscopic", "vl-photographic"])
def test_storescu_jpeg_baseline_is_stored_as_received(
    listener: StorageListener, sink: RecordingSink, source: Path
) -> None:
    # -R: propose only the file's SOP class. storescu 3.6.7's default proposal (its built-in
    # list of 128 storage classes) lacks Dermoscopic Photography. -xy: send JPEG as is.
    result = _storescu(listener.port, "-R", "-xy", str(source))
    assert result.returncode == 0, result.stderr
    original = pydicom.dcmread(source)
    stored = pydicom.dcmread(sink.path_of(original.SOPInstanceUID))
    assert stored.SOPInstanceUID == original.SOPInstanceUID
    assert stored.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert stored.PixelData == original.PixelData
    (instance,) = sink.instances
    assert (instance.sop_class_uid, instance.study_instance_uid, instance.calling_ae) == (
        original.SOPClassUID,
        original.StudyInstanceUID,
        "STORESCU",
    )
    assert _wait_for(lambda: sink.closed == [instance.association_id])
    assert not list(sink.folder.glob("*.tmp"))


def test_echoscu_succeeds(listener: StorageListener) -> None:
    result = subprocess.run(
        [require_tool("echoscu"), "-aec", AE_TITLE, "127.0.0.1", str(listener.port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_ct_is_refused_at_negotiation(
    listener: StorageListener, sink: RecordingSink, tmp_path: Path
) -> None:
    ct = _ct_file(tmp_path / "ct.dcm")
    # Proposing only CT: the association is accepted with every context rejected.
    only_ct = _storescu(listener.port, "-R", str(ct))
    assert only_ct.returncode == 1
    assert "No Acceptable Presentation Contexts" in only_ct.stderr
    # storescu's default proposal: our image classes are accepted, CT is not.
    default = _storescu(listener.port, str(ct))
    assert default.returncode == 1
    assert "No presentation context for: (CT) 1.2.840.10008.5.1.4.1.1.2" in default.stderr
    assert "0006:0208" in default.stderr
    assert sink.instances == []


# pynetdicom as SCU: exact statuses and reasons.


def test_calling_ae_not_allowed_is_rejected(sink: RecordingSink) -> None:
    with StorageListener(
        ae_title=AE_TITLE,
        port=0,
        host="127.0.0.1",
        sink=sink,
        allowed_calling_aes=["ORTHANC"],
    ) as listener:
        # The RJ PDU as received: pynetdicom's requestor may report a quick rejection as an
        # abort (its reader closes the socket before the requesting thread looks).
        received: list[A_ASSOCIATE_RJ] = []

        def keep(event: Event) -> None:
            if isinstance(event.pdu, A_ASSOCIATE_RJ):
                received.append(event.pdu)

        assoc = _scu((VERIFICATION, [ExplicitVRLittleEndian]), ae_title="INTRUDER").associate(
            "127.0.0.1", listener.port, ae_title=AE_TITLE, evt_handlers=[(evt.EVT_PDU_RECV, keep)]
        )
        assert not assoc.is_established
        (rj,) = received
        # Rejected (permanent), by the service user, "calling AE title not recognized".
        assert (rj.result, rj.source, rj.reason_diagnostic) == (0x01, 0x01, 0x03)
        allowed = _scu((VERIFICATION, [ExplicitVRLittleEndian]), ae_title="ORTHANC")
        ok = _associate(allowed, listener.port)
        assert int(ok.send_c_echo().Status) == StoreStatus.SUCCESS
        ok.release()
    assert len(sink.closed) == 1  # the rejected association is not reported


def test_sink_oserror_is_out_of_resources(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sink = RecordingSink(tmp_path, fail_with=OSError(28, "No space left on device"))
    ds = pydicom.dcmread(DMS_FILE)
    with (
        caplog.at_level(logging.WARNING, logger="dicom_io.listener"),
        StorageListener(ae_title=AE_TITLE, port=0, host="127.0.0.1", sink=sink) as listener,
    ):
        status = _c_store_status(
            listener.port, ds, (SopClass.DERMOSCOPIC_PHOTOGRAPHY, [JPEGBaseline8Bit])
        )
    assert (status, StoreStatus(status).name) == (0xA700, "OUT_OF_RESOURCES")
    (record,) = [r for r in caplog.records if r.name == "dicom_io.listener"]
    assert "0xA700 OUT_OF_RESOURCES" in record.getMessage()
    assert ds.SOPInstanceUID in record.getMessage()
    for identifier in (str(ds.PatientName), str(ds.PatientID)):
        assert identifier not in caplog.text


def test_sink_bug_is_processing_failure(tmp_path: Path) -> None:
    sink = RecordingSink(tmp_path, fail_with=RuntimeError("state database is locked"))
    with StorageListener(ae_title=AE_TITLE, port=0, host="127.0.0.1", sink=sink) as listener:
        status = _c_store_status(
            listener.port,
            pydicom.dcmread(DMS_FILE),
            (SopClass.DERMOSCOPIC_PHOTOGRAPHY, [JPEGBaseline8Bit]),
        )
    assert (status, StoreStatus(status).name) == (0x0110, "PROCESSING_FAILURE")


def test_missing_study_uid_cannot_be_understood(
    listener: StorageListener, sink: RecordingSink, caplog: pytest.LogCaptureFixture
) -> None:
    ds = pydicom.dcmread(DMS_FILE)
    del ds.StudyInstanceUID
    with caplog.at_level(logging.WARNING, logger="dicom_io.listener"):
        status = _c_store_status(
            listener.port, ds, (SopClass.DERMOSCOPIC_PHOTOGRAPHY, [JPEGBaseline8Bit])
        )
    assert (status, StoreStatus(status).name) == (0xC000, "CANNOT_UNDERSTAND")
    assert "StudyInstanceUID (0020,000D) is missing" in caplog.text
    assert sink.instances == []


def test_dataset_of_another_sop_class_does_not_match(
    listener: StorageListener,
    sink: RecordingSink,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A file whose meta says Dermoscopic Photography (which picks the context and the
    # command's SOP class) but whose data set says VL Photographic.
    ds = pydicom.dcmread(DMS_FILE)
    ds.SOPClassUID = SopClass.VL_PHOTOGRAPHIC.value
    path = tmp_path / "mislabelled.dcm"
    ds.save_as(path)
    meta_class = str(pydicom.dcmread(path).file_meta.MediaStorageSOPClassUID)
    assert meta_class == SopClass.DERMOSCOPIC_PHOTOGRAPHY.value
    # Sent from the file as is: pynetdicom then takes the SOP class from the file meta.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    status = _c_store_status(
        listener.port, path, (SopClass.DERMOSCOPIC_PHOTOGRAPHY, [JPEGBaseline8Bit])
    )
    assert (status, StoreStatus(status).name) == (0xA900, "DATASET_DOES_NOT_MATCH_SOP_CLASS")
    assert sink.instances == []


def test_association_closed_once_on_release_and_on_abort(
    listener: StorageListener, sink: RecordingSink
) -> None:
    context = (SopClass.DERMOSCOPIC_PHOTOGRAPHY.value, [JPEGBaseline8Bit])
    released = _associate(_scu(context), listener.port)
    assert int(released.send_c_store(pydicom.dcmread(DMS_FILE)).Status) == StoreStatus.SUCCESS
    released.release()
    assert _wait_for(lambda: len(sink.closed) == 1)
    assert sink.closed == [sink.instances[0].association_id]

    aborted = _associate(_scu(context), listener.port)
    aborted.abort()
    assert _wait_for(lambda: len(sink.closed) == 2)

    # Connection lost: the peer's socket closes without A-RELEASE or A-ABORT.
    lost = _associate(_scu(context), listener.port)
    assert lost.dul.socket is not None and lost.dul.socket.socket is not None
    lost.dul.socket.socket.close()
    assert _wait_for(lambda: len(sink.closed) == 3)
    lost.kill()

    time.sleep(0.2)  # any duplicate call would land here
    assert len(sink.closed) == len(set(sink.closed)) == 3


@pytest.mark.parametrize("syntax", [DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_native_syntaxes_are_stored_as_received(
    listener: StorageListener, sink: RecordingSink, syntax: str
) -> None:
    ds = pydicom.dcmread(DMS_FILE)
    del ds.PixelData  # drop the encapsulated element, with its undefined length
    ds.PixelData = np.arange(ds.Rows * ds.Columns * 3, dtype=np.uint8).tobytes()
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation = "RGB"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    status = _c_store_status(listener.port, ds, (SopClass.DERMOSCOPIC_PHOTOGRAPHY, [syntax]))
    assert status == StoreStatus.SUCCESS
    (instance,) = sink.instances
    stored = pydicom.dcmread(sink.path_of(ds.SOPInstanceUID))
    assert stored.file_meta.TransferSyntaxUID == syntax
    assert stored.PixelData == ds.PixelData


# Admission: called AE, calling AE, limits, idle timeouts; one log line per refusal.


def _echoscu(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("echoscu"), *args, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "dicom_io.listener" and r.getMessage().startswith("association refused")
    ]


def test_echoscu_with_an_unknown_calling_ae_is_refused_and_logged(
    sink: RecordingSink, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.INFO, logger="dicom_io.listener"),
        StorageListener(
            ae_title=AE_TITLE, port=0, sink=sink, allowed_calling_aes=["ORTHANC"]
        ) as listener,
    ):
        refused = _echoscu(listener.port, "-aet", "WRONG", "-aec", AE_TITLE)
        allowed = _echoscu(listener.port, "-aet", "ORTHANC", "-aec", AE_TITLE)
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr
    assert allowed.returncode == 0, allowed.stderr
    (line,) = _refusals(caplog)
    assert line.startswith("association refused: calling AE 'WRONG' from 127.0.0.1:")
    assert line.endswith(": calling AE not in listener.allowed_calling_aes")


def test_a_called_ae_that_is_not_ours_is_refused_and_logged(
    listener: StorageListener, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="dicom_io.listener"):
        refused = _echoscu(listener.port, "-aet", "MODALITY", "-aec", "SOMEONE_ELSE")
    assert refused.returncode != 0
    assert "Called AE Title Not Recognized" in refused.stderr
    (line,) = _refusals(caplog)
    assert line.startswith("association refused: calling AE 'MODALITY' from 127.0.0.1:")
    assert line.endswith(": called AE 'SOMEONE_ELSE' is not ours")


def test_no_room_on_disk_refuses_associations_as_temporary_congestion(
    sink: RecordingSink, caplog: pytest.LogCaptureFixture
) -> None:
    shortage: list[str] = ["3 MiB free on the storage volume, below storage.min_free_mb (512)"]
    with (
        caplog.at_level(logging.INFO, logger="dicom_io.listener"),
        StorageListener(
            ae_title=AE_TITLE, port=0, sink=sink, capacity=lambda: shortage[0] or None
        ) as listener,
    ):
        refused = _echoscu(listener.port, "-aet", "MODALITY", "-aec", AE_TITLE)
        shortage[0] = ""  # space came back
        accepted = _echoscu(listener.port, "-aet", "MODALITY", "-aec", AE_TITLE)
    assert refused.returncode != 0
    assert "Temporary Congestion" in refused.stderr
    assert accepted.returncode == 0, accepted.stderr
    (line,) = _refusals(caplog)
    assert line.startswith("association refused: calling AE 'MODALITY' from 127.0.0.1:")
    assert line.endswith(": 3 MiB free on the storage volume, below storage.min_free_mb (512)")


def _try_associate(source: str, port: int) -> tuple[Association, list[A_ASSOCIATE_RJ]]:
    """An association from ``source`` (any 127/8 address is loopback on Linux), keeping the RJ
    PDU as received (pynetdicom may report a quick rejection as an abort)."""
    received: list[A_ASSOCIATE_RJ] = []

    def keep(event: Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            received.append(event.pdu)

    assoc = _scu((VERIFICATION, [ExplicitVRLittleEndian])).associate(
        "127.0.0.1",
        port,
        ae_title=AE_TITLE,
        bind_address=(source, 0),
        evt_handlers=[(evt.EVT_PDU_RECV, keep)],
    )
    return assoc, received


def test_one_peer_cannot_take_every_place_and_the_total_is_kept(
    sink: RecordingSink, caplog: pytest.LogCaptureFixture
) -> None:
    limits = AssociationLimits(total=3, per_peer=2, idle_timeout=30)
    held: list[Association] = []
    with (
        caplog.at_level(logging.INFO, logger="dicom_io.listener"),
        StorageListener(ae_title=AE_TITLE, port=0, sink=sink, limits=limits) as listener,
    ):
        for _ in range(2):
            assoc, _rj = _try_associate("127.0.0.1", listener.port)
            assert assoc.is_established
            held.append(assoc)
        over, (rj,) = _try_associate("127.0.0.1", listener.port)
        assert not over.is_established
        # Rejected (transient), by the service provider, local limit exceeded.
        assert (rj.result, rj.source, rj.reason_diagnostic) == (0x02, 0x03, 0x02)
        other, _rj = _try_associate("127.0.0.2", listener.port)  # another host still gets in
        assert other.is_established
        held.append(other)
        third, (rj,) = _try_associate("127.0.0.3", listener.port)  # but not past the total
        assert not third.is_established
        assert (rj.result, rj.source, rj.reason_diagnostic) == (0x02, 0x03, 0x02)
        for assoc in held:
            assoc.release()
        assert _wait_for(lambda: len(sink.closed) == 3)
        again, _rj = _try_associate("127.0.0.1", listener.port)  # places are given back
        assert again.is_established
        again.release()
    lines = _refusals(caplog)
    assert len(lines) == 2
    assert lines[0].startswith("association refused: calling AE 'TESTSCU' from 127.0.0.1:")
    assert lines[0].endswith(
        ": 2 associations open from this address (listener.max_associations_per_peer)"
    )
    assert lines[1].startswith("association refused: calling AE 'TESTSCU' from 127.0.0.3:")
    assert lines[1].endswith(": 3 associations open (listener.max_associations)")


def test_idle_sockets_take_no_place_and_are_dropped(sink: RecordingSink) -> None:
    """Connections that never send an A-ASSOCIATE-RQ (ten of them locked every modality out of
    0.5.0 for 30 s) neither count towards the limits nor stay open past the idle timeout."""
    limits = AssociationLimits(total=2, per_peer=2, idle_timeout=1.0)
    with StorageListener(ae_title=AE_TITLE, port=0, sink=sink, limits=limits) as listener:
        idle = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(12)]
        try:
            time.sleep(0.2)
            assoc, _rj = _try_associate("127.0.0.1", listener.port)
            assert assoc.is_established
            assert int(assoc.send_c_echo().Status) == StoreStatus.SUCCESS
            assoc.release()
            for conn in idle:
                conn.settimeout(10)
                started = time.monotonic()
                assert conn.recv(1) == b""  # closed by the listener
                assert time.monotonic() - started < 5
        finally:
            for conn in idle:
                conn.close()


def test_an_idle_association_is_dropped_and_reported_closed(sink: RecordingSink) -> None:
    limits = AssociationLimits(total=2, per_peer=2, idle_timeout=1.0)
    with StorageListener(ae_title=AE_TITLE, port=0, sink=sink, limits=limits) as listener:
        assoc, _rj = _try_associate("127.0.0.1", listener.port)
        assert assoc.is_established
        assert _wait_for(lambda: len(sink.closed) == 1, timeout=10)
        assert _wait_for(lambda: not assoc.is_established, timeout=5)


# DICOM TLS, with a throwaway CA, server and client certificate made by openssl.


def _openssl(*args: str | Path) -> None:
    subprocess.run(
        [require_tool("openssl"), *map(str, args)], check=True, capture_output=True, timeout=60
    )


def _certificate(folder: Path, name: str, ca: str, *extensions: str) -> None:
    """``name.key`` and ``name.crt`` signed by ``ca`` (``ca.key``, ``ca.crt`` in ``folder``)."""
    key, csr, crt = (folder / f"{name}{suffix}" for suffix in (".key", ".csr", ".crt"))
    _openssl(
        "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
        "-subj", f"/CN=dermfusion-test-{name}",
    )  # fmt: skip
    ext = folder / f"{name}.ext"
    ext.write_text("\n".join(extensions) + "\n")
    _openssl(
        "x509", "-req", "-in", csr, "-CA", folder / f"{ca}.crt", "-CAkey", folder / f"{ca}.key",
        "-CAcreateserial", "-out", crt, "-days", "2", "-extfile", ext,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    for self_signed in ("ca", "rogue-ca"):
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", f"/CN=dermfusion-test-{self_signed}",
            "-keyout", folder / f"{self_signed}.key", "-out", folder / f"{self_signed}.crt",
        )  # fmt: skip
    _certificate(
        folder, "server", "ca", "subjectAltName=IP:127.0.0.1", "extendedKeyUsage=serverAuth"
    )
    _certificate(folder, "client", "ca", "extendedKeyUsage=clientAuth")
    _certificate(folder, "rogue", "rogue-ca", "extendedKeyUsage=clientAuth")
    return folder


def test_tls_listener_takes_storescu_with_a_client_certificate_signed_by_the_ca(
    sink: RecordingSink, pki: Path
) -> None:
    from dicom_io.tls import server_tls_context

    context = server_tls_context(pki / "server.crt", pki / "server.key", pki / "ca.crt")
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    with StorageListener(ae_title=AE_TITLE, port=0, sink=sink, ssl_context=context) as listener:

        def send(*tls: str) -> subprocess.CompletedProcess[str]:
            return _storescu(listener.port, *tls, "-R", "-xy", str(DMS_FILE))

        trusted = ("+tls", str(pki / "client.key"), str(pki / "client.crt"))
        ok = send(*trusted, "+cf", str(pki / "ca.crt"))
        assert ok.returncode == 0, ok.stderr
        assert [i.calling_ae for i in sink.instances] == ["STORESCU"]
        assert send().returncode != 0  # plain TCP
        no_client_certificate = send("+tla", "+cf", str(pki / "ca.crt"))
        assert no_client_certificate.returncode != 0
        assert "certificate verify failed" not in no_client_certificate.stderr  # ours was fine
        rogue = ("+tls", str(pki / "rogue.key"), str(pki / "rogue.crt"), "+cf", str(pki / "ca.crt"))
        assert send(*rogue).returncode != 0  # a certificate from another CA
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # TLS 1.1 is refused by the listener
        old.load_verify_locations(pki / "ca.crt")
        old.load_cert_chain(pki / "client.crt", pki / "client.key")
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
        with (
            pytest.raises(ssl.SSLError),
            socket.create_connection(("127.0.0.1", listener.port), timeout=10) as raw,
            old.wrap_socket(raw, server_hostname="127.0.0.1"),
        ):
            pass
        # The refused handshakes held no place: a good peer still gets in.
        again = send(*trusted, "+cf", str(pki / "ca.crt"))
        assert again.returncode == 0, again.stderr
    assert len(sink.instances) == 2


def test_a_silent_tls_peer_does_not_stop_others_being_accepted(
    sink: RecordingSink, pki: Path
) -> None:
    """pynetdicom wraps accepted sockets in its accept loop: a handshake done there would wait
    for a ClientHello that never comes, and no one else would be accepted."""
    from dicom_io.tls import server_tls_context

    context = server_tls_context(pki / "server.crt", pki / "server.key")
    limits = AssociationLimits(idle_timeout=5)  # the silent socket is dropped after this
    with (
        StorageListener(
            ae_title=AE_TITLE, port=0, sink=sink, ssl_context=context, limits=limits
        ) as listener,
        socket.create_connection(("127.0.0.1", listener.port)),
    ):
        time.sleep(0.2)
        started = time.monotonic()
        ok = _storescu(
            listener.port, "+tla", "+cf", str(pki / "ca.crt"), "-R", "-xy", str(DMS_FILE)
        )
        assert ok.returncode == 0, ok.stderr
        assert time.monotonic() - started < 4  # not held up until the silent one is dropped


# Size limits: checked before anything beyond the UIDs and the image size is decoded.


def test_a_data_set_larger_than_the_limit_is_refused_before_decoding(
    sink: RecordingSink, caplog: pytest.LogCaptureFixture
) -> None:
    limits = AssociationLimits(max_instance_bytes=4096)
    ds = pydicom.dcmread(DMS_FILE)  # about 19 KiB
    with (
        caplog.at_level(logging.WARNING, logger="dicom_io.listener"),
        StorageListener(ae_title=AE_TITLE, port=0, sink=sink, limits=limits) as listener,
    ):
        status = _c_store_status(
            listener.port, ds, (SopClass.DERMOSCOPIC_PHOTOGRAPHY, [JPEGBaseline8Bit])
        )
    assert (status, StoreStatus(status).name) == (0xA700, "OUT_OF_RESOURCES")
    assert sink.instances == []
    assert "MiB allowed (listener.max_instance_mb)" in caplog.text


@pytest.mark.parametrize(("rows", "columns", "frames"), [(65535, 65535, 1), (4000, 3000, 20)])
def test_an_absurd_image_size_is_refused_before_its_pixels_are_touched(
    sink: RecordingSink, caplog: pytest.LogCaptureFixture, rows: int, columns: int, frames: int
) -> None:
    ds = pydicom.dcmread(DMS_FILE)
    ds.Rows, ds.Columns = rows, columns
    ds.NumberOfFrames = frames
    with (
        caplog.at_level(logging.WARNING, logger="dicom_io.listener"),
        StorageListener(ae_title=AE_TITLE, port=0, sink=sink) as listener,
    ):
        status = _c_store_status(
            listener.port, ds, (SopClass.DERMOSCOPIC_PHOTOGRAPHY, [JPEGBaseline8Bit])
        )
    assert (status, StoreStatus(status).name) == (0xC000, "CANNOT_UNDERSTAND")
    assert sink.instances == []
    assert (
        f"Rows x Columns x frames = {rows} x {columns} x {frames} is more than the 100000000 "
        "pixels allowed (listener.max_pixels)"
    ) in caplog.text


def test_an_image_within_the_limits_is_taken(sink: RecordingSink) -> None:
    limits = AssociationLimits(max_instance_bytes=64 * 1024, max_pixels=1024 * 1024)
    with StorageListener(ae_title=AE_TITLE, port=0, sink=sink, limits=limits) as listener:
        status = _c_store_status(
            listener.port,
            pydicom.dcmread(DMS_FILE),
            (SopClass.DERMOSCOPIC_PHOTOGRAPHY, [JPEGBaseline8Bit]),
        )
    assert status == StoreStatus.SUCCESS and len(sink.instances) == 1


@pytest.mark.parametrize(
    ("level", "handlers"), [(logging.WARNING, "none"), (logging.INFO, "standard")]
)
def test_pynetdicom_formats_its_event_log_only_when_its_logger_would_print_it(
    sink: RecordingSink, monkeypatch: pytest.MonkeyPatch, level: int, handlers: str
) -> None:
    from pynetdicom._handlers import standard_dimse_recv_handler

    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "standard")
    logger = logging.getLogger("pynetdicom")
    before = logger.level
    logger.setLevel(level)  # setLevel, not the attribute: it clears the cached answers
    try:
        with StorageListener(ae_title=AE_TITLE, port=0, host="127.0.0.1", sink=sink) as running:
            assert handlers == _config.LOG_HANDLER_LEVEL
            assert running._server is not None
            bound = [h[0] for h in running._server.get_handlers(evt.EVT_DIMSE_RECV)]
            assert (standard_dimse_recv_handler in bound) is (handlers == "standard")
            # its own handlers are bound either way: it still stores
            status = _c_store_status(
                running.port,
                pydicom.dcmread(DMS_FILE),
                (SopClass.DERMOSCOPIC_PHOTOGRAPHY, [JPEGBaseline8Bit]),
            )
    finally:
        logger.setLevel(before)
    assert status == 0 and len(sink.instances) == 1
