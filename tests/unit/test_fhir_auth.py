"""FHIR authentication: bearer tokens and OAuth2 client credentials against httpx.MockTransport,
and the [fhir] keys that configure them."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import pytest

from fhir_io import FhirClient, FhirRejectedError, FhirUnavailableError
from fhir_io.auth import BearerToken, ClientCredentials
from plugin.config import ConfigError, FhirSettings, SecretSource, load_settings
from plugin.doctor import check_fhir
from plugin.peers import fhir_auth, fhir_client

BASE = "https://ehr.test/fhir"
TOKEN_URL = "https://ehr.test/oauth2/token"
SECRET = "s3cret-never-logged"
PATIENT = {"resourceType": "Patient", "id": "p1"}


class FakeEhr:
    """A token endpoint that hands out numbered tokens and a FHIR server that accepts only
    the tokens in ``valid``."""

    def __init__(self, expires_in: int = 3600) -> None:
        self.expires_in = expires_in
        self.issued: list[str] = []
        self.valid: set[str] = set()
        self.token_forms: list[dict[str, list[str]]] = []
        self.basic: list[str] = []
        self.seen: list[str | None] = []
        self.token_status = 200

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if str(request.url) == TOKEN_URL:
            self.token_forms.append(parse_qs(request.content.decode()))
            self.basic.append(
                base64.b64decode(request.headers["Authorization"].split()[1]).decode()
            )
            if self.token_status != 200:
                return httpx.Response(self.token_status, json={"error": "invalid_client"})
            token = f"token-{len(self.issued) + 1}"
            self.issued.append(token)
            self.valid.add(token)
            return httpx.Response(
                200,
                json={"access_token": token, "token_type": "bearer", "expires_in": self.expires_in},
            )
        header = request.headers.get("Authorization")
        self.seen.append(header)
        if header is None or header.removeprefix("Bearer ") not in self.valid:
            return httpx.Response(401, json=_outcome("Authentication required"))
        return httpx.Response(200, json=PATIENT)


def _outcome(text: str) -> dict[str, object]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "login", "diagnostics": text}],
    }


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _client(ehr: FakeEhr, auth: httpx.Auth) -> FhirClient:
    return FhirClient(BASE, transport=httpx.MockTransport(ehr), auth=auth)


def _credentials(clock: Callable[[], float] | None = None) -> ClientCredentials:
    return ClientCredentials(
        TOKEN_URL, "derm fusion", lambda: SECRET, "system/*.rs", clock=clock or Clock()
    )


def test_client_credentials_fetch_a_token_once_and_reuse_it() -> None:
    ehr = FakeEhr()
    auth = _credentials()
    with _client(ehr, auth) as client:
        assert client.read("Patient/p1") == PATIENT
        assert client.read("Patient/p1") == PATIENT
    assert ehr.issued == ["token-1"]
    assert ehr.seen == ["Bearer token-1", "Bearer token-1"]
    form = ehr.token_forms[0]
    assert form == {"grant_type": ["client_credentials"], "scope": ["system/*.rs"]}
    assert ehr.basic == [f"derm+fusion:{SECRET}"]  # form-urlencoded, then base64 (RFC 6749)


def test_a_token_is_refreshed_shortly_before_it_expires() -> None:
    ehr = FakeEhr(expires_in=300)
    clock = Clock()
    with _client(ehr, _credentials(clock)) as client:
        client.read("Patient/p1")
        clock.now += 300 - 31  # still 31 s left: kept
        client.read("Patient/p1")
        clock.now += 2  # under the 30 s margin: a new one before the request leaves
        client.read("Patient/p1")
    assert ehr.issued == ["token-1", "token-2"]
    assert ehr.seen[-1] == "Bearer token-2"
    assert len(ehr.seen) == 3  # no request was answered 401


def test_a_revoked_token_is_replaced_once_on_401() -> None:
    ehr = FakeEhr()
    with _client(ehr, _credentials()) as client:
        client.read("Patient/p1")
        ehr.valid.clear()  # the EHR restarted and forgot its tokens
        assert client.read("Patient/p1") == PATIENT
    assert ehr.seen == ["Bearer token-1", "Bearer token-1", "Bearer token-2"]


def test_a_second_401_is_a_rejection_not_a_loop(caplog: pytest.LogCaptureFixture) -> None:
    ehr = FakeEhr()

    def tokens_never_valid(request: httpx.Request) -> httpx.Response:
        response = ehr(request)
        ehr.valid.clear()  # a server that takes none of the tokens it issues
        return response

    with (
        caplog.at_level(logging.DEBUG),
        FhirClient(
            BASE, transport=httpx.MockTransport(tokens_never_valid), auth=_credentials()
        ) as client,
        pytest.raises(FhirRejectedError) as raised,
    ):
        client.read("Patient/p1")
    assert raised.value.status == 401
    assert "not authenticated" in str(raised.value)
    assert len(ehr.issued) == 2 and len(ehr.seen) == 2
    _no_secret_in(caplog, str(raised.value))


def test_a_refused_token_request_names_the_endpoint_and_code_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ehr = FakeEhr()
    ehr.token_status = 401
    with (
        caplog.at_level(logging.DEBUG),
        _client(ehr, _credentials()) as client,
        pytest.raises(FhirRejectedError) as raised,
    ):
        client.read("Patient/p1")
    assert str(raised.value).startswith(f"OAuth2 token request to {TOKEN_URL} refused with 401")
    assert "invalid_client" in str(raised.value)
    assert ehr.seen == []  # the FHIR server was never asked
    _no_secret_in(caplog, str(raised.value), repr(_credentials()))


def test_a_token_endpoint_that_is_down_is_retried_later() -> None:
    ehr = FakeEhr()
    ehr.token_status = 503
    with _client(ehr, _credentials()) as client, pytest.raises(FhirUnavailableError):
        client.read("Patient/p1")


def test_a_static_bearer_token_is_sent_and_reread_once_on_401() -> None:
    ehr = FakeEhr()
    ehr.valid = {"rotated"}
    reads = iter(["old", "rotated", "rotated", "rotated"])  # rotated while the request was out
    with _client(ehr, BearerToken(lambda: next(reads))) as client:
        client.read("Patient/p1")
        ehr.valid = set()  # revoked and not rotated: no second try with the same token
        with pytest.raises(FhirRejectedError):
            client.read("Patient/p1")
    assert ehr.seen == ["Bearer old", "Bearer rotated", "Bearer rotated"]
    assert "rotated" not in repr(BearerToken(lambda: "rotated"))


def _no_secret_in(caplog: pytest.LogCaptureFixture, *texts: str) -> None:
    for text in (*texts, *(r.getMessage() for r in caplog.records)):
        assert SECRET not in text
        assert "token-1" not in text and "token-2" not in text


# -------------------------------------------------------------------------------- config


def _fhir(tmp_path: Path, fhir_keys: str) -> FhirSettings:
    config = tmp_path / "dermfusion.toml"
    config.write_text(
        f'[fhir]\nbase_url = "{BASE}"\npatient_identifier_system = "urn:oid:1.2.3"\n{fhir_keys}'
    )
    fhir = load_settings(config, base_dir=tmp_path).fhir
    assert fhir is not None
    return fhir


def test_client_credentials_from_a_secret_file(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET + "\n")
    fhir = _fhir(
        tmp_path,
        f'token_url = "{TOKEN_URL}"\nclient_id = "dermfusion"\nclient_secret_file = "secret"\n'
        'scope = "system/*.*"\n',
    )
    assert fhir.client_credentials is not None
    assert fhir.client_credentials.client_secret == SecretSource(file=tmp_path / "secret")
    assert SECRET not in repr(fhir)
    auth = fhir_auth(fhir)
    assert isinstance(auth, ClientCredentials) and auth.scope == "system/*.*"
    ehr = FakeEhr()
    with FhirClient(BASE, transport=httpx.MockTransport(ehr), auth=auth) as client:
        client.read("Patient/p1")
    assert ehr.basic == [f"dermfusion:{SECRET}"]


def test_a_bearer_token_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EHR_TOKEN", "abc")
    fhir = _fhir(tmp_path, 'bearer_token_env = "EHR_TOKEN"\n')
    auth = fhir_auth(fhir)
    assert isinstance(auth, BearerToken)
    with fhir_client(fhir) as client:
        assert isinstance(client.auth, BearerToken)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            f'bearer_token_env = "EHR_TOKEN"\ntoken_url = "{TOKEN_URL}"\nclient_id = "x"\n',
            "not both",
        ),
        ('client_id = "x"\nclient_secret_env = "EHR_TOKEN"\n', "needs fhir.token_url"),
        (f'token_url = "{TOKEN_URL}"\nclient_secret_env = "EHR_TOKEN"\n', "needs fhir.client_id"),
        (f'token_url = "{TOKEN_URL}"\nclient_id = "x"\n', "client_secret_file or"),
        ('bearer_token_file = "missing"\n', "fhir.bearer_token_file: "),
        ('bearer_token_env = "DERMFUSION_TEST_UNSET"\n', "is unset or empty"),
        ('bearer_token_env = "EHR_EMPTY"\n', "EHR_EMPTY is unset or empty"),
        ('ca_certificates = "missing.pem"\n', "fhir.ca_certificates: "),
        (
            'bearer_token_env = "EHR_TOKEN"\nbearer_token_file = "t"\n',
            "bearer_token_file and fhir.bearer_token_env",
        ),
        ('token_url = "ftp://x"\nclient_id = "x"\nclient_secret_env = "EHR_TOKEN"\n', "token_url"),
    ],
)
def test_bad_fhir_auth_is_refused_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keys: str, message: str
) -> None:
    monkeypatch.setenv("EHR_TOKEN", "abc")
    monkeypatch.setenv("EHR_EMPTY", " ")
    monkeypatch.delenv("DERMFUSION_TEST_UNSET", raising=False)
    (tmp_path / "t").write_text("abc")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _fhir(tmp_path, keys)


def test_doctor_reads_metadata_with_the_configured_credentials(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET)
    fhir = _fhir(
        tmp_path,
        f'token_url = "{TOKEN_URL}"\nclient_id = "dermfusion"\nclient_secret_file = "secret"\n',
    )
    ehr = FakeEhr()
    ehr.token_status = 400
    check = check_fhir(fhir, transport=httpx.MockTransport(ehr))
    assert not check.ok
    assert "OAuth2 token request" in check.detail and SECRET not in check.detail
    ehr.token_status = 200
    check_fhir(fhir, transport=httpx.MockTransport(ehr))
    assert ehr.seen and ehr.seen[-1] == "Bearer token-1"  # /metadata went with the token
