"""FhirClient against httpx.MockTransport: requests sent, answers parsed, errors classified."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from fhir_io import FhirClient, FhirError, FhirRejectedError, FhirUnavailableError

BASE = "http://ehr.test/fhir"
SYSTEM = "urn:oid:1.2.3.4.5.1"
MRN = "MRN-4711"

Handler = Callable[[httpx.Request], httpx.Response]


def _client(handler: Handler) -> FhirClient:
    return FhirClient(BASE, timeout=5, transport=httpx.MockTransport(handler))


def _bundle(kind: str, *entries: dict[str, Any], link: list[dict[str, str]] | None = None) -> dict:
    out: dict[str, Any] = {"resourceType": "Bundle", "type": kind, "entry": list(entries)}
    if link:
        out["link"] = link
    return out


def _outcome(*diagnostics: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "error", "code": "structure", "diagnostics": d} for d in diagnostics
        ],
    }


def _form(request: httpx.Request) -> list[tuple[str, str]]:
    """The parameters of a ``POST [type]/_search`` (checking that that is what it is)."""
    assert request.method == "POST"
    assert request.url.path.endswith("/_search")
    assert request.url.query == b""
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    return parse_qsl(request.content.decode("ascii"), keep_blank_values=True)


def _match(resource: dict[str, Any], mode: str = "match") -> dict[str, Any]:
    return {"resource": resource, "search": {"mode": mode}}


TRANSACTION = _bundle(
    "transaction",
    {"resource": {"resourceType": "Device"}, "request": {"method": "POST", "url": "Device"}},
)
RESPONSE = _bundle(
    "transaction-response",
    {"response": {"status": "201 Created", "location": f"{BASE}/Device/d1/_history/1"}},
)


def test_post_transaction_sends_fhir_json_to_the_base_url() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=RESPONSE)

    with _client(handler) as client:
        assert client.post_transaction(TRANSACTION) == RESPONSE
    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == BASE
    assert request.headers["content-type"] == "application/fhir+json"
    assert request.headers["accept"] == "application/fhir+json"
    assert json.loads(request.content) == TRANSACTION


def test_post_transaction_refuses_a_non_transaction_bundle() -> None:
    with (
        _client(lambda r: httpx.Response(500)) as client,
        pytest.raises(ValueError, match="transaction"),
    ):
        client.post_transaction({"resourceType": "Bundle", "type": "batch"})


def test_post_transaction_checks_the_response_shape() -> None:
    with (
        _client(lambda r: httpx.Response(200, json=_bundle("transaction-response"))) as client,
        pytest.raises(FhirError, match="0 entries for 1") as info,
    ):
        client.post_transaction(TRANSACTION)
    assert type(info.value) is FhirError
    with (
        _client(lambda r: httpx.Response(200, text="<html>")) as client,
        pytest.raises(FhirError, match="not JSON") as info,
    ):
        client.post_transaction(TRANSACTION)
    assert type(info.value) is FhirError


def test_4xx_is_rejected_with_the_diagnostics_on_one_line() -> None:
    body = _outcome("Transaction rolled back:\n Entry 4: note is not R4", "second\tissue")
    with (
        _client(lambda r: httpx.Response(400, json=body)) as client,
        pytest.raises(FhirRejectedError) as info,
    ):
        client.post_transaction(TRANSACTION)
    error = info.value
    assert error.status == 400
    assert error.diagnostics == (
        "error/structure: Transaction rolled back: Entry 4: note is not R4; "
        "error/structure: second issue"
    )
    assert str(error) == f"transaction: FHIR server rejected it with 400: {error.diagnostics}"
    assert "\n" not in str(error)


@pytest.mark.parametrize("status", [500, 502, 503, 429, 408])
def test_5xx_408_and_429_mean_retry_later(status: int) -> None:
    with (
        _client(lambda r: httpx.Response(status, text="busy")) as client,
        pytest.raises(FhirUnavailableError) as info,
    ):
        client.post_transaction(TRANSACTION)
    assert info.value.status == status
    assert str(info.value) == f"transaction: FHIR server answered {status}: busy"


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("Connection refused"),
        httpx.ReadTimeout("timed out"),
        httpx.ReadError("reset"),
    ],
)
def test_transport_failures_mean_retry_later(exc: httpx.TransportError) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with _client(handler) as client, pytest.raises(FhirUnavailableError) as info:
        client.read("Patient/p1")
    assert info.value.status is None
    assert info.value.__cause__ is exc


def test_find_patient_zero_one_many() -> None:
    patient = {"resourceType": "Patient", "id": "p1"}
    answers = iter(
        [
            _bundle("searchset"),
            _bundle(
                "searchset", _match(patient), _match({"resourceType": "Organization"}, "include")
            ),
            _bundle("searchset", _match(patient), _match({**patient, "id": "p2"})),
        ]
    )
    queries: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/fhir/Patient/_search"
        queries.append(_form(request))
        return httpx.Response(200, json=next(answers))

    with _client(handler) as client:
        assert client.find_patient(SYSTEM, MRN) is None
        assert client.find_patient(SYSTEM, MRN) == patient
        with pytest.raises(FhirRejectedError, match="2 or more Patients match") as info:
            client.find_patient(SYSTEM, MRN)
    assert MRN not in str(info.value)
    assert queries == [[("identifier", f"{SYSTEM}|{MRN}"), ("_count", "2")]] * 3


def test_find_patient_reads_ambiguity_from_total_or_a_next_page() -> None:
    patient = {"resourceType": "Patient", "id": "p1"}
    answers = iter(
        [
            {**_bundle("searchset", _match(patient)), "total": 3},
            _bundle("searchset", _match(patient), link=[{"relation": "next", "url": BASE + "/x"}]),
        ]
    )
    with _client(lambda r: httpx.Response(200, json=next(answers))) as client:
        with pytest.raises(FhirRejectedError, match="^3 Patients match"):
            client.find_patient(SYSTEM, MRN)
        with pytest.raises(FhirRejectedError, match="1 or more Patients match"):
            client.find_patient(SYSTEM, MRN)


def test_find_patient_escapes_search_separators() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert _form(request)[0] == ("identifier", f"{SYSTEM}|A\\|1\\,2\\$3\\\\")
        return httpx.Response(200, json=_bundle("searchset"))

    with _client(handler) as client:
        assert client.find_patient(SYSTEM, "A|1,2$3\\") is None


def test_find_patient_never_logs_or_echoes_the_identifier(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    body = _outcome(f"bad token {SYSTEM}|{MRN}")
    with (
        _client(lambda r: httpx.Response(400, json=body)) as client,
        pytest.raises(FhirRejectedError) as info,
    ):
        client.find_patient(SYSTEM, MRN)
    assert info.value.diagnostics == f"error/structure: bad token {SYSTEM}|***"
    assert "search Patient(identifier) -> 400" in caplog.text
    assert "POST http://ehr.test/fhir/Patient/_search" in caplog.text  # httpx's own INFO line
    assert MRN not in caplog.text


def test_httpx_log_lines_lose_their_query_strings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="httpx")
    with _client(lambda r: httpx.Response(200, json={"resourceType": "Patient", "id": "p1"})) as c:
        c._http.get(f"{BASE}/Patient?identifier={MRN}")  # as a paging link would be fetched
    assert f"GET {BASE}/Patient?redacted " in caplog.text
    assert MRN not in caplog.text


def test_search_repeats_list_params_follows_paging_and_drops_outcomes() -> None:
    report = {"resourceType": "DiagnosticReport", "id": "r1"}
    obs = {"resourceType": "Observation", "id": "o1"}
    pages = {
        "0": _bundle(
            "searchset",
            _match(report),
            {"resource": _outcome("warning"), "search": {"mode": "outcome"}},
            link=[{"relation": "next", "url": f"{BASE}/DiagnosticReport?_offset=1"}],
        ),
        "1": _bundle("searchset", _match(obs, "include")),
    }
    urls: list[httpx.URL] = []
    forms: list[list[tuple[str, str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            forms.append(_form(request))
            return httpx.Response(200, json=pages["0"])
        urls.append(request.url)
        return httpx.Response(200, json=pages[request.url.params["_offset"]])

    with _client(handler) as client:
        found = client.search(
            "DiagnosticReport",
            {
                "identifier": "urn:x|1",
                "_include": ["DiagnosticReport:subject", "DiagnosticReport:result"],
            },
        )
    assert found == [report, obs]
    assert forms == [
        [
            ("identifier", "urn:x|1"),
            ("_include", "DiagnosticReport:subject"),
            ("_include", "DiagnosticReport:result"),
        ]
    ]
    assert [str(u) for u in urls] == [f"{BASE}/DiagnosticReport?_offset=1"]


def test_search_refuses_a_next_link_to_another_server() -> None:
    page = _bundle("searchset", link=[{"relation": "next", "url": "http://elsewhere/fhir/Patient"}])
    with _client(lambda r: httpx.Response(200, json=page)) as client:
        with pytest.raises(FhirError, match="next page"):
            client.search("Patient", [("name", "x")])
        with pytest.raises(ValueError, match="resource_type"):
            client.search("Patient?x=1", {})


def test_read_relative_absolute_and_errors() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.path.endswith("/gone"):
            return httpx.Response(404, json=_outcome("Patient/gone not found"))
        return httpx.Response(200, json={"resourceType": "Patient", "id": "p1"})

    with _client(handler) as client:
        assert client.read("Patient/p1") == {"resourceType": "Patient", "id": "p1"}
        client.read(f"{BASE}/Patient/p1/_history/2")
        with pytest.raises(FhirRejectedError, match="404") as info:
            client.read("Patient/gone")
        with pytest.raises(FhirError, match="read Observation answered a 'Patient'"):
            client.read("Observation/o1")
        for bad in ("../admin", "Patient", "http://elsewhere/fhir/Patient/p1", "Patient/a b"):
            with pytest.raises(ValueError, match="reference"):
                client.read(bad)
    assert info.value.diagnostics == "error/structure: Patient/gone not found"
    assert seen[:2] == [f"{BASE}/Patient/p1", f"{BASE}/Patient/p1/_history/2"]


def test_constructor_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="base_url"):
        FhirClient("ehr.test/fhir")
    with pytest.raises(ValueError, match="timeout"):
        FhirClient(BASE, timeout=0)
    assert FhirClient(BASE + "/").base_url == BASE
