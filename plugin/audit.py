"""The audit trail: IHE ATNA / DICOM PS3.15 Annex A.5 audit messages, to a file and to syslog.

What is recorded (one XML ``AuditMessage`` per event, PS3.15 A.5.1 schema, DCM codes):

- service start and stop: Application Activity (110100, action E), EventTypeCode Application
  Start (110120) / Application Stop (110121), the service in the Application role (110150);
- an association that stored (or was refused) instances, once, when it ends: DICOM Instances
  Transferred (110104, action C: we did not hold them), the calling AE as Source (110153), we
  as Destination (110152), each study as a participant object (110180 "Study Instance UID")
  with the SOP classes and instance counts stored; outcome 0, or 4 when some C-STOREs were
  refused. An association that transferred nothing (a C-ECHO, a monitoring poll) leaves no
  record: there is nothing to audit, and polls would bury the rest;
- a refused association: Security Alert (110113, action E, outcome 4) with the reason the
  listener logs; EventTypeCode Node Authentication (110126) when the called or calling AE title
  was not accepted, else (association limits, no disk space) the private code
  ``association-refused`` in the ``99DERMFUSION`` scheme (PS3.16: designators starting "99"
  are private; no DCM code names a capacity refusal);
- each result sent, refused (will be retried) or parked: an SR or capture to the PACS is DICOM
  Instances Transferred (110104, action C), a FHIR Bundle to the EHR is Export (110106, action
  R: data leaving for another system's format, PS3.15 A.5.3.7); we are Source (110153), the
  destination Destination (110152); outcome 0 delivered, 4 refused, 8 parked.

**No patient data.** ATNA normally names the Patient (ID and name) as a participant object;
this project keeps PHI out of every log, so the Study Instance UID is the only object
identifier in these records: no PatientID, PatientName or birth date, ever. A reviewer who
needs the patient resolves the Study UID in the PACS, under its own access control.

Records are appended to ``[audit] file`` (one message per line, flushed and fsync'd, 0600) and,
with ``[audit] syslog_host``, forwarded by ``SyslogForwarder`` as RFC 5424 messages over TCP with
octet-counting framing (RFC 6587), TLS per RFC 5425 with ``syslog_tls``. Each message is first
spooled to a file under ``<audit dir>/outgoing/`` and deleted once written to the collector, by
a background ``Worker`` that backs off while the collector is down; so the service never blocks
or dies on the collector, and what it missed arrives in order once it is back. Recording never
raises: a failure to write the trail is logged and the service goes on.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from dicom_io.spool import PRIVATE_FILE_MODE, private_directory, write_bytes_durably
from plugin.config import Settings
from plugin.outbox import FHIR, Backoff
from plugin.workers import Worker

__all__ = [
    "AuditTrail",
    "Code",
    "SyslogForwarder",
    "audit_message",
    "audit_trail",
    "octet_counted",
    "syslog_message",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Code:
    """A coded value (csd-code, codeSystemName, originalText)."""

    code: str
    system: str
    meaning: str


# DICOM PS3.16 DCM codes (CID 400-405) and RFC 3881 codes used here.
APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
EXPORT = Code("110106", "DCM", "Export")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
ROLE_APPLICATION = Code("110150", "DCM", "Application")
ROLE_DESTINATION = Code("110152", "DCM", "Destination Role ID")
ROLE_SOURCE = Code("110153", "DCM", "Source Role ID")
STATION_AE_TITLE = Code("110119", "DCM", "Station AE Title")
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
URI = Code("12", "RFC-3881", "URI")
# Private (PS3.16 8.2: coding scheme designators beginning with "99" are private).
ASSOCIATION_REFUSED = Code("association-refused", "99DERMFUSION", "Association refused")

# EventOutcomeIndicator (PS3.15 A.5.1)
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = "0", "4", "8"
# Outcomes of a result sent (Outbox)
DELIVERED, REFUSED, PARKED = "delivered", "refused", "parked"
_RESULT_OUTCOMES = {DELIVERED: SUCCESS, REFUSED: MINOR_FAILURE, PARKED: SERIOUS_FAILURE}
_RESULT_DESCRIPTIONS = {
    REFUSED: "refused by the destination; it will be tried again",
    PARKED: "refused by the destination; parked, no longer tried",
}
# What the outbox key prefix says was sent (dicom_io.sr, dicom_io.capture).
_SOP_CLASS_OF_KEY = {
    "sr": "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "sc": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
}
_AE_REFUSALS = {"called-ae", "calling-ae"}
APPLICATION_SERVER = "4"  # AuditSourceTypeCode: application server process

SYSLOG_PRI = 10 * 8 + 5  # facility 10 (security/authorization), severity 5 (notice)
SYSLOG_MSGID = "IHE+RFC-3881"  # IHE ITI-20 for DICOM/RFC 3881 audit messages
_BOM = b"\xef\xbb\xbf"
_SPOOL_SUFFIX = ".syslog"


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a user (here always an application) in the event."""

    user_id: str
    requestor: bool
    role: Code | None = None
    id_type: Code | None = None
    access_point: str | None = None
    alternative_user_id: str | None = None


