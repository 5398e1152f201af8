"""The C-STORE SCP the PACS routes dermoscopy studies to (pynetdicom ``AE``).

Decisions (why):
- Only Verification and the three image SOP classes we score are offered, each with exactly
  the transfer syntaxes ``dicom_io.images`` can decode: a mis-routed CT or a syntax we could
  not read is refused at negotiation, where the sender sees it, not accepted and lost later.
  Dermoscopic Photography is not among pynetdicom's default storage contexts: added here.
- The handler keeps the bytes as received (preamble, file meta, data set in the negotiated
  syntax: what ``event.encoded_dataset()`` gives) and decodes only the elements it checks: the
  three UIDs and the image size, stopping at Columns. The File Meta Information is encoded
  here, byte for byte as pynetdicom would (pydicom's encoder cost more than the rest of the
  handler), and the elements are read from the data set itself, not from a Part 10 copy of it.
- 0x0000 is returned only after ``sink.accept`` returned, i.e. after the instance is durable.
  Every failure is mapped to a status by ``dicom_io.status.status_for`` and logged on one line
  naming the peer, the association and the SOP instance; never a patient identifier.
- ``association_closed`` is called exactly once per accepted association, on A-RELEASE or on
  an abort (A-ABORT, or A-P-ABORT when the connection is lost). Both events run in the
  association's own thread after its last C-STORE, so it always follows the last ``accept``.
- TCP_NODELAY is set on every accepted socket (pynetdicom leaves Nagle on), so a response
  written after a multi-PDU request is not held back by a delayed ACK.
- Admission is ours, decided when the A-ASSOCIATE-RQ arrives (``EVT_REQUESTED``): the called
  AE must be ours, the calling AE on the list (when there is one), and the association within
  ``max_associations`` in total and ``max_associations_per_peer`` from its address. Only
  admitted associations count, so sockets that never ask (a port scan, a stuck client) use
  up no one's place; they are dropped after ``idle_timeout`` like idle associations.
  pynetdicom's own limit counts every open socket, which let ten idle connections lock every
  modality out: it is set far above ours and only guards against thread exhaustion. Each
  refusal is one log line: calling AE, peer address, reason; never a patient identifier.
- An optional ``AssociationAudit`` (the service's audit trail) hears of each admission, each
  refusal (with the reason logged) and each close (with the instances stored, per study and
  SOP class, and the C-STOREs refused); like ``on_refusal``, an observer that raises is logged
  and changes no answer.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from types import TracebackType
from typing import Protocol, cast

from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from dicom_io.images import DECODABLE_SYNTAXES, SopClass
from dicom_io.status import (
    DECODE_ERRORS,
    ImplausibleImageError,
    InconsistentDatasetError,
    InstanceTooLargeError,
    MissingAttributeError,
    SopClassMismatchError,
    StoreStatus,
    UndecodableDatasetError,
    status_for,
)

__all__ = [
    "AssociationAudit",
    "AssociationLimits",
    "InstanceSink",
    "ReceivedInstance",
    "StorageListener",
    "TRANSFER_SYNTAXES",
    "enable_tcp_nodelay",
]

LOG = logging.getLogger(__name__)

# Deterministic order; the requestor's proposal order decides which one is picked.
TRANSFER_SYNTAXES: tuple[str, ...] = tuple(sorted(DECODABLE_SYNTAXES))
VERIFICATION = UID("1.2.840.10008.1.1")
_UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")
_UID_TAGS = [Tag(keyword) for keyword in _UID_KEYWORDS]
_SIZE_KEYWORDS = ("Rows", "Columns", "NumberOfFrames")
_READ_TAGS = _UID_TAGS + [Tag(keyword) for keyword in _SIZE_KEYWORDS]
_LAST_READ_TAG = max(_READ_TAGS)  # (0028,0011) Columns: nothing after it is parsed
# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
_RJ_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service user, called AE title not recognized
_RJ_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognized
_RJ_LIMIT = (0x02, 0x03, 0x02)  # transient, service provider (presentation), local limit
_RJ_CONGESTION = (0x02, 0x03, 0x01)  # transient, service provider, temporary congestion
_RJ_LABELS = {
    _RJ_CALLED_AE: "called-ae",
    _RJ_CALLING_AE: "calling-ae",
    _RJ_LIMIT: "association-limit",
    _RJ_CONGESTION: "congestion",
}
# pynetdicom's own limit counts open sockets too, admitted or not: only a backstop here.
_SOCKET_BACKSTOP_FACTOR = 8


@dataclass(frozen=True)
class AssociationLimits:
    """How many associations may be open at once, and how soon an idle one is dropped."""

    total: int = 10
    per_peer: int = 4
    idle_timeout: float = 15.0
    # Refused before anything is decoded: more bytes than this (0xA700), or a header claiming
    # more pixels (Rows x Columns x frames) than this (0xC000: not a photograph we can score).
    max_instance_bytes: int = 100 * 1024 * 1024
    max_pixels: int = 100_000_000

    def __post_init__(self) -> None:
        if not 1 <= self.per_peer <= self.total:
            raise ValueError("need 1 <= per_peer <= total")
        if self.idle_timeout <= 0:
            raise ValueError("idle_timeout must be > 0 seconds")
        if self.max_instance_bytes < 1 or self.max_pixels < 1:
            raise ValueError("max_instance_bytes and max_pixels must be >= 1")


@dataclass(frozen=True)
class ReceivedInstance:
    """One instance as received: the Part 10 file bytes and what a sink keys it on."""

    encoded: bytes = field(repr=False)
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    calling_ae: str
    association_id: str


class InstanceSink(Protocol):
    """Where received instances go (the spool and study assembly)."""

    def accept(self, instance: ReceivedInstance) -> None:
        """Make ``instance`` durable before returning; raising reports a failure status."""

    def association_closed(self, association_id: str) -> None:
        """No more instances will arrive on this association (released or aborted)."""


class AssociationAudit(Protocol):
    """Hears of associations for the audit trail (no patient data is passed)."""

    def association_accepted(self, calling_ae: str, called_ae: str, peer: str) -> None:
        """Admitted (``peer``: the requestor's address)."""

    def association_refused(
        self, calling_ae: str, called_ae: str, peer: str, reason: str, label: str
    ) -> None:
        """Rejected; ``reason`` is the logged line's reason, ``label`` its kind (called-ae,
        calling-ae, association-limit, congestion)."""

    def association_ended(
        self,
        calling_ae: str,
        peer: str,
        stored: Mapping[str, Mapping[str, int]],
        refused: int,
    ) -> None:
        """Released or aborted; ``stored``: {Study Instance UID: {SOP Class UID: count}}."""


@dataclass
class _Tally:
    """What one admitted association did, for its audit record."""

    calling_ae: str
    peer: str
    stored: Counter[tuple[str, str]] = field(default_factory=Counter)  # (study, SOP class)
    refused: int = 0

    def by_study(self) -> dict[str, dict[str, int]]:
        studies: dict[str, dict[str, int]] = {}
        for (study, sop_class), count in self.stored.items():
            studies.setdefault(study, {})[sop_class] = count
        return studies


def quiet_pynetdicom() -> None:
    """Unbind pynetdicom's own event logging unless its logger would print it.

    Its standard handlers format every DIMSE message and PDU into text for its logger, which
    the service keeps at WARNING (``dermfusion --verbose`` lets it through): per C-STORE that
    work is thrown away. Applies to associations and servers made after the call.
    """
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        _config.LOG_HANDLER_LEVEL = "none"


def enable_tcp_nodelay(event: Event) -> None:
    """EVT_CONN_OPEN handler: turn Nagle off on the association's socket."""
    sock = event.assoc.dul.socket
    raw = sock.socket if sock is not None else None
    if raw is not None and raw.family in (socket.AF_INET, socket.AF_INET6):
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class StorageListener:
    """A Storage SCP for dermoscopy images that hands each instance to an ``InstanceSink``."""

    def __init__(
        self,
        *,
        ae_title: str,
        port: int,
        sink: InstanceSink,
        host: str = "127.0.0.1",
        allowed_calling_aes: Sequence[str] = (),
        limits: AssociationLimits = AssociationLimits(),
        ssl_context: ssl.SSLContext | None = None,
        capacity: Callable[[], str | None] | None = None,
        on_refusal: Callable[[str, str], None] | None = None,
        audit: AssociationAudit | None = None,
    ) -> None:
        """``capacity``: asked before each association is admitted; a reason (one line)
        refuses it as temporary congestion (e.g. the disk is nearly full). ``on_refusal``
        hears of each refusal as (``"association"``, why) or (``"c-store"``, ``"0xA700"``): the
        service counts them for its metrics. ``audit`` hears of each association."""
        self._address = (host, port)
        self._audit = audit
        self._tallies: dict[Association, _Tally] = {}
        self._on_refusal = on_refusal
        self._capacity = capacity
        self._sink = sink
        self._ae_title = ae_title
        self._allowed = frozenset(allowed_calling_aes)  # empty: any calling AE
        self._limits = limits
        self._ssl_context = ssl_context
        self._ae = AE(ae_title=ae_title)
        self._ae.maximum_associations = limits.total * _SOCKET_BACKSTOP_FACTOR
        self._ae.acse_timeout = limits.idle_timeout  # waiting for the A-ASSOCIATE-RQ, A-RELEASE
        self._ae.dimse_timeout = limits.idle_timeout  # waiting for the rest of a DIMSE message
        self._ae.network_timeout = limits.idle_timeout  # no PDU at all on an open association
        self._ae.add_supported_context(VERIFICATION)
        for sop_class in SopClass:
            self._ae.add_supported_context(sop_class.value, list(TRANSFER_SYNTAXES))
        self._server: ThreadedAssociationServer | None = None
        self._ids: dict[Association, str] = {}
        self._admitted: dict[Association, str] = {}  # association -> peer address
        self._lock = threading.Lock()

    @property
    def supported_contexts(self) -> list[PresentationContext]:
        """What a peer can negotiate (the conformance statement lists these)."""
        return list(self._ae.supported_contexts)

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port 0)."""
        if self._server is None:
            raise RuntimeError("listener is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve in background threads; returns at once."""
        if self._server is not None:
            raise RuntimeError("listener is already started")
        quiet_pynetdicom()
        handlers: list[EventHandlerType] = [
            (evt.EVT_CONN_OPEN, enable_tcp_nodelay),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_C_STORE, self._on_c_store),
        ]
        self._server = self._ae.start_server(
            self._address, block=False, evt_handlers=handlers, ssl_context=self._ssl_context
        )
        LOG.info(
            "listening as %s on %s:%d (%s)",
            self._ae.ae_title,
            self._address[0],
            self.port,
            "DICOM TLS" if self._ssl_context is not None else "plain TCP",
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, then abort open associations and wait for their threads.

        New connections are refused first, so none can slip in between the abort and the
        close. An abort here may overlap a C-STORE in progress: the sender gets no success
        status for it, so it will send that instance again.
        """
        if self._server is None:
            return
        self._server.shutdown()
        self._server = None
        for assoc in self._ae.active_associations:
            assoc.abort()
            assoc.join(timeout)

    def __enter__(self) -> StorageListener:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # Association bookkeeping: an id per association, closed exactly once.

    def _on_requested(self, event: Event) -> None:
        """Admit the association or send A-ASSOCIATE-RJ (pynetdicom then skips negotiation)."""
        assoc = event.assoc
        request = assoc.requestor.primitive
        calling = str(request.calling_ae_title if request is not None else "").strip()
        called = str(request.called_ae_title if request is not None else "").strip()
        peer = str(assoc.requestor.address)
        with self._lock:
            refusal = self._refusal(assoc, calling, called, peer)
            if refusal is None:
                self._admitted[assoc] = peer
                self._ids[assoc] = uuid.uuid4().hex
                self._tallies[assoc] = _Tally(calling, peer)
        if refusal is None:
            self._tell_audit(lambda a: a.association_accepted(calling, called, peer))
            return
        reason, rj = refusal
        LOG.warning(
            "association refused: calling AE %r from %s:%s: %s",
            calling,
            peer,
            assoc.requestor.port,
            reason,
        )
        self._tell_refusal("association", _RJ_LABELS.get(rj, "other"))
        assoc.acse.send_reject(*rj)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()
        label = _RJ_LABELS.get(rj, "other")
        self._tell_audit(lambda a: a.association_refused(calling, called, peer, reason, label))

    def _refusal(
        self, assoc: Association, calling: str, called: str, peer: str
    ) -> tuple[str, tuple[int, int, int]] | None:
        """Why ``assoc`` may not be admitted, with its RJ; None to admit. Holds the lock."""
        if called != self._ae_title:
            return f"called AE {called!r} is not ours", _RJ_CALLED_AE
        if self._allowed and calling not in self._allowed:
            return "calling AE not in listener.allowed_calling_aes", _RJ_CALLING_AE
        if self._capacity is not None and (shortage := self._capacity()) is not None:
            return shortage, _RJ_CONGESTION
        for other in [a for a in self._admitted if not _is_open(a)]:
            del self._admitted[other]
        if len(self._admitted) >= self._limits.total:
            return (
                f"{self._limits.total} associations open (listener.max_associations)",
                _RJ_LIMIT,
            )
        from_peer = sum(address == peer for address in self._admitted.values())
        if from_peer >= self._limits.per_peer:
            return (
                f"{from_peer} associations open from this address "
                "(listener.max_associations_per_peer)",
                _RJ_LIMIT,
            )
        return None

    def _on_rejected(self, event: Event) -> None:
        with self._lock:
            self._ids.pop(event.assoc, None)
            self._admitted.pop(event.assoc, None)
            self._tallies.pop(event.assoc, None)

    def _on_closed(self, event: Event) -> None:
        with self._lock:
            association_id = self._ids.pop(event.assoc, None)
            self._admitted.pop(event.assoc, None)
            tally = self._tallies.pop(event.assoc, None)
        if association_id is not None:
            self._sink.association_closed(association_id)
        if tally is not None:
            stored, refused = tally.by_study(), tally.refused
            self._tell_audit(
                lambda a: a.association_ended(tally.calling_ae, tally.peer, stored, refused)
            )

    # C-STORE

    def _on_c_store(self, event: Event) -> int:
        assoc = event.assoc
        with self._lock:
            association_id = self._ids.get(assoc, "")
        calling_ae = str(assoc.requestor.ae_title)
        sop_instance = str(cast(C_STORE, event.request).AffectedSOPInstanceUID or "")
        try:
            instance = _received_instance(event, calling_ae, association_id, self._limits)
            self._sink.accept(instance)
        except Exception as exc:  # noqa: BLE001 - the one place failures become a status
            status = status_for(exc)
            LOG.warning(
                "C-STORE from %s (association %s) of %s failed: 0x%04X %s: %s: %s",
                calling_ae,
                association_id,
                sop_instance or "(no instance UID)",
                status,
                status.name,
                type(exc).__name__,
                " ".join(str(exc).split()),
                exc_info=LOG.isEnabledFor(logging.DEBUG),
            )
            self._tell_refusal("c-store", f"0x{int(status):04X}")
            self._count(assoc, None)
            return int(status)
        self._count(assoc, instance)
        return int(StoreStatus.SUCCESS)

    def _count(self, assoc: Association, stored: ReceivedInstance | None) -> None:
        """One C-STORE of ``assoc`` for its audit record: stored, or (None) refused."""
        with self._lock:
            tally = self._tallies.get(assoc)
            if tally is None:
                return
            if stored is None:
                tally.refused += 1
            else:
                tally.stored[(stored.study_instance_uid, stored.sop_class_uid)] += 1

    def _tell_audit(self, call: Callable[[AssociationAudit], None]) -> None:
        if self._audit is None:
            return
        try:
            call(self._audit)
        except Exception:  # noqa: BLE001 - auditing must never change a DICOM answer
            LOG.exception("association audit observer failed")

    def _tell_refusal(self, kind: str, label: str) -> None:
        if self._on_refusal is None:
            return
        try:
            self._on_refusal(kind, label)
        except Exception:  # noqa: BLE001 - counting a refusal must never change its answer
            LOG.exception("refusal observer failed")


def _is_open(assoc: Association) -> bool:
    """Still holding a place: a thread that ended without a release or abort event counts no
    more (the admitted set is pruned with this on every request)."""
    return assoc.is_alive() and not (assoc.is_released or assoc.is_aborted or assoc.is_rejected)


def _received_instance(
    event: Event, calling_ae: str, association_id: str, limits: AssociationLimits
) -> ReceivedInstance:
    """The encoded instance plus its three UIDs, checked against the command and context, and
    against the size limits before anything else is decoded."""
    request = cast(C_STORE, event.request)
    stream = event.encoded_dataset(include_meta=False)
    if len(stream) > limits.max_instance_bytes:
        raise InstanceTooLargeError(
            f"data set of {len(stream) // 1024 // 1024} MiB is larger than the "
            f"{limits.max_instance_bytes // 1024 // 1024} MiB allowed (listener.max_instance_mb)"
        )
    syntax = UID(str(event.context.transfer_syntax))
    try:
        uids, rows, columns, frames = _checked_elements(stream, syntax, limits.max_instance_bytes)
    except (*DECODE_ERRORS, TypeError) as exc:
        reason = " ".join(str(exc).split())
        raise UndecodableDatasetError(f"data set does not decode: {reason}") from exc
    if rows * columns * max(frames, 1) > limits.max_pixels:
        raise ImplausibleImageError(
            f"Rows x Columns x frames = {rows} x {columns} x {frames} is more than the "
            f"{limits.max_pixels} pixels allowed (listener.max_pixels)"
        )
    for keyword, tag in zip(_UID_KEYWORDS, _UID_TAGS, strict=True):
        if not uids[keyword]:
            raise MissingAttributeError(keyword, str(tag))
    context_class = str(event.context.abstract_syntax)
    command_class = str(request.AffectedSOPClassUID or "")
    if uids["SOPClassUID"] != context_class or command_class != context_class:
        raise SopClassMismatchError(
            f"data set SOP Class {_named(uids['SOPClassUID'])}, command's "
            f"{_named(command_class)}, presentation context's {_named(context_class)}"
        )
    command_instance = str(request.AffectedSOPInstanceUID or "")
    if uids["SOPInstanceUID"] != command_instance:
        raise InconsistentDatasetError(
            f"data set SOP Instance {uids['SOPInstanceUID']} is not the command's "
            f"Affected SOP Instance {command_instance}"
        )
    try:
        header = part10_header(uids["SOPClassUID"], uids["SOPInstanceUID"], syntax)
    except UnicodeEncodeError as exc:
        raise UndecodableDatasetError("a UID is not ASCII") from exc
    return ReceivedInstance(
        encoded=header + stream,
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        calling_ae=calling_ae,
        association_id=association_id,
    )


def _checked_elements(
    stream: bytes, syntax: UID, limit: int
) -> tuple[dict[str, str], int, int, int]:
    """The three UIDs, Rows, Columns and frames of the data set as received in ``syntax``.

    Elements up to Columns are walked and only these are converted. A well-formed little
    endian data set is scanned here (pydicom's reader cost as much as the rest of the handler);
    anything the scan cannot vouch for is read by pydicom, as before, errors included. A
    deflated one is inflated up to ``limit`` bytes (a small stream must not inflate without
    bound).
    """
    if syntax.is_deflated:
        stream = zlib.decompressobj(-zlib.MAX_WBITS).decompress(stream, limit)
    if syntax.is_little_endian and (found := _scan(stream, syntax.is_implicit_VR)) is not None:
        return found
    ds = read_dataset(
        BytesIO(stream),
        syntax.is_implicit_VR,
        syntax.is_little_endian,
        stop_when=_past_checked_elements,
        specific_tags=list(_READ_TAGS),
    )
    uids = {keyword: str(ds.get(keyword, "") or "").strip() for keyword in _UID_KEYWORDS}
    rows, columns = (int(ds.get(k) or 0) for k in ("Rows", "Columns"))
    return uids, rows, columns, int(ds.get("NumberOfFrames") or 1)


def _past_checked_elements(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag > _LAST_READ_TAG


class _Unusual(Exception):
    """Something the fast scan leaves to pydicom (which may read it, or explain the error)."""


_UNDEFINED_LENGTH = 0xFFFFFFFF
_CHARSET = 0x00080005
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# Explicit VR (PS3.5 7.1.2): these have two reserved bytes and a 4-byte length.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN"}
    | {b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)
_SCANNED: dict[int, tuple[str, bytes]] = {  # tag: (keyword, its VR)
    0x00080005: ("SpecificCharacterSet", b"CS"),  # pydicom interprets it while reading
    0x00080016: ("SOPClassUID", b"UI"),
    0x00080018: ("SOPInstanceUID", b"UI"),
    0x0020000D: ("StudyInstanceUID", b"UI"),
    0x00280008: ("NumberOfFrames", b"IS"),
    0x00280010: ("Rows", b"US"),
    0x00280011: ("Columns", b"US"),
}
_UID_CHARACTERS = "0123456789."
_HEADER = struct.Struct("<HH")
_LENGTH_16 = struct.Struct("<H")
_LENGTH_32 = struct.Struct("<I")


def _scan(data: bytes, implicit: bool) -> tuple[dict[str, str], int, int, int] | None:
    """What ``_checked_elements`` returns, from a walk over the element headers up to
    Columns; None when anything is unusual (pydicom reads it then)."""
    try:
        raw = _scan_elements(data, implicit)
        uids = {}
        for keyword in _UID_KEYWORDS:
            text = raw[keyword].decode("ascii").rstrip("\0 ") if keyword in raw else ""
            if not text or text.strip(_UID_CHARACTERS):
                return None  # missing, or not a plain UID: pydicom reads it (and explains)
            uids[keyword] = text.strip()
        rows, columns = (
            _LENGTH_16.unpack(raw[k])[0] if k in raw else 0 for k in ("Rows", "Columns")
        )
        frames_text = raw.get("NumberOfFrames", b"").decode("ascii").strip("\0 ")
        frames = int(frames_text) if frames_text.isdigit() else None
    except (_Unusual, struct.error, UnicodeDecodeError, RecursionError):
        return None
    if not _plain_charset(raw.get("SpecificCharacterSet", b"")):
        return None  # a character set pydicom may refuse: it decides
    if frames is None and frames_text:
        return None  # not a plain count: pydicom's reading of it decides
    return uids, rows, columns, frames or 1


def _scan_elements(data: bytes, implicit: bool) -> dict[str, bytes]:
    """The raw values of the elements in ``_SCANNED``, walking top-level element headers the
    way pydicom's reader does, and as strictly as it could fail: undefined-length sequences
    are walked item by item, element by element (pydicom parses them), whatever their tag."""
    _check_encoding(data, 0, implicit)
    found: dict[str, bytes] = {}
    offset = 0
    while offset < len(data):
        tag, vr, length, offset = _element(data, offset, implicit)
        if tag > _LAST_READ_TAG:
            break
        if length == _UNDEFINED_LENGTH:
            offset = _past_sequence(data, offset, implicit, tag, vr)
            continue
        end = offset + length
        if end > len(data):
            raise _Unusual  # truncated
        if tag in _SCANNED:
            keyword, expected_vr = _SCANNED[tag]
            if vr not in (None, expected_vr) or (expected_vr == b"US" and length != 2):
                raise _Unusual
            found[keyword] = data[offset:end]
        offset = end
    return found


def _check_encoding(data: bytes, offset: int, implicit: bool) -> None:
    """pydicom switches to the other VR encoding when a data set's first element looks like
    it (a VR where none should be, or none where one should): leave that to it."""
    if len(data) >= offset + 6:
        vr_like = 0x40 < data[offset + 4] < 0x5B and 0x40 < data[offset + 5] < 0x5B
        if vr_like == implicit:
            raise _Unusual


def _element(data: bytes, offset: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, value offset) of the element header at ``offset``."""
    group, number = _HEADER.unpack_from(data, offset)
    if implicit or group == 0xFFFE:  # items and delimiters carry no VR
        return group << 16 | number, None, _LENGTH_32.unpack_from(data, offset + 4)[0], offset + 8
    vr = data[offset + 4 : offset + 6]
    if vr in _SHORT_VRS:
        return group << 16 | number, vr, _LENGTH_16.unpack_from(data, offset + 6)[0], offset + 8
    if vr in _LONG_VRS:
        return group << 16 | number, vr, _LENGTH_32.unpack_from(data, offset + 8)[0], offset + 12
    raise _Unusual


def _past_sequence(data: bytes, offset: int, implicit: bool, tag: int, vr: bytes | None) -> int:
    """The offset after the undefined-length sequence ``tag`` whose items start at ``offset``;
    anything pydicom would not read as a sequence of well-formed items is left to it."""
    if implicit:  # pydicom asks its dictionary, or looks for an item
        try:
            is_sequence = dictionary_VR(tag) == "SQ"
        except KeyError:
            is_sequence = data[offset : offset + 4] == b"\xfe\xff\x00\xe0"
        if not is_sequence:
            raise _Unusual
    elif vr != b"SQ":
        raise _Unusual  # e.g. UN of undefined length: implicit VR inside an explicit data set
    while True:
        if offset + 8 > len(data):
            raise _Unusual
        tag, _, length, offset = _element(data, offset, implicit)
        if tag == _SEQUENCE_END:
            return offset
        if tag != _ITEM:
            raise _Unusual
        end = None if length == _UNDEFINED_LENGTH else offset + length
        offset = _past_item(data, offset, implicit, end)


def _past_item(data: bytes, offset: int, implicit: bool, end: int | None) -> int:
    """The offset after an item's elements (up to ``end``, or to its delimiter when None)."""
    limit = len(data) if end is None else end
    if limit > len(data):
        raise _Unusual
    if not implicit and offset != end:
        _check_encoding(data, offset, implicit)
    while end is None or offset < end:
        if offset + 8 > limit:
            raise _Unusual
        tag, vr, length, offset = _element(data, offset, implicit)
        if tag == _ITEM_END and end is None:
            return offset
        if tag >> 16 == 0xFFFE:
            raise _Unusual  # a delimiter or an item where an element should be
        if length == _UNDEFINED_LENGTH:
            offset = _past_sequence(data, offset, implicit, tag, vr)
            continue
        if offset + length > limit:
            raise _Unusual
        if tag == _CHARSET and not _plain_charset(data[offset : offset + length]):
            raise _Unusual  # pydicom interprets it in items too
        offset += length
    if offset != end:
        raise _Unusual
    return offset


def _plain_charset(value: bytes) -> bool:
    """A Specific Character Set pydicom knows every term of (so it cannot fail on it)."""
    try:
        terms = value.decode("ascii").rstrip("\0 ").split("\\")
    except UnicodeDecodeError:
        return False
    return all(not term.strip() or term.strip() in python_encoding for term in terms)


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information of a received instance: the bytes
    ``event.encoded_dataset()`` puts before the data set (pynetdicom's implementation UID and
    version name), without building and encoding a pydicom data set for them."""
    elements = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
            _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
            _meta_element(0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
            _meta_element(0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
            _meta_element(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        )
    )
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(elements)))
    return b"".join((b"\x00" * 128, b"DICM", group_length, elements))


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One (0002,xxxx) element, explicit VR little endian (OB: reserved bytes, 4-byte length)."""
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    value = str(text).encode("ascii")
    return value + pad if len(value) % 2 else value


def _named(uid: str) -> str:
    name = UID(uid).name if uid else ""
    return f"{uid} ({name})" if name and name != uid else uid or "(none)"
