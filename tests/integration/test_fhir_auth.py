"""FHIR authentication against a real sekmet-fhir server that requires it: sekmet's SMART
Backend Services mode answers 401 without a token and is its own OAuth2 token endpoint
(client_credentials with client_secret_basic), so no stand-in is needed."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fhir_io import FhirClient, FhirRejectedError, report_bundle
from fhir_io.auth import ClientCredentials
from plugin.config import FhirSettings, load_settings
from plugin.doctor import check_fhir
from plugin.domain import Finding
from plugin.peers import fhir_client
from tests.integration.fhir_server import _stop, _wait_ready, free_port, write_config
from tests.integration.test_fhir_reports_server import DEMOGRAPHICS, FHIR_VENV, MODEL, _image

pytestmark = pytest.mark.integration

CLIENT_ID = "dermfusion"
SECRET = "integration-secret-7f3a"
TOKEN_LIFETIME_S = 2  # short, so the test sees a token expire and be replaced
PATIENT_SYSTEM = "urn:oid:1.2.3.4.5.1"


@pytest.fixture(scope="module")
def secured_fhir_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """sekmet with ``server_auth.types: [smart]``: every FHIR request but /metadata needs a
    bearer token from its /auth/token endpoint."""
    exe = FHIR_VENV / "bin" / "sekmet"
    if not exe.exists():
        raise RuntimeError(f"{FHIR_VENV} has no sekmet: run `make fhir-server-install`")
    workdir = tmp_path_factory.mktemp("fhir-auth").resolve()
    port = free_port()
    config = write_config(workdir, port)
    with config.open("a", encoding="utf-8") as out:
        out.write(
            "server_auth:\n"
            "  types: [smart]\n"
            f"  token_lifetime: {TOKEN_LIFETIME_S}\n"
            "  smart_clients:\n"
            f"    - client_id: {json.dumps(CLIENT_ID)}\n"
            f"      client_secret: {json.dumps(SECRET)}\n"
            '      scopes: "system/*.*"\n'
        )
    base_url = f"http://127.0.0.1:{port}/fhir"
    log_path = workdir / "sekmet.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [str(exe), "serve", "--config", str(config)],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(process, base_url, log_path)  # /metadata is open
        yield base_url
    finally:
        _stop(process)


def _settings(tmp_path: Path, base_url: str, secret: str) -> FhirSettings:
    (tmp_path / "client-secret").write_text(secret + "\n")
    config = tmp_path / "dermfusion.toml"
    config.write_text(
        f'[fhir]\nbase_url = "{base_url}"\npatient_identifier_system = "{PATIENT_SYSTEM}"\n'
        f'token_url = "{base_url.removesuffix("/fhir")}/auth/token"\n'
        f'client_id = "{CLIENT_ID}"\nclient_secret_file = "client-secret"\n'
        'scope = "system/*.*"\n'
    )
    fhir = load_settings(config, base_dir=tmp_path).fhir
    assert fhir is not None
    return fhir


def _bundle(n: int) -> dict[str, object]:
    return report_bundle(
        finding=Finding(0.61, 0.5, MODEL),
        demographics=DEMOGRAPHICS,
        image=_image(100 + n),
        patient_id=f"MRN-AUTH-{n}",
        patient_identifier_system=PATIENT_SYSTEM,
        issued=dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC),
    )


def test_without_credentials_the_transaction_is_rejected(secured_fhir_server: str) -> None:
    with FhirClient(secured_fhir_server) as client, pytest.raises(FhirRejectedError) as raised:
        client.post_transaction(_bundle(1))
    assert raised.value.status == 401
    assert "not authenticated" in str(raised.value)


def test_client_credentials_are_accepted_and_the_token_is_replaced_after_expiry(
    secured_fhir_server: str, tmp_path: Path
) -> None:
    fhir = _settings(tmp_path, secured_fhir_server, SECRET)
    with fhir_client(fhir) as client:
        auth = client.auth
        assert isinstance(auth, ClientCredentials)
        statuses = [e["response"]["status"] for e in client.post_transaction(_bundle(2))["entry"]]
        assert statuses[1:] == ["201 Created"] * 4  # the Device may exist already
        assert client.search("Patient", {"identifier": f"{PATIENT_SYSTEM}|MRN-AUTH-2"}) == []
        assert auth.tokens_fetched == 1  # one token for both requests
        time.sleep(TOKEN_LIFETIME_S)  # past the refresh point, at the server's expiry
        client.post_transaction(_bundle(3))
        assert auth.tokens_fetched == 2
    assert check_fhir(fhir).ok  # the doctor reads /metadata with the same credentials


def test_a_wrong_client_secret_is_rejected_without_showing_it(
    secured_fhir_server: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wrong-secret-0000"
    fhir = _settings(tmp_path, secured_fhir_server, wrong)
    with fhir_client(fhir) as client, pytest.raises(FhirRejectedError) as raised:
        client.post_transaction(_bundle(4))
    message = str(raised.value)
    assert "refused with 401 invalid_client" in message
    for text in (message, *(r.getMessage() for r in caplog.records)):
        assert wrong not in text and SECRET not in text
    check = check_fhir(fhir)
    assert not check.ok and "invalid_client" in check.detail and wrong not in check.line()
