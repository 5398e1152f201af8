"""STOW-RS sender (DICOMweb, PS3.18 10.5 "Store Transaction"): our SR to a PACS that prefers HTTP.

The same contract as the C-STORE sender (``dicom_io.sender``), so the outbox does not need to
know which protocol carries an instance: ``send(instance)`` returns once the PACS has confirmed
that it stored the instance, or raises

- ``PacsUnavailableError`` when the PACS could not be asked (connection refused or reset,
  timeout, TLS failure) or answered that it cannot now (5xx, 408, 429): try again later;
- ``PacsRejectedError`` when it answered no: any other 3xx/4xx (404 for a wrong
  ``dicomweb_url``, 409 for a conflict), or a 200/202 whose store response lists our instance
  in the Failed SOP Sequence (0008,1198) or does not list it as stored at all. ``status`` is
  the Failure Reason (0008,1197) when the PACS gave one.

One instance per request, POSTed as ``multipart/related; type="application/dicom"`` to
``{dicomweb_url}/studies/{StudyInstanceUID}``: naming the study makes the PACS refuse (409) an
instance that does not belong to it instead of filing it elsewhere. The part is the outbox
file's bytes exactly as pydicom wrote them (PS3.10, preamble and file meta included).
Re-sending an instance the PACS already holds is answered as stored (Orthanc: 200 with it in
the Referenced SOP Sequence, nothing duplicated), so a resend is harmless.

Messages and log lines name UIDs, URLs and codes only: never the response body, which may
echo header values.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
from pydicom import Dataset, dcmread

from dicom_io.sender import PacsRejectedError, PacsUnavailableError

__all__ = ["StowRsSender", "multipart_related"]

LOG = logging.getLogger(__name__)

DICOM_MEDIA_TYPE = "application/dicom"
STORE_RESPONSE_MEDIA_TYPE = "application/dicom+json"
# Store Instances Response Module (PS3.18 table 10.5.3-1), DICOM JSON keys.
_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"
# The peer is away or busy, not saying no: 408 Request Timeout, 429 Too Many Requests, and 5xx.
_RETRY_LATER_STATUSES = frozenset({408, 429})
# Failure reasons PS3.18 10.5.3 names (from PS3.4 B.2.3 and PS3.7 C), for a readable reason.
_REASONS = {
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xC122: "transfer syntax not supported",
}


class StowRsSender:
    """Stores one instance per HTTP request at a DICOMweb origin server (the PACS)."""

    def __init__(
        self,
        *,
        dicomweb_url: str,
        connect_timeout: float = 10.0,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.dicomweb_url = dicomweb_url.rstrip("/")
        self.timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self.transport = transport  # tests: httpx.MockTransport

    @property
    def peer(self) -> str:
        return self.dicomweb_url

    def send(self, instance: Dataset | str | os.PathLike[str]) -> None:
        """STOW-RS ``instance`` (a dataset with file meta, or a DICOM file); raise a PacsError."""
        if isinstance(instance, Dataset):
            buffer = io.BytesIO()
            instance.save_as(buffer, enforce_file_format=True)
            data = buffer.getvalue()
        else:
            data = Path(instance).read_bytes()
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
        sop_instance = str(ds.get("SOPInstanceUID", ""))
        study = str(ds.get("StudyInstanceUID", ""))
        meta = getattr(ds, "file_meta", None)
        if meta is None or "TransferSyntaxUID" not in meta or not sop_instance:
            raise ValueError(
                f"{sop_instance or 'instance'}: needs SOPInstanceUID and a file meta "
                "Transfer Syntax UID (0002,0010) to be sent"
            )
        url = f"{self.dicomweb_url}/studies" + (f"/{study}" if study else "")
        started = time.monotonic()
        try:
            warning = self._store(url, data, sop_instance)
        except (PacsRejectedError, PacsUnavailableError) as exc:
            LOG.warning("STOW-RS of %s to %s failed: %s", sop_instance, url, exc)
            raise
        elapsed = time.monotonic() - started
        if warning is not None:
            LOG.warning(
                "STOW-RS of %s to %s stored with warning 0x%04X (%.2f s)",
                sop_instance,
                url,
                warning,
                elapsed,
            )
        else:
            LOG.info("STOW-RS of %s to %s: success (%.2f s)", sop_instance, url, elapsed)

    def _store(self, url: str, data: bytes, sop_instance: str) -> int | None:
        """POST the instance; its Warning Reason if stored with one, None if stored cleanly."""
        boundary, body = multipart_related(data)
        headers = {
            "Content-Type": f'multipart/related; type="{DICOM_MEDIA_TYPE}"; boundary={boundary}',
            "Accept": STORE_RESPONSE_MEDIA_TYPE,
        }
        try:
            with httpx.Client(timeout=self.timeout, transport=self.transport) as client:
                response = client.post(url, content=body, headers=headers)
        except httpx.TransportError as exc:  # connect/read/write errors and timeouts, TLS too
            raise PacsUnavailableError(f"no answer from {url}: {type(exc).__name__}") from exc
        return _outcome(response, sop_instance)


def multipart_related(data: bytes) -> tuple[str, bytes]:
    """A one-part ``multipart/related`` body (RFC 2387) holding ``data`` as application/dicom,
    and its boundary (random, and checked not to occur in the data)."""
    boundary = secrets.token_hex(16)
    while boundary.encode() in data:
        boundary = secrets.token_hex(16)
    head = f"--{boundary}\r\nContent-Type: {DICOM_MEDIA_TYPE}\r\n\r\n".encode()
    return boundary, head + data + f"\r\n--{boundary}--\r\n".encode()


def _outcome(response: httpx.Response, sop_instance: str) -> int | None:
    """Map the origin server's answer to stored (the Warning Reason or None) or an error."""
    status = response.status_code
    answer = f"HTTP {status} {response.reason_phrase}".rstrip()
    if status >= 500 or status in _RETRY_LATER_STATUSES:
        raise PacsUnavailableError(f"{answer}: try again later")
    store_response = _store_response(response)
    failed = _item_for(store_response, _FAILED_SOP_SEQUENCE, sop_instance)
    if failed is not None:
        reason = _code(failed, _FAILURE_REASON)
        raise PacsRejectedError(f"{answer}, {_describe_reason(reason)}", reason)
    if status not in (200, 202):
        hint = ": check pacs.dicomweb_url" if status in (301, 302, 303, 307, 308, 404, 405) else ""
        raise PacsRejectedError(f"{answer}{hint}", None)
    if store_response is None:
        raise PacsRejectedError(f"{answer} without a readable {STORE_RESPONSE_MEDIA_TYPE}", None)
    stored = _item_for(store_response, _REFERENCED_SOP_SEQUENCE, sop_instance)
    if stored is None:
        raise PacsRejectedError(f"{answer} but the instance is not listed as stored", None)
    return _code(stored, _WARNING_REASON)


