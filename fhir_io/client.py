"""A small synchronous FHIR R4 REST client: transactions, reads, searches.

Only what the plugin needs, with errors mapped onto ``FhirUnavailableError`` (retry later) and
``FhirRejectedError`` (4xx, do not retry). Patient identifiers must never reach a log: our logs
carry resource types, parameter names, status codes and timings only; searches are sent as
``POST [type]/_search`` so that no URL holds a search value; and httpx's own INFO line ("HTTP
Request: GET <url>") gets a filter that drops query strings (server paging links repeat them).
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import httpx

from fhir_io._exceptions import FhirError, FhirRejectedError, FhirUnavailableError
from fhir_io._search import identifier_token

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]+$")
_RELATIVE_REFERENCE = re.compile(
    r"^[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}(/_history/[A-Za-z0-9\-.]{1,64})?$"
)
# A searchset is paged; stop following `next` links after this many pages (a server loop guard).
MAX_PAGES = 100

_HTTPX_LOG = logging.getLogger("httpx")

SearchParams = Mapping[str, str | Sequence[str]] | Sequence[tuple[str, str]]


class _DropQueryStrings(logging.Filter):
    """Strip the query string from URLs that httpx passes as log-record arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            isinstance(a, httpx.URL) and a.query for a in record.args
        ):
            record.args = tuple(
                a.copy_with(query=b"redacted") if isinstance(a, httpx.URL) and a.query else a
                for a in record.args
            )
        return True


def _install_httpx_log_filter() -> None:
    if not any(isinstance(f, _DropQueryStrings) for f in _HTTPX_LOG.filters):
        _HTTPX_LOG.addFilter(_DropQueryStrings())


