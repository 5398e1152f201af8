"""The audit trail: PS3.15 A.5 messages, RFC 5424/6587 framing, spooling while the collector is
down, hooks in the listener and the outbox. No patient data in any record."""

from __future__ import annotations

import re
import socket
import stat
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom.uid import JPEGBaseline8Bit
from pynetdicom import AE

from dicom_io.images import SopClass
from dicom_io.listener import StorageListener
from plugin.audit import (
    AuditTrail,
    Peer,
    SyslogForwarder,
    octet_counted,
    syslog_message,
)
from plugin.config import ConfigError, load_settings
from plugin.outbox import PACS, Backoff, Outbox
from plugin.state import OutboxItem, SqliteStateStore
from plugin.workers import Worker
from tests.conftest import SAMPLES
from tests.unit.test_listener import RecordingSink

STUDY = "1.2.826.0.1.3680043.8.498.1"
SR_UID = "1.2.826.0.1.3680043.8.498.2"
DMS = "1.2.840.10008.5.1.4.1.1.77.1.7"
WHEN = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)


def _trail(tmp_path: Path, forwarder: SyslogForwarder | None = None) -> AuditTrail:
    return AuditTrail(
        tmp_path / "audit" / "audit.log",
        source_id="DERMFUSION-TEST",
        ae_title="DERMFUSION",
        forwarder=forwarder,
        destinations={
            "pacs": Peer("ORTHANC", "127.0.0.1"),
            "fhir": Peer("http://ehr.example/fhir", "ehr.example"),
        },
        clock=lambda: WHEN,
    )


def _messages(path: Path) -> list[ET.Element]:
    return [ET.fromstring(line) for line in path.read_text().splitlines()]


def _code(element: ET.Element, tag: str) -> str | None:
    found = element.find(tag)
    return None if found is None else found.get("csd-code")


def _roles(message: ET.Element) -> dict[str, str]:
    """RoleIDCode -> UserID of each ActiveParticipant that has a role."""
    return {
        str(_code(p, "RoleIDCode")): str(p.get("UserID"))
        for p in message.findall("ActiveParticipant")
        if p.find("RoleIDCode") is not None
    }


def _event(message: ET.Element) -> tuple[str | None, str | None, str | None, str | None]:
    ident = message.find("EventIdentification")
    assert ident is not None
    return (
        _code(ident, "EventID"),
        ident.get("EventActionCode"),
        ident.get("EventOutcomeIndicator"),
        _code(ident, "EventTypeCode"),
    )


