"""C-STORE SCU that returns our SR to the PACS: one association per instance.

Exceptions (the outbox decides from the class whether to retry)::

    PacsError
    ├── PacsUnavailableError  no association or it broke (refused, rejected, aborted,
    │                         timed out, connection refused): try again later
    └── PacsRejectedError     the peer answered and said no (a failure status, or it accepted
                              none of our presentation contexts): retrying will not help

Warning statuses (B000, B006, B007) mean the peer stored the instance: they count as success
and are logged. One log line per send, naming the instance and the peer.

With an ``ssl_context`` (``dicom_io.tls.client_tls_context``) the association runs over DICOM TLS;
a failed handshake (certificate not verified, wrong host name) is a PacsUnavailableError that
says so in one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import time
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu import A_ASSOCIATE_RJ

from dicom_io.listener import enable_tcp_nodelay
from dicom_io.status import StoreStatus, StoreWarning

__all__ = ["CStoreSender", "PacsError", "PacsRejectedError", "PacsUnavailableError"]

LOG = logging.getLogger(__name__)

COMPREHENSIVE_3D_SR = UID("1.2.840.10008.5.1.4.1.1.88.34")
VERIFICATION = UID("1.2.840.10008.1.1")
# Uncompressed syntaxes every Storage SCP must accept (Implicit VR LE is the DICOM default).
_PROPOSED_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_WARNINGS = frozenset(int(warning) for warning in StoreWarning)
# How long the TLS diagnosis waits for the PACS's verdict on our client certificate.
_CLIENT_CERTIFICATE_VERDICT_S = 1.0


class PacsError(Exception):
    """Sending to the PACS failed."""


class PacsUnavailableError(PacsError):
    """No usable association (refused, rejected, aborted, timed out): retry later."""


class PacsRejectedError(PacsError):
    """The PACS refused the instance; ``status`` is its DIMSE status, None if none was sent."""

    def __init__(self, message: str, status: int | None) -> None:
        self.status = status
        super().__init__(message)


class CStoreSender:
    """Sends one instance per association to a Storage SCP (the PACS)."""

    def __init__(
        self,
        *,
        calling_ae: str,
        peer_ae: str,
        host: str,
        port: int,
        connection_timeout: float = 10.0,
        acse_timeout: float = 30.0,
        dimse_timeout: float = 60.0,
        network_timeout: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.calling_ae = calling_ae
        self.peer_ae = peer_ae
        self.host = host
        self.port = port
        self.connection_timeout = connection_timeout
        self.acse_timeout = acse_timeout
        self.dimse_timeout = dimse_timeout
        self.network_timeout = network_timeout
        self.ssl_context = ssl_context

    @property
    def peer(self) -> str:
        return f"{self.peer_ae}@{self.host}:{self.port}"

    def send(self, instance: Dataset | str | os.PathLike[str]) -> None:
        """C-STORE ``instance`` (a dataset with file meta, or a DICOM file); raise a PacsError."""
        ds = instance if isinstance(instance, Dataset) else dcmread(Path(instance))
        sop_class = UID(str(ds.get("SOPClassUID", "") or COMPREHENSIVE_3D_SR))
        sop_instance = str(ds.get("SOPInstanceUID", ""))
        meta = getattr(ds, "file_meta", None)
        if meta is None or "TransferSyntaxUID" not in meta or not sop_instance:
            raise ValueError(
                f"{sop_instance or 'instance'}: needs SOPInstanceUID and a file meta "
                "Transfer Syntax UID (0002,0010) to be sent"
            )
        started = time.monotonic()
        try:
            status = self._store(ds, sop_class, meta.TransferSyntaxUID)
        except PacsError as exc:
            LOG.warning("C-STORE of %s to %s failed: %s", sop_instance, self.peer, exc)
            raise
        elapsed = time.monotonic() - started
        if status in _WARNINGS:
            LOG.warning(
                "C-STORE of %s to %s stored with warning 0x%04X %s (%.2f s)",
                sop_instance,
                self.peer,
                status,
                StoreWarning(status).name,
                elapsed,
            )
        else:
            LOG.info("C-STORE of %s to %s: success (%.2f s)", sop_instance, self.peer, elapsed)

    def echo(self) -> float:
        """C-ECHO the peer as ``send`` associates (same AE titles, timeouts, TCP_NODELAY);
        the round trip in seconds, or a PacsError saying why not (for ``dermfusion doctor``)."""
        started = time.monotonic()
        assoc = self._associate(VERIFICATION, [ImplicitVRLittleEndian])
        try:
            response = assoc.send_c_echo()
        finally:
            if assoc.is_established:
                assoc.release()
        if "Status" not in response:
            raise PacsUnavailableError("no C-ECHO response (DIMSE timeout, abort or lost)")
        if int(response.Status) != 0:
            raise PacsRejectedError(
                f"C-ECHO status 0x{int(response.Status):04X}", int(response.Status)
            )
        return time.monotonic() - started

    def _associate(self, sop_class: UID, syntaxes: list[UID]) -> Association:
        """An established association proposing ``sop_class``, or a PacsError saying why not."""
        ae = AE(ae_title=self.calling_ae)
        ae.connection_timeout = self.connection_timeout
        ae.acse_timeout = self.acse_timeout
        ae.dimse_timeout = self.dimse_timeout
        ae.network_timeout = self.network_timeout
        ae.add_requested_context(sop_class, syntaxes)
        rejections: list[A_ASSOCIATE_RJ] = []
        assoc = ae.associate(
            self.host,
            self.port,
            ae_title=self.peer_ae,
            evt_handlers=[
                (evt.EVT_CONN_OPEN, enable_tcp_nodelay),
                (evt.EVT_PDU_RECV, _keep_rejection, [rejections]),
            ],
            tls_args=None if self.ssl_context is None else (self.ssl_context, self.host),
        )
        if not assoc.is_established:
            if assoc.rejected_contexts and not assoc.accepted_contexts:
                # pynetdicom itself aborts an association in which nothing was accepted.
                raise PacsRejectedError(
                    f"peer accepted no presentation context for {sop_class} ({sop_class.name})",
                    None,
                )
            why = _why_not_established(assoc, rejections)
            if self.ssl_context is not None and not rejections and assoc.is_aborted:
                why = self._tls_failure() or why
            raise PacsUnavailableError(why)
        return assoc

    def _tls_failure(self) -> str | None:
        """Why a TLS handshake with the peer fails, or None if it succeeds now.

        pynetdicom only logs the handshake's exception and reports the association as
        aborted, like a refused connection; a second handshake finds the reason the
        administrator needs (an untrusted certificate, the wrong host name).
        """
        assert self.ssl_context is not None
        try:
            with (
                socket.create_connection(
                    (self.host, self.port), timeout=self.connection_timeout
                ) as raw,
                self.ssl_context.wrap_socket(raw, server_hostname=self.host) as tls,
            ):
                # TLS 1.3: the server judges our certificate after our side of the handshake
                # is done, and says so in an alert; a PACS that took it waits for our request.
                tls.settimeout(_CLIENT_CERTIFICATE_VERDICT_S)
                with contextlib.suppress(TimeoutError):
                    tls.recv(1)
                return None
        except ssl.SSLCertVerificationError as error:
            return (
                f"TLS handshake failed: certificate verify failed ({error.verify_message}); "
                "check [pacs] tls_ca_certificates and host"
            )
        except ssl.SSLError as error:
            reason = str(error.reason or error)
            if "CERTIFICATE" in reason.upper():  # e.g. TLSV13_ALERT_CERTIFICATE_REQUIRED
                return (
                    f"TLS handshake failed: the PACS refused our certificate ({reason}); "
                    "check [pacs] tls_certificate and tls_private_key"
                )
            return f"TLS handshake failed: {reason}"
        except OSError:
            return None  # not TLS: refused or timed out, as the association said

    def _store(self, ds: Dataset, sop_class: UID, syntax: UID) -> int:
        """The peer's status for ``ds``; only success and warnings return."""
        assoc = self._associate(sop_class, list(dict.fromkeys((syntax, *_PROPOSED_SYNTAXES))))
        try:
            try:
                response = assoc.send_c_store(ds)
            except RuntimeError as exc:
                if assoc.is_established:
                    raise
                # send_c_store refuses once the peer has aborted the association.
                raise PacsUnavailableError(f"association ended before the C-STORE: {exc}") from exc
            if "Status" not in response:
                raise PacsUnavailableError(
                    "no C-STORE response (DIMSE timeout, abort or connection lost)"
                )
            status = int(response.Status)
            if status != StoreStatus.SUCCESS and status not in _WARNINGS:
                comment = str(response.get("ErrorComment", "") or "")
                raise PacsRejectedError(
                    f"status 0x{status:04X}" + (f" ({comment})" if comment else ""), status
                )
            return status
        finally:
            if assoc.is_established:
                assoc.release()


def _keep_rejection(event: Event, rejections: list[A_ASSOCIATE_RJ]) -> None:
    """EVT_PDU_RECV handler: remember an A-ASSOCIATE-RJ as it arrives.

    pynetdicom 3.0.4 loses a rejection that arrives quickly (storescp --refuse on loopback,
    about 2 times in 3): the reader thread closes the socket after the RJ before the
    requesting thread checks the connection, which then aborts and reports only "aborted".
    """
    if isinstance(event.pdu, A_ASSOCIATE_RJ):
        rejections.append(event.pdu)


def _why_not_established(assoc: Association, rejections: list[A_ASSOCIATE_RJ]) -> str:
    if rejections:
        rj = rejections[-1]
        return f"association rejected: {rj.result_str}, {rj.source_str}, {rj.reason_str}"
    if assoc.is_aborted:
        return "association aborted, or connection refused or timed out"
    return "association not established (no response within the ACSE timeout?)"