@dataclass(frozen=True)
class StudyObject:
    """A study as ParticipantObject: its UID and {SOP Class UID: instances}."""

    study_uid: str
    sop_classes: Mapping[str, int] = field(default_factory=dict)
    instance_uids: Mapping[str, Sequence[str]] = field(default_factory=dict)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _access_point_type(access_point: str) -> str:
    """NetworkAccessPointTypeCode: 2 IP address, 5 URI, 1 machine name."""
    if "://" in access_point:
        return "5"
    try:
        ipaddress.ip_address(access_point)
    except ValueError:
        return "1"
    return "2"


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(
        parent,
        tag,
        {"csd-code": code.code, "codeSystemName": code.system, "originalText": code.meaning},
    )


def audit_message(
    *,
    event: Code,
    action: str,
    outcome: str,
    when: datetime,
    participants: Iterable[Participant],
    source_id: str,
    event_type: Code | None = None,
    description: str | None = None,
    studies: Iterable[StudyObject] = (),
) -> str:
    """One PS3.15 A.5.1 ``AuditMessage`` as a single line of XML (no declaration)."""
    root = ET.Element("AuditMessage")
    identification = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": action,
            "EventDateTime": when.astimezone(UTC).isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": outcome,
        },
    )
    _coded(identification, "EventID", event)
    if event_type is not None:
        _coded(identification, "EventTypeCode", event_type)
    if description:
        ET.SubElement(identification, "EventOutcomeDescription").text = _one_line(description)
    for participant in participants:
        attributes = {
            "UserID": _one_line(participant.user_id),
            "UserIsRequestor": "true" if participant.requestor else "false",
        }
        if participant.alternative_user_id:
            attributes["AlternativeUserID"] = participant.alternative_user_id
        if participant.access_point:
            attributes["NetworkAccessPointID"] = participant.access_point
            attributes["NetworkAccessPointTypeCode"] = _access_point_type(participant.access_point)
        element = ET.SubElement(root, "ActiveParticipant", attributes)
        if participant.role is not None:
            _coded(element, "RoleIDCode", participant.role)
        if participant.id_type is not None:
            _coded(element, "UserIDTypeCode", participant.id_type)
    source = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": source_id})
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": APPLICATION_SERVER})
    for study in studies:
        element = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": study.study_uid,
                "ParticipantObjectTypeCode": "2",  # system object
                "ParticipantObjectTypeCodeRole": "3",  # report
            },
        )
        _coded(element, "ParticipantObjectIDTypeCode", STUDY_INSTANCE_UID)
        if study.sop_classes:
            described = ET.SubElement(element, "ParticipantObjectDescription")
            for sop_class, count in sorted(study.sop_classes.items()):
                sop = ET.SubElement(
                    described, "SOPClass", {"UID": sop_class, "NumberOfInstances": str(count)}
                )
                for uid in study.instance_uids.get(sop_class, ()):
                    ET.SubElement(sop, "Instance", {"UID": uid})
    return ET.tostring(root, encoding="unicode")


def syslog_message(
    xml: str, when: datetime, *, hostname: str, app_name: str = "dermfusion", procid: str = "-"
) -> bytes:
    """An RFC 5424 message carrying one audit message: <85>1 TIMESTAMP HOST APP PROCID
    IHE+RFC-3881 - BOM XML (UTF-8)."""
    timestamp = when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    header = f"<{SYSLOG_PRI}>1 {timestamp} {_token(hostname, 255)} {_token(app_name, 48)} "
    header += f"{_token(procid, 128)} {SYSLOG_MSGID} - "
    return header.encode("ascii") + _BOM + xml.encode("utf-8")


