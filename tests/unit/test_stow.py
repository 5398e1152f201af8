"""The STOW-RS sender against httpx.MockTransport fakes, and the [pacs] protocol settings.

What a real origin server answers (Orthanc's DICOMweb plugin, checked): 200 with the instance in
the Referenced SOP Sequence, also for an instance it already holds; 409 with the instance in the
Failed SOP Sequence, reason 0x0110, for an instance of another study than the URL names; 404 for
a path it does not serve. tests/integration/test_stow.py runs the real thing.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom import Dataset

from dicom_io.images import read_image
from dicom_io.sender import PacsRejectedError, PacsUnavailableError
from dicom_io.sr import MeasurementReportWriter
from dicom_io.stow import StowRsSender, multipart_related
from plugin.config import STOW_RS, ConfigError, load_settings
from plugin.domain import Demographics, Finding, ModelIdentity
from plugin.failures import describe
from plugin.outbox import PacsDestination, is_transient
from plugin.state import OutboxItem
from tests.conftest import SAMPLES

DICOMWEB = "http://pacs.test/dicom-web"
Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture(scope="module")
def sr_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SR as the outbox holds it: a PS3.10 file written by pydicom."""
    image = read_image(SAMPLES / "dms_jpeg_baseline.dcm")
    sr = MeasurementReportWriter().build(
        source=image.dataset,
        ref=image.ref,
        finding=Finding(0.75, 0.5, ModelIdentity("stow test", "1.0.0")),
        demographics=Demographics.unknown(),
    )
    path = tmp_path_factory.mktemp("outbox") / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def sr(sr_file: Path) -> Dataset:
    return pydicom.dcmread(sr_file)


def _uid(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]}


def _store_response(
    stored: Sequence[str] = (),
    failed: Sequence[tuple[str, int | None]] = (),
    warning: int | None = None,
) -> dict[str, Any]:
    """A Store Instances Response in DICOM JSON, as PS3.18 10.5.3 (and Orthanc) writes it."""

    def referenced(uid: str) -> dict[str, Any]:
        item = {"00081150": _uid("1.2.840.10008.5.1.4.1.1.88.34"), "00081155": _uid(uid)}
        if warning is not None:
            item["00081196"] = {"vr": "US", "Value": [warning]}
        return item

    def failure(uid: str, reason: int | None) -> dict[str, Any]:
        item = {"00081150": _uid("1.2.840.10008.5.1.4.1.1.88.34"), "00081155": _uid(uid)}
        if reason is not None:
            item["00081197"] = {"vr": "US", "Value": [reason]}
        return item

    body: dict[str, Any] = {"00081198": {"vr": "SQ"}, "00081199": {"vr": "SQ"}}
    if stored:
        body["00081199"]["Value"] = [referenced(uid) for uid in stored]
    if failed:
        body["00081198"]["Value"] = [failure(uid, reason) for uid, reason in failed]
    return body


def _sender(handler: Handler) -> StowRsSender:
    return StowRsSender(dicomweb_url=DICOMWEB + "/", transport=httpx.MockTransport(handler))


def _answer(status: int, body: Any = None, content_type: str = "application/dicom+json") -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if body is None:
            return httpx.Response(status)
        return httpx.Response(status, json=body, headers={"Content-Type": content_type})

    return handler


# -- the request ----------------------------------------------------------------------------