def test_each_record_is_a_ps3_15_audit_message_naming_the_study_and_no_patient(
    tmp_path: Path,
) -> None:
    trail = _trail(tmp_path)
    trail.service_started()
    trail.association_accepted("MODALITY", "DERMFUSION", "10.0.0.7")  # no record of its own
    trail.association_ended("MODALITY", "10.0.0.7", {STUDY: {DMS: 2}}, 0)
    trail.association_ended("ECHOSCU", "10.0.0.7", {}, 0)  # transferred nothing: no record
    trail.association_refused(
        "EVIL", "OTHER", "10.0.0.9", "called AE 'OTHER' is not ours", "called-ae"
    )
    trail.association_refused("MODALITY", "DERMFUSION", "10.0.0.7", "10 open", "association-limit")
    trail.results_sent(STUDY, "pacs", "delivered", f"sr:{SR_UID}")
    trail.results_sent(STUDY, "fhir", "refused", f"fhir:{SR_UID}")
    trail.results_sent(STUDY, "pacs", "parked", f"sc:{SR_UID}")
    trail.service_stopped()
    trail.close()

    text = (tmp_path / "audit" / "audit.log").read_text()
    assert "Patient" not in text  # no PatientID/PatientName participant, no patient anything
    started, stored, called, limit, sr, fhir, sc, stopped = _messages(
        tmp_path / "audit" / "audit.log"
    )
    for message in (started, stored, called, limit, sr, fhir, sc, stopped):
        assert message.tag == "AuditMessage"
        ident = message.find("EventIdentification")
        assert ident is not None and ident.get("EventDateTime") == "2024-05-06T07:08:09.123+00:00"
        source = message.find("AuditSourceIdentification")
        assert source is not None and source.get("AuditSourceID") == "DERMFUSION-TEST"
        assert message.find("ActiveParticipant") is not None

    assert _event(started) == ("110100", "E", "0", "110120")
    assert _event(stopped) == ("110100", "E", "0", "110121")
    assert _roles(started) == {"110150": "DERMFUSION"}

    assert _event(stored) == ("110104", "C", "0", None)
    assert _roles(stored) == {"110153": "MODALITY", "110152": "DERMFUSION"}
    source_participant = stored.find("ActiveParticipant")
    assert source_participant is not None
    assert source_participant.get("NetworkAccessPointID") == "10.0.0.7"
    assert source_participant.get("NetworkAccessPointTypeCode") == "2"
    (study,) = stored.findall("ParticipantObjectIdentification")
    assert study.get("ParticipantObjectID") == STUDY
    assert _code(study, "ParticipantObjectIDTypeCode") == "110180"
    (sop,) = study.iter("SOPClass")
    assert (sop.get("UID"), sop.get("NumberOfInstances")) == (DMS, "2")

    assert _event(called) == ("110113", "E", "4", "110126")  # Node Authentication
    assert "called AE 'OTHER' is not ours" in str(called.findtext(".//EventOutcomeDescription"))
    assert [p.get("UserID") for p in called.findall("ActiveParticipant")] == ["EVIL", "DERMFUSION"]
    assert _event(limit)[:3] == ("110113", "E", "4")
    assert _event(limit)[3] == "association-refused"  # private 99DERMFUSION code

    assert _event(sr) == ("110104", "C", "0", None)
    assert _roles(sr) == {"110153": "DERMFUSION", "110152": "ORTHANC"}
    (sr_study,) = sr.findall("ParticipantObjectIdentification")
    assert sr_study.get("ParticipantObjectID") == STUDY
    (instance,) = sr_study.iter("Instance")
    assert instance.get("UID") == SR_UID
    assert _event(fhir) == ("110106", "R", "4", None)  # Export, refused (will be retried)
    assert _roles(fhir) == {"110153": "DERMFUSION", "110152": "http://ehr.example/fhir"}
    assert _event(sc) == ("110104", "C", "8", None)  # parked


def test_the_file_is_owner_only_and_one_line_per_message(tmp_path: Path) -> None:
    trail = _trail(tmp_path)
    trail.association_refused("A\nB", "X", "::1", "reason\nwith a newline", "calling-ae")
    trail.close()
    path = tmp_path / "audit" / "audit.log"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    (line,) = path.read_text().splitlines()
    assert ET.fromstring(line).find("ActiveParticipant") is not None


def test_the_syslog_frame_is_rfc_5424_with_octet_counting() -> None:
    xml = '<AuditMessage><EventIdentification EventOutcomeIndicator="0"/></AuditMessage>'
    message = syslog_message(xml, WHEN, hostname="host.example", procid="42")
    frame = octet_counted(message)
    length, _, rest = frame.partition(b" ")
    assert int(length) == len(rest) == len(message)
    header = re.compile(
        rb"^<85>1 2024-05-06T07:08:09\.123Z host\.example dermfusion 42 IHE\+RFC-3881 - "
    )
    assert header.match(rest)
    assert rest.endswith(b"\xef\xbb\xbf" + xml.encode())


