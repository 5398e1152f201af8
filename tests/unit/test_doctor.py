"""`dermfusion doctor`: each check green and red, with small peers (a pynetdicom SCP, an httpx
MockTransport CapabilityStatement, sockets) instead of real servers."""

from __future__ import annotations

import copy
import io
import math
import os
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from pynetdicom import AE

from dicom_io.sender import VERIFICATION
from plugin.config import FhirSettings, PacsSettings, StorageSettings, load_settings
from plugin.doctor import (
    FHIR_CREATED_TYPES,
    Check,
    Doctor,
    capability_gaps,
    check_config,
    check_fhir,
    check_free_space,
    check_listener_port,
    check_model,
    check_pacs,
    check_storage,
    examine,
)
from plugin.domain import Finding, ModelIdentity
from tests.conftest import REPO_ROOT

BASE_URL = "http://fhir.test/fhir"
FHIR = FhirSettings(base_url=BASE_URL, patient_identifier_system="urn:dermfusion:patient-id")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------------ format


def test_line_green_has_no_fix_and_red_names_it() -> None:
    assert Check("pacs", True, "fine", "never shown").line() == "OK   pacs: fine"
    assert Check("pacs", False, "refused", "start it").line() == "FAIL pacs: refused — start it"


def test_line_colour_only_when_asked() -> None:
    assert "\033[" not in Check("x", False, "d", "f").line()
    assert Check("x", False, "d", "f").line(colour=True).startswith("\033[31mFAIL\033[0m x:")
    assert Check("x", True, "d").line(colour=True).startswith("\033[32mOK  \033[0m x:")


# ------------------------------------------------------------------------------------ config