def test_the_request_is_one_application_dicom_part_with_the_bytes_pydicom_wrote(
    sr_file: Path, sr: Dataset
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=_store_response(stored=[sr.SOPInstanceUID]))

    _sender(handler).send(sr_file)
    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == f"{DICOMWEB}/studies/{sr.StudyInstanceUID}"
    assert request.headers["Accept"] == "application/dicom+json"
    content_type = request.headers["Content-Type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    boundary = content_type.rsplit("boundary=", 1)[1]
    body = request.content
    assert body.startswith(f"--{boundary}\r\n".encode())
    assert body.endswith(f"\r\n--{boundary}--\r\n".encode())
    assert body.count(f"--{boundary}".encode()) == 2  # one part, then the close delimiter
    # A MIME parser reads it back as one application/dicom part holding the file, byte for byte.
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    (part,) = list(message.iter_parts())
    assert part.get_content_type() == "application/dicom"
    assert part.get_payload(decode=True) == sr_file.read_bytes()
    parsed = pydicom.dcmread(io.BytesIO(part.get_payload(decode=True)))
    assert parsed.SOPInstanceUID == sr.SOPInstanceUID


def test_a_dataset_is_sent_as_a_part10_file(sr: Dataset) -> None:
    seen: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        return httpx.Response(200, json=_store_response(stored=[sr.SOPInstanceUID]))

    _sender(handler).send(sr)
    assert b"DICM" in seen[0][:300]  # preamble and file meta, as an outbox file has them


def test_the_boundary_never_occurs_in_the_data() -> None:
    boundary, body = multipart_related(b"\x00" * 10)
    assert len(boundary) == 32 and body.count(boundary.encode()) == 2


def test_an_instance_without_file_meta_is_not_sent(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3"
    path = tmp_path / "bare.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True)  # no preamble, no file meta

    def never(request: httpx.Request) -> httpx.Response:
        raise AssertionError("sent")

    with pytest.raises((ValueError, pydicom.errors.InvalidDicomError)):
        _sender(never).send(path)


# -- the answer -----------------------------------------------------------------------------


def test_stored_is_success_and_logged_on_one_line(
    sr_file: Path, sr: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicom_io.stow")
    _sender(_answer(200, _store_response(stored=[sr.SOPInstanceUID]))).send(sr_file)
    (record,) = caplog.records
    assert record.getMessage().startswith(f"STOW-RS of {sr.SOPInstanceUID} to {DICOMWEB}/studies/")
    assert "success" in record.getMessage()
    patient_id = str(sr.get("PatientID", ""))
    assert not patient_id or patient_id not in caplog.text


def test_stored_with_a_warning_is_success(
    sr_file: Path, sr: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    answer = _store_response(stored=[sr.SOPInstanceUID], warning=0xB000)
    _sender(_answer(202, answer)).send(sr_file)
    assert "stored with warning 0xB000" in caplog.text


@pytest.mark.parametrize(
    ("status", "body", "reason", "message"),
    [
        # Orthanc: an instance of another study than the URL names
        (409, "failed", 0x0110, "HTTP 409 Conflict, failure reason 0x0110 (processing failure)"),
        (200, "failed", 0xA700, "HTTP 200 OK, failure reason 0xA700 (out of resources)"),
        (202, "failed", 0xC122, "failure reason 0xC122 (transfer syntax not supported)"),
        (202, "failed", 0xC005, "failure reason 0xC005 (cannot understand)"),
        (202, "failed", None, "no failure reason given"),
        (409, None, None, "HTTP 409 Conflict"),
        (404, None, None, "HTTP 404 Not Found: check pacs.dicomweb_url"),
        (400, None, None, "HTTP 400 Bad Request"),
        (403, None, None, "HTTP 403 Forbidden"),
        (415, None, None, "HTTP 415 Unsupported Media Type"),
        (301, None, None, "HTTP 301 Moved Permanently: check pacs.dicomweb_url"),
        (200, "other", None, "not listed as stored"),
        (200, "not json", None, "without a readable application/dicom+json"),
    ],
)
def test_a_refusal_is_rejected_with_a_readable_reason(
    sr_file: Path, sr: Dataset, status: int, body: str | None, reason: int | None, message: str
) -> None:
    if body == "failed":
        handler = _answer(status, _store_response(failed=[(sr.SOPInstanceUID, reason)]))
    elif body == "other":
        handler = _answer(status, _store_response(stored=["1.2.3.4"]))
    elif body == "not json":
        handler = lambda request: httpx.Response(status, text="<NativeDicomModel/>")  # noqa: E731
    else:
        handler = _answer(status)
    with pytest.raises(PacsRejectedError) as caught:
        _sender(handler).send(sr_file)
    assert message in str(caught.value)
    assert caught.value.status == reason
    assert not is_transient(caught.value)  # counts towards parking
    assert describe(caught.value).startswith("PacsRejectedError: HTTP ")


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429])
def test_a_busy_or_failing_server_is_unavailable(sr_file: Path, status: int) -> None:
    with pytest.raises(PacsUnavailableError, match=f"HTTP {status}"):
        _sender(_answer(status)).send(sr_file)


@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectError("connection refused"),
        httpx.ConnectTimeout("timed out"),
        httpx.ReadTimeout("timed out"),
        httpx.RemoteProtocolError("server disconnected"),
    ],
)
def test_no_answer_is_unavailable(sr_file: Path, error: httpx.TransportError) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error

    with pytest.raises(PacsUnavailableError, match=f"no answer from {DICOMWEB}/studies/") as caught:
        _sender(handler).send(sr_file)
    assert is_transient(caught.value)  # retried for as long as it takes