class Collector:
    """A syslog collector: a TCP server thread reading octet-counted frames."""

    def __init__(self, port: int = 0) -> None:
        self.server = socket.create_server(("127.0.0.1", port))
        self.server.settimeout(0.2)
        self.port = int(self.server.getsockname()[1])
        self.messages: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            with conn:
                self._read(conn)

    def _read(self, conn: socket.socket) -> None:
        buffer = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buffer += chunk
            while b" " in buffer:
                length, _, rest = buffer.partition(b" ")
                if len(rest) < int(length):
                    break
                self.messages.append(rest[: int(length)])
                buffer = rest[int(length) :]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.server.close()


@pytest.fixture
def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_records_wait_for_a_collector_that_is_down_and_arrive_in_order_exactly_once(
    tmp_path: Path, unused_port: int
) -> None:
    spool = tmp_path / "audit" / "outgoing"
    forwarder = SyslogForwarder("127.0.0.1", unused_port, spool, timeout=1.0)
    trail = _trail(tmp_path, forwarder)
    stop = threading.Event()
    worker = Worker(
        "audit-test", forwarder.send_pending, stop, poll_seconds=0.05, pause=Backoff(0.05, 0.2)
    )
    worker.start()
    collector = None
    try:
        trail.service_started()
        for n in range(3):
            trail.association_ended(f"AE{n}", "127.0.0.1", {STUDY: {DMS: n + 1}}, 0)
        time.sleep(0.5)  # several failed passes: nothing lost, nothing blocked
        assert forwarder.pending() == 4
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in spool.iterdir())
        assert stat.S_IMODE(spool.stat().st_mode) == 0o700

        collector = Collector(unused_port)
        _wait_for(lambda: len(collector.messages) >= 4 and forwarder.pending() == 0)
        trail.service_stopped()  # and what comes after goes straight on
        _wait_for(lambda: len(collector.messages) >= 5)
        time.sleep(0.3)
    finally:
        stop.set()
        worker.join(5)
        trail.close()
        if collector is not None:
            collector.close()
    assert collector is not None
    file_lines = (tmp_path / "audit" / "audit.log").read_text().splitlines()
    received = [m.split(b"\xef\xbb\xbf", 1)[1].decode() for m in collector.messages]
    assert received == file_lines  # in order, each exactly once, the same as the file
    assert [_event(ET.fromstring(x))[0] for x in received] == ["110100"] + ["110104"] * 3 + [
        "110100"
    ]


def test_spool_numbering_continues_after_a_restart(tmp_path: Path, unused_port: int) -> None:
    spool = tmp_path / "outgoing"
    SyslogForwarder("127.0.0.1", unused_port, spool).enqueue(b"first")
    again = SyslogForwarder("127.0.0.1", unused_port, spool)
    again.enqueue(b"second")
    assert [p.read_bytes() for p in sorted(spool.iterdir())] == [b"first", b"second"]
    with pytest.raises(OSError):
        again.send_pending(timeout=0.5)
    assert again.pending() == 2


class RecordingAudit:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.fail = fail

    def association_accepted(self, calling_ae: str, called_ae: str, peer: str) -> None:
        self.calls.append(("accepted", calling_ae, called_ae, peer))
        if self.fail:
            raise RuntimeError("observer bug")

    def association_refused(
        self, calling_ae: str, called_ae: str, peer: str, reason: str, label: str
    ) -> None:
        self.calls.append(("refused", calling_ae, called_ae, peer, reason, label))
        if self.fail:
            raise RuntimeError("observer bug")

    def association_ended(self, calling_ae: str, peer: str, stored: object, refused: int) -> None:
        self.calls.append(("ended", calling_ae, peer, stored, refused))
        if self.fail:
            raise RuntimeError("observer bug")


@pytest.fixture
def audited(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[int, RecordingAudit]]:
    audit = RecordingAudit(fail=getattr(request, "param", False))
    with StorageListener(
        ae_title="DERMFUSION", port=0, sink=RecordingSink(tmp_path), audit=audit
    ) as listener:
        yield listener.port, audit


