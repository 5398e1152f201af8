"""DICOM TLS for our own associations to the PACS: the [pacs] tls_* keys, the client context, and
C-ECHO over TLS to a pynetdicom SCP (the C-STORE against DCMTK storescp is an integration test).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from dicom_io.sender import VERIFICATION, CStoreSender, PacsUnavailableError
from dicom_io.tls import client_tls_context, server_tls_context
from plugin.config import ConfigError, PacsSettings, load_settings
from plugin.doctor import check_pacs
from plugin.peers import pacs_tls_context
from tests.unit.test_listener import _certificate, _openssl


def make_pki(folder: Path) -> Path:
    """A CA, a PACS certificate for 127.0.0.1/localhost, one for another host, our client
    certificate, and a second CA that signed nothing we use."""
    for self_signed in ("ca", "rogue-ca"):
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", f"/CN=dermfusion-test-{self_signed}",
            "-keyout", folder / f"{self_signed}.key", "-out", folder / f"{self_signed}.crt",
        )  # fmt: skip
    _certificate(
        folder,
        "pacs",
        "ca",
        "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "extendedKeyUsage=serverAuth",
    )
    _certificate(
        folder,
        "elsewhere",
        "ca",
        "subjectAltName=DNS:pacs.example.org",
        "extendedKeyUsage=serverAuth",
    )
    _certificate(folder, "client", "ca", "extendedKeyUsage=clientAuth")
    return folder


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pacs-pki"))


@pytest.fixture
def tls_pacs(pki: Path) -> Iterator[ThreadedAssociationServer]:
    """A Verification SCP on 127.0.0.1 over TLS that requires a client certificate."""
    ae = AE(ae_title="PACS")
    ae.add_supported_context(VERIFICATION)
    context = server_tls_context(pki / "pacs.crt", pki / "pacs.key", pki / "ca.crt")
    server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=context)
    try:
        yield server
    finally:
        server.shutdown()


def _sender(port: int, context: ssl.SSLContext | None, host: str = "127.0.0.1") -> CStoreSender:
    return CStoreSender(
        calling_ae="DERMFUSION",
        peer_ae="PACS",
        host=host,
        port=port,
        connection_timeout=5,
        acse_timeout=5,
        dimse_timeout=5,
        network_timeout=5,
        ssl_context=context,
    )


def test_client_context_is_tls_1_2_or_later_and_checks_the_host(pki: Path) -> None:
    context = client_tls_context(pki / "ca.crt")
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    relaxed = client_tls_context(pki / "ca.crt", check_hostname=False)
    assert relaxed.verify_mode == ssl.CERT_REQUIRED and not relaxed.check_hostname
    with pytest.raises(ValueError, match="private key"):
        client_tls_context(pki / "ca.crt", pki / "client.crt")


def test_echo_over_tls_with_our_client_certificate(
    pki: Path, tls_pacs: ThreadedAssociationServer
) -> None:
    port = tls_pacs.server_address[1]
    context = client_tls_context(pki / "ca.crt", pki / "client.crt", pki / "client.key")
    assert _sender(port, context).echo() > 0
    assert _sender(port, context, host="localhost").echo() > 0  # DNS name in the certificate


def test_an_untrusted_pacs_certificate_is_named_in_one_line(
    pki: Path, tls_pacs: ThreadedAssociationServer
) -> None:
    port = tls_pacs.server_address[1]
    wrong_ca = client_tls_context(pki / "rogue-ca.crt", pki / "client.crt", pki / "client.key")
    with pytest.raises(PacsUnavailableError) as raised:
        _sender(port, wrong_ca).echo()
    message = str(raised.value)
    assert "TLS handshake failed: certificate verify failed" in message
    assert "tls_ca_certificates" in message and "\n" not in message


def test_a_certificate_for_another_host_is_refused_unless_hostname_checks_are_off(
    pki: Path,
) -> None:
    ae = AE(ae_title="PACS")
    ae.add_supported_context(VERIFICATION)
    context = server_tls_context(pki / "elsewhere.crt", pki / "elsewhere.key")
    server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=context)
    try:
        port = server.server_address[1]
        with pytest.raises(PacsUnavailableError, match="mismatch, certificate is not valid for"):
            _sender(port, client_tls_context(pki / "ca.crt")).echo()
        relaxed = client_tls_context(pki / "ca.crt", check_hostname=False)
        assert _sender(port, relaxed).echo() > 0
    finally:
        server.shutdown()


def test_plain_tcp_to_a_tls_pacs_fails_without_a_tls_reason(
    tls_pacs: ThreadedAssociationServer,
) -> None:
    with pytest.raises(PacsUnavailableError) as raised:
        _sender(tls_pacs.server_address[1], None).echo()
    assert "TLS" not in str(raised.value)


def test_doctor_echoes_over_tls(pki: Path, tls_pacs: ThreadedAssociationServer) -> None:
    port = tls_pacs.server_address[1]
    pacs = PacsSettings(
        ae_title="PACS",
        host="127.0.0.1",
        port=port,
        tls_ca_certificates=pki / "ca.crt",
        tls_certificate=pki / "client.crt",
        tls_private_key=pki / "client.key",
    )
    assert check_pacs(pacs, "DERMFUSION").ok
    untrusted = PacsSettings(
        ae_title="PACS", host="127.0.0.1", port=port, tls_ca_certificates=pki / "rogue-ca.crt"
    )
    check = check_pacs(untrusted, "DERMFUSION")
    assert not check.ok and "certificate verify failed" in check.detail
    unreadable = PacsSettings(
        ae_title="PACS", host="127.0.0.1", port=port, tls_ca_certificates=pki / "missing.crt"
    )
    assert "pacs TLS files cannot be used" in check_pacs(unreadable, "DERMFUSION").detail


# -------------------------------------------------------------------------------- config

_DIMSE = '[pacs]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 4242\n'


def _pacs(tmp_path: Path, text: str) -> PacsSettings:
    config = tmp_path / "dermfusion.toml"
    config.write_text(text)
    pacs = load_settings(config, base_dir=tmp_path).pacs
    assert pacs is not None
    return pacs


def test_tls_keys_resolve_against_the_base_and_build_a_context(tmp_path: Path, pki: Path) -> None:
    for name in ("ca.crt", "client.crt", "client.key"):
        (tmp_path / name).write_bytes((pki / name).read_bytes())
    pacs = _pacs(
        tmp_path,
        _DIMSE + 'tls_ca_certificates = "ca.crt"\ntls_certificate = "client.crt"\n'
        'tls_private_key = "client.key"\ntls_check_hostname = false\n',
    )
    assert pacs.tls_ca_certificates == tmp_path / "ca.crt"
    assert pacs.tls_private_key == tmp_path / "client.key"
    assert pacs.tls_check_hostname is False
    context = pacs_tls_context(pacs)
    assert context is not None and not context.check_hostname
    plain = _pacs(tmp_path, _DIMSE)
    assert plain.tls_ca_certificates is None and pacs_tls_context(plain) is None


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ('tls_ca_certificates = "ca"\ntls_certificate = "c"\n', "go together"),
        ('tls_certificate = "c"\ntls_private_key = "k"\n', "need pacs.tls_ca_certificates"),
        ("tls_check_hostname = false\n", "need pacs.tls_ca_certificates"),
        ("tls_check_hostname = 1\n", "wrong type"),
    ],
)
def test_bad_pacs_tls_keys_are_refused(tmp_path: Path, keys: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _pacs(tmp_path, _DIMSE + keys)


def test_tls_keys_are_refused_with_stow_rs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pacs.tls_ca_certificates is DICOM TLS"):
        _pacs(
            tmp_path,
            '[pacs]\nprotocol = "stow-rs"\ndicomweb_url = "https://pacs.test/dicom-web"\n'
            'tls_ca_certificates = "ca.crt"\n',
        )


def test_an_unreadable_ca_is_a_config_error(tmp_path: Path) -> None:
    pacs = _pacs(tmp_path, _DIMSE + 'tls_ca_certificates = "missing.crt"\n')
    with pytest.raises(ConfigError, match="pacs TLS files cannot be used"):
        pacs_tls_context(pacs)