def test_a_refused_port_is_unavailable(sr_file: Path) -> None:
    sender = StowRsSender(dicomweb_url="http://127.0.0.1:9/dicom-web", connect_timeout=2)
    with pytest.raises(PacsUnavailableError, match="ConnectError"):
        sender.send(sr_file)


def test_the_outbox_delivers_through_it_like_through_c_store(sr_file: Path, sr: Dataset) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json=_store_response(stored=[sr.SOPInstanceUID]))

    PacsDestination(_sender(handler)).deliver(OutboxItem("sr:x", "pacs", sr_file, 0))
    assert seen == [f"/dicom-web/studies/{sr.StudyInstanceUID}"]


# -- [pacs] protocol ------------------------------------------------------------------------


def _settings(tmp_path: Path, pacs: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "site.toml"
    path.write_text("[pacs]\n" + pacs)
    return load_settings(path, base_dir=tmp_path)


def test_stow_rs_needs_only_the_dicomweb_url(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path, 'protocol = "stow-rs"\ndicomweb_url = "https://pacs.example.org/dicom-web/"\n'
    )
    assert settings.pacs is not None
    assert settings.pacs.protocol == STOW_RS
    assert settings.pacs.dicomweb_url == "https://pacs.example.org/dicom-web"


def test_dimse_stays_the_default(tmp_path: Path) -> None:
    settings = _settings(tmp_path, 'ae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = 4242\n')
    assert settings.pacs is not None
    assert (settings.pacs.protocol, settings.pacs.dicomweb_url) == ("dimse", "")
    assert (settings.pacs.ae_title, settings.pacs.host, settings.pacs.port) == (
        "ORTHANC",
        "127.0.0.1",
        4242,
    )


@pytest.mark.parametrize(
    ("pacs", "message"),
    [
        ('protocol = "stow-rs"\n', "pacs.dicomweb_url is required with pacs.protocol"),
        (
            'protocol = "http"\ndicomweb_url = "http://x/dicom-web"\n',
            'pacs.protocol must be "dimse" or "stow-rs", got \'http\'',
        ),
        ('protocol = "dimse"\n', "[pacs] lacks ae_title, host, port"),
        (
            'ae_title = "O"\nhost = "h"\nport = 4242\ndicomweb_url = "http://x/dicom-web"\n',
            'pacs.dicomweb_url is used only with pacs.protocol = "stow-rs"',
        ),
        ('protocol = "stow-rs"\ndicomweb_url = "pacs:8042"\n', "must be an http:// or https://"),
        ('protocol = "stow-rs"\ndicomweb_url = "ftp://x/dicom-web"\n', "must be an http://"),
        ('protocol = "stow-rs"\ndicomweb_url = "http:///dicom-web"\n', "with a host"),
        ('protocol = "stow-rs"\ndicomweb_url = "http://x:port/"\n', "is not a URL"),
        (
            'protocol = "stow-rs"\ndicomweb_url = "https://u:secret@x/dicom-web"\n',
            "pacs.dicomweb_url must not carry a user name or password",
        ),
        ('protocol = "stow-rs"\ndicomweb_url = "http://x/dw?a=1"\n', "query or fragment"),
        ('protocol = "stow-rs"\ndicomweb_url = 8042\n', "pacs.dicomweb_url has the wrong type"),
        ('protocol = "stow-rs"\ndicomweb_url = "http://x/"\nport = 0\n', "pacs.port must be"),
    ],
)
def test_a_bad_pacs_protocol_setting_is_refused_naming_the_key(
    tmp_path: Path, pacs: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _settings(tmp_path, pacs)
    assert message in str(caught.value)
    assert "secret" not in str(caught.value)