class FhirClient:
    """Talks JSON to one FHIR R4 server's base URL (e.g. ``http://host:8080/fhir``).

    ``transport`` replaces the network (``httpx.MockTransport`` in unit tests). The client owns
    its connection pool: use it as a context manager or call ``close()``. ``auth`` is how we
    prove who we are (``fhir_io.auth``); ``verify`` a CA bundle (PEM path) that https
    certificates must chain to instead of the system store.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
        auth: httpx.Auth | None = None,
        verify: str | os.PathLike[str] | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.base_url = base_url.rstrip("/")
        _install_httpx_log_filter()
        self._http = httpx.Client(
            base_url=self.base_url + "/",
            timeout=timeout,
            transport=transport,
            headers={"Accept": FHIR_JSON, **(headers or {})},
            follow_redirects=False,
            auth=auth,
            verify=https_context(verify),
        )

    # ---------------------------------------------------------------- lifecycle

    @property
    def auth(self) -> httpx.Auth | None:
        return self._http.auth

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---------------------------------------------------------------- interactions

    def post_transaction(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        """POST a transaction Bundle to the base URL; returns the transaction-response Bundle."""
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
            raise ValueError("bundle must be a Bundle of type 'transaction'")
        entries = len(bundle.get("entry") or [])
        body = self._request(
            "POST",
            self.base_url,
            json=dict(bundle),
            headers={"Content-Type": FHIR_JSON},
            what="transaction",
        )
        if body.get("resourceType") != "Bundle" or body.get("type") != "transaction-response":
            raise FhirError("transaction answer is not a transaction-response Bundle")
        if len(body.get("entry") or []) != entries:
            raise FhirError(
                f"transaction-response has {len(body.get('entry') or [])} entries for {entries}"
            )
        return body

    def read(self, reference: str) -> dict[str, Any]:
        """GET one resource: ``Type/id``, ``Type/id/_history/n`` or an absolute URL on this base."""
        path = reference
        if reference.startswith(self.base_url + "/"):
            path = reference[len(self.base_url) + 1 :]
        if not _RELATIVE_REFERENCE.match(path):
            raise ValueError(
                f"reference must be Type/id[/_history/vid] on {self.base_url}, got {reference!r}"
            )
        resource_type = path.split("/", 1)[0]
        body = self._request("GET", path, what=f"read {resource_type}")
        if body.get("resourceType") != resource_type:
            raise FhirError(f"read {resource_type} answered a {body.get('resourceType')!r}")
        return body

    def search(self, resource_type: str, params: SearchParams) -> list[dict[str, Any]]:
        """Every resource of the searchset (matches and ``_include``d ones), following paging.

        Sent as ``POST [type]/_search`` (form body), which R4 servers must support like GET.

        ``params`` may be a mapping (a sequence value repeats the parameter, as ``_include``
        needs) or a list of pairs.
        """
        return [entry["resource"] for entry in self._search_entries(resource_type, params)]

    def find_patient(self, system: str, value: str) -> dict[str, Any] | None:
        """The one Patient with identifier ``system|value``; None if none, rejected if several.

        Several matches mean the identifier system is not what we think it is (or the EHR holds
        duplicates): picking one would risk attaching a result to the wrong person.
        """
        if not system or not value:
            raise ValueError("system and value must both be non-empty")
        body = self._first_page(
            "Patient",
            [("identifier", identifier_token(system, value)), ("_count", "2")],
            what="search Patient(identifier)",
            redact=(value,),
        )
        patients = [
            e["resource"]
            for e in _resource_entries(body)
            if e["resource"].get("resourceType") == "Patient"
            and (e.get("search") or {}).get("mode", "match") == "match"
        ]
        total = body.get("total")
        if len(patients) > 1 or (isinstance(total, int) and total > 1) or _next_link(body):
            count = total if isinstance(total, int) else f"{len(patients)} or more"
            raise FhirRejectedError(
                f"{count} Patients match one identifier of system {system}: ambiguous",
                diagnostics="multiple matches",
            )
        return patients[0] if patients else None

    # ---------------------------------------------------------------- internals

    def _first_page(
        self,
        resource_type: str,
        pairs: list[tuple[str, str]],
        *,
        what: str,
        redact: Sequence[str] = (),
    ) -> dict[str, Any]:
        """POST [type]/_search: the parameters travel in the body, so no URL (access log, proxy
        log, httpx's own INFO line) ever holds a search value such as a patient identifier."""
        body = self._request(
            "POST",
            f"{resource_type}/_search",
            content=urlencode(pairs).encode("ascii"),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            what=what,
            redact=redact,
        )
        _check_searchset(body, what)
        return body

    def _search_entries(self, resource_type: str, params: SearchParams) -> list[dict[str, Any]]:
        if not _RESOURCE_TYPE.match(resource_type):
            raise ValueError(f"resource_type must be a FHIR type name, got {resource_type!r}")
        pairs = _as_pairs(params)
        what = f"search {resource_type}({','.join(sorted({k for k, _ in pairs}))})"
        body = self._first_page(resource_type, pairs, what=what)
        entries: list[dict[str, Any]] = []
        for _page in range(MAX_PAGES):
            entries += _resource_entries(body)
            next_url = _next_link(body)
            if not next_url:
                return entries
            if not next_url.startswith(self.base_url + "/"):
                raise FhirError(f"{what}: next page is not on {self.base_url}")
            # The server's own paging URL (it may repeat the parameters in its query string).
            body = self._request("GET", next_url, what=what)
            _check_searchset(body, what)
        raise FhirError(f"{what}: more than {MAX_PAGES} pages")

    def _request(
        self,
        method: str,
        url: str,
        *,
        what: str,
        redact: Sequence[str] = (),
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Send one request; map transport failures and error statuses onto FhirError kinds."""
        started = time.monotonic()
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TimeoutException as exc:
            raise FhirUnavailableError(
                f"{what}: FHIR server timed out ({type(exc).__name__})"
            ) from exc
        except httpx.TransportError as exc:
            raise FhirUnavailableError(
                f"{what}: FHIR server unreachable ({type(exc).__name__}: {_one_line(str(exc))})"
            ) from exc
        elapsed_ms = (time.monotonic() - started) * 1000
        log.debug("FHIR %s -> %d in %.0f ms", what, response.status_code, elapsed_ms)
        status = response.status_code
        if status >= 500 or status in (408, 429):  # 408: the server timed out waiting
            raise FhirUnavailableError(
                f"{what}: FHIR server answered {status}: {_diagnostics(response, redact)}",
                status=status,
            )
        if status >= 400:
            diagnostics = _diagnostics(response, redact)
            # 401 after a fresh token, or 403: the credentials, not this request, need fixing.
            why = {401: " (not authenticated)", 403: " (not authorised)"}.get(status, "")
            raise FhirRejectedError(
                f"{what}: FHIR server rejected it with {status}{why}: {diagnostics}",
                status=status,
                diagnostics=diagnostics,
            )
        if status < 200 or status >= 300:
            raise FhirError(f"{what}: unexpected HTTP status {status}")
        try:
            body = response.json()
        except ValueError as exc:
            raise FhirError(f"{what}: answer {status} is not JSON") from exc
        if not isinstance(body, dict):
            raise FhirError(f"{what}: answer {status} is not a FHIR resource")
        return body


def https_context(ca_certificates: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """TLS 1.2 or later, certificates verified against ``ca_certificates`` (PEM) or, without
    it, the system CA store; host names checked."""
    context = ssl.create_default_context(
        cafile=None if ca_certificates is None else os.fspath(ca_certificates)
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _check_searchset(body: dict[str, Any], what: str) -> None:
    if body.get("resourceType") != "Bundle" or body.get("type") != "searchset":
        raise FhirError(f"{what} answered something other than a searchset Bundle")


def _resource_entries(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Entries holding a resource, minus the server's OperationOutcome ones (mode 'outcome')."""
    return [
        e
        for e in body.get("entry") or []
        if isinstance(e.get("resource"), dict) and (e.get("search") or {}).get("mode") != "outcome"
    ]


def _next_link(body: dict[str, Any]) -> str | None:
    for link in body.get("link") or []:
        if link.get("relation") == "next" and link.get("url"):
            return str(link["url"])
    return None


def _as_pairs(params: SearchParams) -> list[tuple[str, str]]:
    if isinstance(params, Mapping):
        pairs: list[tuple[str, str]] = []
        for key, value in params.items():
            if isinstance(value, str):
                pairs.append((key, value))
            else:
                pairs.extend((key, v) for v in value)
        return pairs
    return [(key, value) for key, value in params]


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _diagnostics(response: httpx.Response, redact: Sequence[str]) -> str:
    """The OperationOutcome's issues as one line (or the start of a non-FHIR body), redacted."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        parts = []
        for issue in body.get("issue") or []:
            text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or ""
            head = "/".join(str(issue.get(k)) for k in ("severity", "code") if issue.get(k))
            parts.append(f"{head}: {text}" if head and text else head or text)
        text = "; ".join(p for p in parts if p) or "OperationOutcome without diagnostics"
    else:
        text = response.text or response.reason_phrase or "(empty body)"
    for secret in redact:
        if secret:
            text = text.replace(secret, "***")
    return _one_line(text)