def _token(value: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, or the NILVALUE."""
    text = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return text or "-"


def octet_counted(message: bytes) -> bytes:
    """RFC 6587 3.4.1 octet-counting framing: MSG-LEN SP SYSLOG-MSG."""
    return str(len(message)).encode("ascii") + b" " + message


class SyslogForwarder:
    """Spools syslog messages on disk and sends them, oldest first, to one collector.

    ``enqueue`` only writes a file (durably, 0600); ``send_pending`` (one pass of the worker
    thread) connects, writes each spooled message and deletes it once written. A collector
    that is down makes the pass fail, and the ``Worker`` retries with backoff, so nothing
    waits on it. A message whose write failed half-way is sent again whole: delivery is at
    least once, in order (TCP syslog has no acknowledgement to do better).
    """

    def __init__(
        self,
        host: str,
        port: int,
        spool_dir: Path,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self.spool_dir = private_directory(Path(spool_dir))
        self._ssl_context = ssl_context
        self._timeout = timeout
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._next = max((_sequence(p) for p in self._spooled()), default=0) + 1

    def enqueue(self, message: bytes) -> None:
        with self._lock:
            number, self._next = self._next, self._next + 1
            write_bytes_durably(message, self.spool_dir / f"{number:020d}{_SPOOL_SUFFIX}")

    def pending(self) -> int:
        return len(self._spooled())

    def send_pending(self, now: float = 0.0, *, timeout: float | None = None) -> int:
        """Send what is spooled, oldest first; returns how many were sent. Raises OSError
        (after closing the connection) when the collector cannot be reached or drops it."""
        with self._send_lock:
            spooled = self._spooled()
            if not spooled:
                return 0
            sent = 0
            with self._connect(self._timeout if timeout is None else timeout) as sock:
                for path in spooled:
                    sock.sendall(octet_counted(path.read_bytes()))
                    path.unlink()
                    sent += 1
            return sent

    def worker(self, stop: threading.Event) -> Worker:
        """The background sender: a pass every second, backing off to 30 s while down."""
        return Worker(
            "dermfusion-audit-syslog",
            self.send_pending,
            stop,
            poll_seconds=1.0,
            pause=Backoff(1.0, 30.0),
        )

    def _connect(self, timeout: float) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        if self._ssl_context is None:
            return sock
        try:
            return self._ssl_context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise

    def _spooled(self) -> list[Path]:
        return sorted(p for p in self.spool_dir.iterdir() if p.name.endswith(_SPOOL_SUFFIX))


def _sequence(path: Path) -> int:
    try:
        return int(path.name.removesuffix(_SPOOL_SUFFIX))
    except ValueError:
        return 0


def syslog_tls_context(ca_certificates: Path | None) -> ssl.SSLContext:
    """RFC 5425 client context: TLS 1.2+, the collector's certificate checked against
    ``ca_certificates`` (else the system store) and its host name."""
    context = ssl.create_default_context(cafile=str(ca_certificates) if ca_certificates else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@dataclass(frozen=True)
class Peer:
    """Who a result goes to: a user ID (AE title or URL) and its network address."""

    user_id: str
    access_point: str | None = None
    id_type: Code | None = None


class AuditTrail:
    """Audit records in the domain's words; see the module docstring for what each one is.

    Implements the listener's ``AssociationAudit`` and the outbox's ``ResultAudit``. Every
    method returns normally whatever happens to the file or the spool.
    """

    def __init__(
        self,
        path: Path,
        *,
        source_id: str,
        ae_title: str,
        forwarder: SyslogForwarder | None = None,
        destinations: Mapping[str, Peer] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.path = Path(path)
        self.source_id = source_id
        self.ae_title = ae_title
        self.forwarder = forwarder
        self.destinations = dict(destinations or {})
        self._clock = clock
        self._hostname = socket.gethostname() or "localhost"
        self._pid = str(os.getpid())
        self._lock = threading.Lock()
        private_directory(self.path.parent)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE_MODE)
        os.fchmod(fd, PRIVATE_FILE_MODE)  # exactly 0600, whatever the umask or an older file
        self._file = open(fd, "ab")  # noqa: SIM115 - held open for the service's lifetime

    # Service

    def service_started(self) -> None:
        self._application(APPLICATION_START)

    def service_stopped(self) -> None:
        self._application(APPLICATION_STOP)

    def _application(self, kind: Code) -> None:
        self._record(
            event=APPLICATION_ACTIVITY,
            action="E",
            outcome=SUCCESS,
            event_type=kind,
            participants=[self._us(requestor=True, role=ROLE_APPLICATION)],
        )

    # Associations (dicom_io.listener.AssociationAudit)

    def association_accepted(self, calling_ae: str, called_ae: str, peer: str) -> None:
        """Nothing is written yet: the association's one record is written when it ends,
        with what it stored (``association_ended``)."""

    def association_refused(
        self, calling_ae: str, called_ae: str, peer: str, reason: str, label: str
    ) -> None:
        self._record(
            event=SECURITY_ALERT,
            action="E",
            outcome=MINOR_FAILURE,
            event_type=NODE_AUTHENTICATION if label in _AE_REFUSALS else ASSOCIATION_REFUSED,
            description=f"association refused ({label}): called AE {called_ae!r}: {reason}",
            participants=[
                Participant(
                    calling_ae or "-", True, id_type=STATION_AE_TITLE, access_point=peer or None
                ),
                self._us(requestor=False),
            ],
        )

    def association_ended(
        self,
        calling_ae: str,
        peer: str,
        stored: Mapping[str, Mapping[str, int]],
        refused: int = 0,
    ) -> None:
        """``stored``: {Study Instance UID: {SOP Class UID: instances stored}}; ``refused``:
        C-STOREs answered with a failure status."""
        if not stored and not refused:
            return
        total = sum(sum(counts.values()) for counts in stored.values())
        self._record(
            event=INSTANCES_TRANSFERRED,
            action="C",
            outcome=MINOR_FAILURE if refused else SUCCESS,
            description=f"{total} instance(s) stored, {refused} refused" if refused else None,
            participants=[
                Participant(
                    calling_ae or "-",
                    True,
                    role=ROLE_SOURCE,
                    id_type=STATION_AE_TITLE,
                    access_point=peer or None,
                ),
                self._us(requestor=False, role=ROLE_DESTINATION),
            ],
            studies=[StudyObject(uid, dict(counts)) for uid, counts in sorted(stored.items())],
        )

    # Results (plugin.outbox.ResultAudit)

    def results_sent(
        self, study_uid: str | None, destination: str, outcome: str, key: str = ""
    ) -> None:
        """A result (outbox ``key``: ``sr:``/``sc:``/``fhir:`` + SR or capture UID) delivered,
        refused (to be retried) or parked, to ``destination`` (``pacs`` or ``fhir``)."""
        kind, _, uid = key.partition(":")
        peer = self.destinations.get(destination, Peer(destination))
        sop_class = _SOP_CLASS_OF_KEY.get(kind)
        studies = []
        if study_uid:
            if sop_class is not None and uid:
                studies = [StudyObject(study_uid, {sop_class: 1}, {sop_class: [uid]})]
            else:
                studies = [StudyObject(study_uid)]
        fhir = destination == FHIR or kind == "fhir"
        self._record(
            event=EXPORT if fhir else INSTANCES_TRANSFERRED,
            action="R" if fhir else "C",
            outcome=_RESULT_OUTCOMES.get(outcome, MINOR_FAILURE),
            description=_RESULT_DESCRIPTIONS.get(outcome),
            participants=[
                self._us(requestor=True, role=ROLE_SOURCE),
                Participant(
                    peer.user_id,
                    False,
                    role=ROLE_DESTINATION,
                    id_type=peer.id_type,
                    access_point=peer.access_point,
                ),
            ],
            studies=studies,
        )

    def close(self, flush_timeout: float = 2.0) -> None:
        """Close the file; one last, short try to hand the spool to the collector."""
        if self.forwarder is not None:
            with contextlib.suppress(OSError):  # still spooled: sent after the next start
                self.forwarder.send_pending(timeout=flush_timeout)
        with self._lock:
            self._file.close()

    # Writing

    def _us(self, *, requestor: bool, role: Code | None = None) -> Participant:
        return Participant(
            self.ae_title,
            requestor,
            role=role,
            id_type=STATION_AE_TITLE,
            access_point=self._hostname,
            alternative_user_id=self._pid,
        )

    def _record(self, **message: object) -> None:
        try:
            when = self._clock()
            xml = audit_message(when=when, source_id=self.source_id, **message)  # type: ignore[arg-type]
            with self._lock:
                self._file.write(xml.encode("utf-8") + b"\n")
                self._file.flush()
                os.fsync(self._file.fileno())
                if self.forwarder is not None:
                    self.forwarder.enqueue(
                        syslog_message(xml, when, hostname=self._hostname, procid=self._pid)
                    )
        except Exception:  # noqa: BLE001 - the audit trail must never stop the service
            log.exception("audit: could not record an audit message")


def audit_trail(settings: Settings) -> AuditTrail | None:
    """The service's audit trail from ``[audit]``; None when ``enabled = false``."""
    audit = settings.audit
    if not audit.enabled:
        return None
    path = settings.storage.dir / audit.file
    forwarder = None
    if audit.syslog is not None:
        syslog = audit.syslog
        forwarder = SyslogForwarder(
            syslog.host,
            syslog.port,
            path.parent / "outgoing",
            ssl_context=syslog_tls_context(syslog.ca_certificates) if syslog.tls else None,
        )
    destinations: dict[str, Peer] = {}
    if settings.pacs is not None:
        pacs = settings.pacs
        if pacs.dicomweb_url:
            destinations["pacs"] = _url_peer(pacs.dicomweb_url)
        else:
            destinations["pacs"] = Peer(pacs.ae_title, pacs.host, STATION_AE_TITLE)
    if settings.fhir is not None:
        destinations[FHIR] = _url_peer(settings.fhir.base_url)
    return AuditTrail(
        path,
        source_id=audit.source_id,
        ae_title=settings.listener.ae_title,
        forwarder=forwarder,
        destinations=destinations,
    )


def _url_peer(url: str) -> Peer:
    return Peer(url, urlsplit(url).hostname or None, URI)
