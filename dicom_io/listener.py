"""The C-STORE SCP the PACS routes dermoscopy studies to (pynetdicom ``AE``).

Decisions (why):
- Only Verification and the three image SOP classes we score are offered, each with exactly
  the transfer syntaxes ``dicom_io.images`` can decode: a mis-routed CT or a syntax we could
  not read is refused at negotiation, where the sender sees it, not accepted and lost later.
  Dermoscopic Photography is not among pynetdicom's default storage contexts: added here.
- The handler keeps the bytes as received (``event.encoded_dataset()``: preamble, file meta,
  data set in the negotiated syntax) and decodes only the three UIDs, stopping before pixels.
- 0x0000 is returned only after ``sink.accept`` returned, i.e. after the instance is durable.
  Every failure is mapped to a status by ``dicom_io.status.status_for`` and logged on one line
  naming the peer, the association and the SOP instance; never a patient identifier.
- ``association_closed`` is called exactly once per accepted association, on A-RELEASE or on
  an abort (A-ABORT, or A-P-ABORT when the connection is lost). Both events run in the
  association's own thread after its last C-STORE, so it always follows the last ``accept``.
- TCP_NODELAY is set on every accepted socket (pynetdicom leaves Nagle on), so a response
  written after a multi-PDU request is not held back by a delayed ACK.
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from types import TracebackType
from typing import Protocol, cast

from pydicom import dcmread
from pydicom.tag import Tag
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.transport import ThreadedAssociationServer

from dicom_io.images import DECODABLE_SYNTAXES, SopClass
from dicom_io.status import (
    DECODE_ERRORS,
    InconsistentDatasetError,
    MissingAttributeError,
    SopClassMismatchError,
    StoreStatus,
    UndecodableDatasetError,
    status_for,
)

__all__ = [
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
        host: str = "0.0.0.0",
        allowed_calling_aes: Sequence[str] = (),
    ) -> None:
        self._address = (host, port)
        self._sink = sink
        self._ae = AE(ae_title=ae_title)
        # Empty list: any calling AE. Otherwise pynetdicom answers A-ASSOCIATE-RJ
        # rejected-permanent, service-user, "calling AE title not recognized".
        self._ae.require_calling_aet = list(allowed_calling_aes)
        self._ae.add_supported_context(VERIFICATION)
        for sop_class in SopClass:
            self._ae.add_supported_context(sop_class.value, list(TRANSFER_SYNTAXES))
        self._server: ThreadedAssociationServer | None = None
        self._ids: dict[Association, str] = {}
        self._lock = threading.Lock()

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
        handlers: list[EventHandlerType] = [
            (evt.EVT_CONN_OPEN, enable_tcp_nodelay),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_C_STORE, self._on_c_store),
        ]
        self._server = self._ae.start_server(self._address, block=False, evt_handlers=handlers)
        LOG.info("listening as %s on %s:%d", self._ae.ae_title, self._address[0], self.port)

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
        with self._lock:
            self._ids[event.assoc] = uuid.uuid4().hex

    def _on_rejected(self, event: Event) -> None:
        with self._lock:
            self._ids.pop(event.assoc, None)

    def _on_closed(self, event: Event) -> None:
        with self._lock:
            association_id = self._ids.pop(event.assoc, None)
        if association_id is not None:
            self._sink.association_closed(association_id)

    # C-STORE

    def _on_c_store(self, event: Event) -> int:
        assoc = event.assoc
        with self._lock:
            association_id = self._ids.get(assoc, "")
        calling_ae = str(assoc.requestor.ae_title)
        sop_instance = str(cast(C_STORE, event.request).AffectedSOPInstanceUID or "")
        try:
            instance = _received_instance(event, calling_ae, association_id)
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
            return int(status)
        return int(StoreStatus.SUCCESS)


def _received_instance(event: Event, calling_ae: str, association_id: str) -> ReceivedInstance:
    """The encoded instance plus its three UIDs, checked against the command and context."""
    request = cast(C_STORE, event.request)
    encoded = event.encoded_dataset()
    try:
        ds = dcmread(BytesIO(encoded), stop_before_pixels=True, specific_tags=_UID_TAGS)
        uids = {keyword: str(ds.get(keyword, "") or "").strip() for keyword in _UID_KEYWORDS}
    except DECODE_ERRORS as exc:
        reason = " ".join(str(exc).split())
        raise UndecodableDatasetError(f"data set does not decode: {reason}") from exc
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
    return ReceivedInstance(
        encoded=encoded,
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        calling_ae=calling_ae,
        association_id=association_id,
    )


def _named(uid: str) -> str:
    name = UID(uid).name if uid else ""
    return f"{uid} ({name})" if name and name != uid else uid or "(none)"
