"""DICOM TLS (PS3.15 Annex B, BCP 195 profile), TLS 1.2 or later: the listener's server context
and the client context our C-STORE to the PACS uses.

The handshake is not done in ``wrap_socket``: pynetdicom wraps each accepted socket in its
accept loop, so a peer that connects and never sends a ClientHello would stop every other
connection from being accepted. With ``do_handshake_on_connect=False`` the handshake runs on
the first read, in the association's own thread, under its idle timeout.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

__all__ = ["client_tls_context", "server_tls_context"]


class _DeferredHandshakeContext(ssl.SSLContext):
    """An ``SSLContext`` whose server sockets do their handshake on first use."""

    def wrap_socket(  # type: ignore[override]
        self, sock: socket.socket, server_side: bool = False, **kwargs: object
    ) -> ssl.SSLSocket:
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, server_side=server_side, **kwargs)  # type: ignore[arg-type]


def server_tls_context(
    certificate: Path, private_key: Path, ca_certificates: Path | None = None
) -> ssl.SSLContext:
    """Our certificate and key; with ``ca_certificates``, peers must present a certificate
    signed by one of them (client authentication), else the handshake fails."""
    context = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, private_key)
    if ca_certificates is not None:
        context.load_verify_locations(cafile=ca_certificates)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_tls_context(
    ca_certificates: Path,
    certificate: Path | None = None,
    private_key: Path | None = None,
    *,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """Trusts only ``ca_certificates`` (the CA that signed the PACS's certificate, not the system
    store: a hospital PACS has a private CA); the server certificate is always verified and,
    unless ``check_hostname`` is false, must name the host we connect to. ``certificate`` and
    ``private_key`` are ours, for a PACS that requires client certificates."""
    if (certificate is None) != (private_key is None):
        raise ValueError("a client certificate needs its private key, and the other way round")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname on
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cafile=ca_certificates)
    context.check_hostname = check_hostname
    if certificate is not None and private_key is not None:
        context.load_cert_chain(certificate, private_key)
    return context