def test_config_green_names_the_files(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text("[listener]\nport = 11113\n")
    check, settings = check_config(site)
    assert check.ok and check.detail == f"configs/dermfusion.toml + {site}"
    assert settings is not None and settings.listener.port == 11113


def test_config_error_is_one_red_line_and_exit_1(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text("[listener]\nport = 70000\n")
    out = io.StringIO()
    assert examine(site, out) == 1
    (line,) = out.getvalue().splitlines()
    assert line.startswith(f"FAIL config: {site}: listener.port must be a TCP port")
    assert "\033[" not in line  # not a TTY: no colour


def test_missing_config_file_is_red(tmp_path: Path) -> None:
    check, settings = check_config(tmp_path / "absent.toml")
    assert not check.ok and settings is None
    assert "No such file or directory" in check.detail


def test_exit_1_when_any_check_is_red(monkeypatch: pytest.MonkeyPatch) -> None:
    def checks(self: Doctor) -> Iterator[Check]:
        yield Check("storage", True, "fine")
        yield Check("pacs", False, "refused", "start it")

    monkeypatch.setattr(Doctor, "checks", checks)
    out = io.StringIO()
    assert examine(None, out) == 1
    assert out.getvalue().splitlines()[1:] == [
        "OK   storage: fine",
        "FAIL pacs: refused — start it",
    ]


def test_exit_0_when_all_checks_are_green(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Doctor, "checks", lambda self: iter([Check("storage", True, "fine")]))
    assert examine(None, io.StringIO()) == 0


# ------------------------------------------------------------------------------------ storage


def test_storage_green_when_writable(tmp_path: Path) -> None:
    check = check_storage(StorageSettings(dir=tmp_path))
    assert check.ok and "exists" in check.detail
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


def test_storage_green_when_creatable_and_leaves_nothing(tmp_path: Path) -> None:
    check = check_storage(StorageSettings(dir=tmp_path / "a" / "b"))
    assert check.ok and "can be created" in check.detail
    assert list(tmp_path.iterdir()) == []  # serve creates it, as its own user, owner-only


def test_storage_red_under_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    check = check_storage(StorageSettings(dir=tmp_path / "file" / "var"))
    assert not check.ok
    assert check.detail.startswith(f"{tmp_path / 'file' / 'var'} cannot be created: Not a dir")
    assert "[storage] dir" in check.fix


def test_storage_red_when_not_writable(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes anywhere: a path under a regular file cannot be written
        (tmp_path / "file").write_text("")
        folder = tmp_path / "file" / "var"
    else:
        folder = tmp_path / "readonly"
        folder.mkdir(mode=0o500)
    try:
        check = check_storage(StorageSettings(dir=folder))
    finally:
        if folder.is_dir():
            folder.chmod(0o700)
    assert not check.ok and str(folder) in check.detail
    assert ("Permission denied" in check.detail) or ("Not a directory" in check.detail)


def test_free_space_green_and_red(tmp_path: Path) -> None:
    green = check_free_space(StorageSettings(dir=tmp_path, min_free_mb=1))
    assert green.ok and "MiB free" in green.detail
    red = check_free_space(StorageSettings(dir=tmp_path, min_free_mb=1 << 40))
    assert not red.ok
    assert "below storage.min_free_mb" in red.detail  # FreeSpaceWatermark's own words
    assert "storage.min_free_mb" in red.fix


# ------------------------------------------------------------------------------------ model


def test_model_green_with_the_shipped_bundle() -> None:
    check = check_model(REPO_ROOT / "monai_bundle")
    assert check.ok, check.line()
    assert "weights " in check.detail and "test inference" in check.detail
    digest = check.detail.split("weights ", 1)[1][:12]
    assert len(digest) == 12 and int(digest, 16) >= 0


def test_model_red_without_weights(tmp_path: Path) -> None:
    check = check_model(tmp_path)
    assert not check.ok and "does not load" in check.detail and "no weights" in check.detail
    assert "[model] bundle_dir" in check.fix


class _NanModel:
    identity = ModelIdentity("fake", "0.0.1", "ab" * 32)

    def score(self, images: list[Any], demographics: list[Any]) -> list[Finding]:
        return [Finding(math.nan, 0.5, self.identity) for _ in images]


def test_model_red_when_inference_is_not_a_probability(tmp_path: Path) -> None:
    check = check_model(tmp_path, load=lambda _: _NanModel())  # type: ignore[arg-type,return-value]
    assert not check.ok
    assert check.detail.startswith("fake 0.0.1, weights abababababab")
    assert "not a probability" in check.detail


# ------------------------------------------------------------------------------------ PACS


@pytest.fixture
def verification_scp() -> Iterator[tuple[AE, int]]:
    ae = AE(ae_title="PACS")
    ae.add_supported_context(VERIFICATION)
    ae.require_called_aet = True
    server = ae.start_server(("127.0.0.1", 0), block=False)
    yield ae, int(server.server_address[1])
    ae.shutdown()


def test_pacs_not_configured_is_green() -> None:
    check = check_pacs(None, "DERMFUSION")
    assert check.ok and check.detail == "not configured (results stay in outbox)"


def test_pacs_echo_green(verification_scp: tuple[AE, int]) -> None:
    _, port = verification_scp
    check = check_pacs(PacsSettings("PACS", "127.0.0.1", port), "DERMFUSION")
    assert check.ok, check.line()
    assert check.detail.startswith(f"C-ECHO to PACS@127.0.0.1:{port} answered success")


def test_pacs_red_refused() -> None:
    port = _free_port()
    check = check_pacs(PacsSettings("ORTHANC", "127.0.0.1", port), "DERMFUSION")
    assert check.line() == (
        f"FAIL pacs: C-ECHO to ORTHANC@127.0.0.1:{port} refused — is the PACS running? "
        "check [pacs] host/port"
    )


def test_pacs_red_rejected_for_a_wrong_ae_title(verification_scp: tuple[AE, int]) -> None:
    _, port = verification_scp
    check = check_pacs(PacsSettings("NOT-PACS", "127.0.0.1", port), "DERMFUSION")
    assert not check.ok
    assert check.detail.startswith(f"C-ECHO to NOT-PACS@127.0.0.1:{port} rejected")
    assert "Called AE title not recognised" in check.detail
    assert "[pacs] ae_title" in check.fix


def test_pacs_red_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    def timeout(*args: object, **kwargs: object) -> socket.socket:
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", timeout)
    check = check_pacs(PacsSettings("ORTHANC", "pacs.invalid", 4242), "DERMFUSION")
    assert not check.ok
    assert check.detail == "C-ECHO to ORTHANC@pacs.invalid:4242 timed out after 5 s"


def _stow_rs(url: str) -> PacsSettings:
    return PacsSettings(protocol="stow-rs", dicomweb_url=url)


def test_pacs_stow_rs_green_when_the_server_accepts_connections() -> None:
    with socket.socket() as web:
        web.bind(("127.0.0.1", 0))
        web.listen()
        url = f"http://127.0.0.1:{web.getsockname()[1]}/dicom-web"
        check = check_pacs(_stow_rs(url), "DERMFUSION")
    assert check.ok and check.detail.startswith(f"STOW-RS to {url}: the server accepts")


def test_pacs_stow_rs_red_refused() -> None:
    url = f"http://127.0.0.1:{_free_port()}/dicom-web"
    check = check_pacs(_stow_rs(url), "DERMFUSION")
    assert check.line() == (
        f"FAIL pacs: STOW-RS to {url} refused — is the PACS running? check [pacs] dicomweb_url"
    )


# ------------------------------------------------------------------------------------ FHIR


def _resource(kind: str, **extra: object) -> dict[str, Any]:
    codes = ["read", "create", "search-type"]
    return {"type": kind, "interaction": [{"code": c} for c in codes], **extra}


CAPABILITIES: dict[str, Any] = {
    "resourceType": "CapabilityStatement",
    "fhirVersion": "4.0.1",
    "software": {"name": "Test EHR", "version": "1.0"},
    "rest": [
        {
            "mode": "server",
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
            "resource": [
                *(_resource(t, conditionalCreate=True) for t in FHIR_CREATED_TYPES),
                _resource("Patient", searchParam=[{"name": "identifier", "type": "token"}]),
            ],
        }
    ],
}


def _answering(body: object, status: int = 200) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url == f"{BASE_URL}/metadata"
        return httpx.Response(status, json=body)

    return httpx.MockTransport(handler)


def _without(path: str) -> dict[str, Any]:
    """CAPABILITIES with one thing taken away: ``transaction``, ``Type.create``,
    ``Type.conditionalCreate`` (set false), ``Patient.search-type``."""
    statement = copy.deepcopy(CAPABILITIES)
    rest = statement["rest"][0]
    if path == "transaction":
        rest["interaction"] = [{"code": "batch"}]
        return statement
    kind, what = path.split(".")
    (resource,) = [r for r in rest["resource"] if r["type"] == kind]
    if what == "conditionalCreate":
        resource["conditionalCreate"] = False
    else:
        resource["interaction"] = [i for i in resource["interaction"] if i["code"] != what]
    return statement


def test_fhir_not_configured_is_green() -> None:
    assert check_fhir(None).ok


def test_fhir_green_when_it_supports_what_we_use() -> None:
    check = check_fhir(FHIR, _answering(CAPABILITIES))
    assert check.ok, check.line()
    assert check.detail.startswith(f"{BASE_URL} (Test EHR 1.0, FHIR 4.0.1): transaction")


@pytest.mark.parametrize(
    ("path", "missing"),
    [
        ("transaction", "system interaction transaction"),
        ("Provenance.create", "Provenance create"),
        ("Device.conditionalCreate", "Device conditionalCreate"),
        ("Patient.search-type", "Patient search-type"),
    ],
)
def test_fhir_red_names_what_is_missing(path: str, missing: str) -> None:
    check = check_fhir(FHIR, _answering(_without(path)))
    assert not check.ok
    assert check.detail == f"{BASE_URL} lacks {missing}"


def test_fhir_red_names_a_missing_resource_type() -> None:
    statement = copy.deepcopy(CAPABILITIES)
    rest = statement["rest"][0]
    rest["resource"] = [r for r in rest["resource"] if r["type"] != "Observation"]
    assert capability_gaps(statement) == ["Observation"]


def test_fhir_conditional_create_judged_only_where_declared() -> None:
    statement = copy.deepcopy(CAPABILITIES)
    for resource in statement["rest"][0]["resource"]:
        resource.pop("conditionalCreate", None)
        resource.pop("searchParam", None)
    assert capability_gaps(statement) == []


def test_fhir_red_unreachable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    check = check_fhir(FHIR, httpx.MockTransport(refuse))
    assert not check.ok
    assert check.detail == (
        f"GET {BASE_URL}/metadata unreachable (ConnectError: [Errno 111] Connection refused)"
    )
    assert "is the FHIR server running?" in check.fix


def test_fhir_red_for_an_error_status_or_another_resource() -> None:
    assert check_fhir(FHIR, _answering({}, 404)).detail.endswith("answered HTTP 404")
    other = check_fhir(FHIR, _answering({"resourceType": "OperationOutcome"}))
    assert not other.ok and "other than a CapabilityStatement" in other.detail


def test_fhir_red_for_another_fhir_version() -> None:
    statement = {**CAPABILITIES, "fhirVersion": "5.0.0"}
    check = check_fhir(FHIR, _answering(statement))
    assert not check.ok and check.detail == f"{BASE_URL} speaks FHIR 5.0.0"


# ------------------------------------------------------------------------------------ listener


def _listener(port: int, bind_address: str = "127.0.0.1") -> Any:
    return replace(load_settings().listener, port=port, bind_address=bind_address)


def test_listener_port_green_when_free() -> None:
    port = _free_port()
    check = check_listener_port(_listener(port))
    assert check.ok and check.detail == f"127.0.0.1:{port} free for the DICOM listener"


def test_listener_port_red_when_something_listens() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        check = check_listener_port(_listener(port))
    assert check.line() == (
        f"FAIL listener port: 127.0.0.1:{port} in use (is dermfusion serve already running?) "
        "— stop what listens there, or set [listener] port"
    )


def test_listener_port_red_for_an_address_not_of_this_host() -> None:
    check = check_listener_port(_listener(_free_port(), "192.0.2.1"))  # TEST-NET-1
    assert not check.ok and "not an address of this host" in check.detail