def _store_response(response: httpx.Response) -> dict[str, Any] | None:
    """The Store Instances Response as DICOM JSON, or None when the body is not one (Orthanc
    answers its errors with its own JSON, and 409 without a Content-Type)."""
    try:
        parsed = json.loads(response.content)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _item_for(
    store_response: dict[str, Any] | None, sequence: str, sop_instance: str
) -> dict[str, Any] | None:
    """The item of ``sequence`` that references ``sop_instance``, if any."""
    if store_response is None:
        return None
    element = store_response.get(sequence)
    items = element.get("Value", []) if isinstance(element, dict) else []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and sop_instance in _values(item, _REFERENCED_SOP_INSTANCE_UID):
            return item
    return None


def _values(item: dict[str, Any], tag: str) -> list[Any]:
    element = item.get(tag)
    values = element.get("Value", []) if isinstance(element, dict) else []
    return values if isinstance(values, list) else []


def _code(item: dict[str, Any], tag: str) -> int | None:
    values = _values(item, tag)
    return values[0] if values and isinstance(values[0], int) else None


def _describe_reason(reason: int | None) -> str:
    if reason is None:
        return "instance listed as failed, no failure reason given"
    name = _reason_name(reason)
    return f"failure reason 0x{reason:04X}" + (f" ({name})" if name else "")


def _reason_name(reason: int) -> str | None:
    if reason in _REASONS:
        return _REASONS[reason]
    if reason & 0xFF00 == 0xA700:
        return "out of resources"
    if reason & 0xFF00 == 0xA900:
        return "data set does not match SOP class"
    if reason & 0xF000 == 0xC000:
        return "cannot understand"
    return None