@pytest.mark.parametrize(
    "audited", [False, True], ids=["observer", "failing-observer"], indirect=True
)
def test_the_listener_tells_the_audit_of_each_association_and_a_failing_one_changes_nothing(
    audited: tuple[int, RecordingAudit],
) -> None:
    port, audit = audited
    scu = AE(ae_title="MODALITY")
    scu.acse_timeout = scu.dimse_timeout = scu.network_timeout = 10
    scu.add_requested_context(SopClass.DERMOSCOPIC_PHOTOGRAPHY.value, [JPEGBaseline8Bit])
    assoc = scu.associate("127.0.0.1", port, ae_title="DERMFUSION")
    assert assoc.is_established
    status = assoc.send_c_store(SAMPLES / "dms_jpeg_baseline.dcm")
    assoc.release()
    assert int(status.Status) == 0x0000
    refused = scu.associate("127.0.0.1", port, ae_title="NOTUS")
    assert refused.is_rejected
    _wait_for(lambda: len(audit.calls) >= 3, timeout=10)
    accepted, ended, rejected = sorted(
        audit.calls, key=lambda c: ["accepted", "ended", "refused"].index(str(c[0]))
    )
    assert accepted == ("accepted", "MODALITY", "DERMFUSION", "127.0.0.1")
    assert ended[:3] == ("ended", "MODALITY", "127.0.0.1") and ended[4] == 0
    (study,) = ended[3].values()  # type: ignore[attr-defined]
    assert study == {SopClass.DERMOSCOPIC_PHOTOGRAPHY.value: 1}
    assert rejected[:4] == ("refused", "MODALITY", "NOTUS", "127.0.0.1")
    assert rejected[5] == "called-ae" and "not ours" in str(rejected[4])


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str | None, str, str, str]] = []

    def results_sent(
        self, study_uid: str | None, destination: str, outcome: str, key: str = ""
    ) -> None:
        self.sent.append((study_uid, destination, outcome, key))


class Refuses:
    def __init__(self) -> None:
        self.refuse = True

    def deliver(self, item: OutboxItem) -> None:
        from dicom_io.sender import PacsRejectedError

        if self.refuse and item.key == "sr:bad":
            raise PacsRejectedError("status 0xC000", 0xC000)


def test_the_outbox_tells_the_audit_of_delivered_refused_and_parked_results(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "s.db")
    items = [
        OutboxItem(key, PACS, Path(f"/outbox/{key}"), 0, study_instance_uid=STUDY)
        for key in ("sr:bad", "sr:good")
    ]
    store.complete([], [], items, now=0.0)
    audit = Recorder()
    outbox = Outbox(store, {PACS: Refuses()}, Backoff(1, 60), max_attempts=2, audit=audit)
    outbox.deliver_due(now=0.0)
    outbox.deliver_due(now=10.0)
    assert audit.sent == [
        (STUDY, PACS, "refused", "sr:bad"),
        (STUDY, PACS, "delivered", "sr:good"),
        (STUDY, PACS, "parked", "sr:bad"),
    ]


def test_audit_settings(tmp_path: Path) -> None:
    defaults = load_settings().audit
    assert (defaults.enabled, str(defaults.file), defaults.source_id) == (
        True,
        "audit/audit.log",
        "DERMFUSION",
    )
    assert defaults.syslog is None
    site = tmp_path / "site.toml"
    site.write_text('[audit]\nsyslog_host = "127.0.0.1"\nsyslog_port = 6514\nsyslog_tls = true\n')
    syslog = load_settings(site).audit.syslog
    assert syslog is not None and (syslog.host, syslog.port, syslog.tls) == (
        "127.0.0.1",
        6514,
        True,
    )
    site.write_text('[audit]\nsyslog_host = "127.0.0.1"\n')
    with pytest.raises(ConfigError, match="syslog_port"):
        load_settings(site)
    site.write_text("[audit]\nsyslog_port = 6514\n")
    with pytest.raises(ConfigError, match="syslog_host"):
        load_settings(site)
