"""Our C-STORE over DICOM TLS to a PACS we did not write: DCMTK storescp with +tls (BCP 195
non-downgrading profile, TLS 1.2+), which requires a client certificate signed by our CA."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset

from dicom_io.sender import CStoreSender, PacsUnavailableError
from dicom_io.tls import client_tls_context
from tests.unit.test_pacs_tls import make_pki
from tests.unit.test_sender import PACS_AE, _free_port, _storescp
from tests.unit.test_sender import sr as sr  # the SR fixture: a real TID 1500 report


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pacs-pki"))


@pytest.fixture
def tls_storescp(pki: Path, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port = _free_port()
    out = tmp_path / "received"
    out.mkdir()
    process = _storescp(
        port,
        out,
        "+tls", str(pki / "pacs.key"), str(pki / "pacs.crt"),
        "+cf", str(pki / "ca.crt"),
        "--require-peer-cert",
    )  # fmt: skip
    try:
        yield port, out
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def _sender(port: int, **tls: Path) -> CStoreSender:
    return CStoreSender(
        calling_ae="DERMFUSION",
        peer_ae=PACS_AE,
        host="127.0.0.1",
        port=port,
        connection_timeout=5,
        acse_timeout=10,
        dimse_timeout=10,
        network_timeout=10,
        ssl_context=client_tls_context(**tls),  # type: ignore[arg-type]
    )


def test_the_sr_reaches_storescp_over_tls_with_our_client_certificate(
    pki: Path, tls_storescp: tuple[int, Path], sr: Dataset
) -> None:
    port, out = tls_storescp
    sender = _sender(
        port,
        ca_certificates=pki / "ca.crt",
        certificate=pki / "client.crt",
        private_key=pki / "client.key",
    )
    sender.send(sr)
    stored = list(out.iterdir())
    assert len(stored) == 1 and sr.SOPInstanceUID in stored[0].name
    assert sender.echo() > 0  # what `dermfusion doctor` does, over the same TLS


def test_a_pacs_certificate_from_another_ca_is_refused_before_anything_is_sent(
    pki: Path, tls_storescp: tuple[int, Path], sr: Dataset
) -> None:
    port, out = tls_storescp
    sender = _sender(
        port,
        ca_certificates=pki / "rogue-ca.crt",
        certificate=pki / "client.crt",
        private_key=pki / "client.key",
    )
    with pytest.raises(PacsUnavailableError, match="certificate verify failed"):
        sender.send(sr)
    assert list(out.iterdir()) == []


def test_without_a_client_certificate_storescp_refuses_us(
    pki: Path, tls_storescp: tuple[int, Path], sr: Dataset
) -> None:
    port, out = tls_storescp
    with pytest.raises(PacsUnavailableError, match="the PACS refused our certificate"):
        _sender(port, ca_certificates=pki / "ca.crt").send(sr)
    assert list(out.iterdir()) == []
