"""`dermfusion doctor`: is this installation ready to take studies? One line per check.

An operator installing the plugin beside a PACS otherwise finds a wrong port, an unwritable
storage folder or an EHR without conditional create only when the first study fails. Each check
is a small function returning a ``Check`` (name, ok, detail, fix), so it can be tested alone;
``Doctor`` runs them in order and prints each line as soon as it is known (the model check takes
seconds). Exit status 0 only when every check is green.

Nothing here reads or prints patient data: the test inference scores a synthetic image with
unknown demographics, and the peers are only asked who they are (C-ECHO, FHIR ``/metadata``).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from plugin.config import (
    DEFAULTS_FILE,
    REPO_ROOT,
    STOW_RS,
    ConfigError,
    FhirSettings,
    ListenerSettings,
    PacsSettings,
    Settings,
    StorageSettings,
    load_settings,
)

if TYPE_CHECKING:
    import httpx

    from dicom_io.sender import CStoreSender
    from plugin.model import FusionModel

# The FHIR client's request timeout (fhir_io.client.FhirClient's default): a server that cannot
# answer /metadata within what a delivery gets would fail the deliveries too.
FHIR_TIMEOUT_S = 10.0
# C-ECHO: shorter than the sender's delivery timeouts, so an unreachable PACS is reported in
# seconds rather than the minute a C-STORE may legitimately take.
PACS_CONNECT_TIMEOUT_S = 5.0
PACS_ASSOCIATION_TIMEOUT_S = 10.0
# What dermfusion sends to the EHR (fhir_io.reports): each as a conditional create in one
# transaction Bundle. Patient is only searched (never created: the EHR owns patient identity).
FHIR_CREATED_TYPES = ("DiagnosticReport", "Observation", "Device", "Provenance")
# fhir.resources R4B models: R4 (4.0.x) and R4B (4.3.x) servers read what we write.
FHIR_VERSIONS = ("4.0", "4.3")
# The test image's side: the network's input size, so nothing is resized.
TEST_IMAGE_SIZE = 224

_GREEN, _RED, _RESET = "\033[32m", "\033[31m", "\033[0m"


@dataclass(frozen=True)
class Check:
    """One check's outcome: ``detail`` says what was found, ``fix`` what to do when red."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self, *, colour: bool = False) -> str:
        tag = "OK  " if self.ok else "FAIL"
        if colour:
            tag = f"{_GREEN if self.ok else _RED}{tag}{_RESET}"
        fix = f" — {self.fix}" if self.fix and not self.ok else ""
        return f"{tag} {self.name}: {self.detail}{fix}"


def _red(name: str, detail: str, fix: str) -> Check:
    return Check(name, False, detail, fix)


# ------------------------------------------------------------------------------------ config


def check_config(path: str | Path | None) -> tuple[Check, Settings | None]:
    """The settings every other check needs; without them nothing else can be judged."""
    shown = str(DEFAULTS_FILE.relative_to(REPO_ROOT))
    try:
        settings = load_settings(path)
    except ConfigError as error:
        message = str(error)
        if path is not None and not message.startswith(str(path)):
            message = f"{path}: {message}"
        fix = f"correct --config FILE (every key and its default: {shown})"
        return _red("config", message, fix), None
    return Check("config", True, f"{shown} + {path}" if path else f"{shown} (defaults)"), settings


# ------------------------------------------------------------------------------------ storage


def check_storage(storage: StorageSettings) -> Check:
    """The spool, outbox and state database go here: the folder must exist or be creatable,
    and a file written there must reach the disk (create, fsync, delete)."""
    folder = storage.dir
    fix = f"make {folder} writable by the service's user, or set [storage] dir"
    created: list[Path] = []
    try:
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        for directory in reversed(missing):
            directory.mkdir(mode=0o700)
            created.append(directory)
        descriptor, probe = tempfile.mkstemp(prefix=".dermfusion-doctor-", dir=folder)
        try:
            os.write(descriptor, b"dermfusion doctor\n")
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
            os.unlink(probe)
    except OSError as error:
        what = "cannot be created" if folder not in created and not folder.is_dir() else ""
        reason = error.strerror or type(error).__name__
        where = f" ({error.filename})" if error.filename else ""
        return _red("storage", f"{folder} {what or 'is not writable'}: {reason}{where}", fix)
    finally:
        # Leave no trace: `serve` creates the folder itself, owner-only, as its own user.
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()
    state = "can be created (serve creates it)" if created else "exists"
    return Check("storage", True, f"{folder} {state}, a file written there was fsync'd")


def check_free_space(storage: StorageSettings) -> Check:
    """Below ``storage.min_free_mb`` the service refuses new studies: say so before the PACS
    sees its associations refused (the watermark is the service's own, not a copy)."""
    from plugin.retention import MIB, FreeSpaceWatermark

    volume = next((p for p in (storage.dir, *storage.dir.parents) if p.exists()), storage.dir)
    watermark = FreeSpaceWatermark(volume, storage.min_free_mb * MIB)
    shortfall = watermark.shortfall()
    if shortfall is not None:
        return _red(
            "free space",
            f"{volume}: {shortfall}",
            "free space on that volume, move [storage] dir, or lower storage.min_free_mb",
        )
    try:
        free = shutil.disk_usage(volume).free // MIB
    except OSError as error:
        return _red("free space", f"{volume}: {error.strerror}", "check [storage] dir")
    limit = (
        f"new studies refused below {storage.min_free_mb} MiB"
        if storage.min_free_mb
        else "storage.min_free_mb = 0: no watermark"
    )
    return Check("free space", True, f"{free} MiB free on the volume of {volume} ({limit})")


# ------------------------------------------------------------------------------------ model


def synthetic_lesion() -> Any:
    """A skin-toned 224x224 RGB image with a dark oval: exercises the whole network without
    any patient's image (the doctor must not need, or print, clinical data)."""
    import numpy as np

    y, x = np.mgrid[0:TEST_IMAGE_SIZE, 0:TEST_IMAGE_SIZE].astype(np.float32)
    centre = TEST_IMAGE_SIZE / 2
    inside = ((x - centre) / 60) ** 2 + ((y - centre) / 45) ** 2 <= 1.0
    rgb = np.empty((TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3), dtype=np.uint8)
    rgb[...] = (222, 178, 150)
    rgb[inside] = (92, 58, 40)
    return rgb


def _configured_load(settings: Settings) -> Callable[[Path], FusionModel]:
    """Load as ``serve`` does: its thread count, its runtime (ONNX Runtime's export included,
    in memory: the doctor leaves nothing behind in ``[storage] dir``)."""
    from plugin.model import FusionModel, use_threads

    def load(bundle_dir: Path) -> FusionModel:
        use_threads(settings.model.threads)
        return FusionModel.load(bundle_dir, runtime=settings.model.runtime)

    return load


def check_model(bundle_dir: Path, load: Callable[[Path], FusionModel] | None = None) -> Check:
    """The bundle must load and score: a missing weights file or a network that returns NaN
    would otherwise only show when the first study is scored."""
    from plugin.domain import Demographics

    if load is None:
        from plugin.model import FusionModel

        load = FusionModel.load
    fix = "check [model] bundle_dir (configs/ and models/model.pt; `dermfusion train` makes them)"
    started = time.monotonic()
    try:
        model = load(bundle_dir)
    except Exception as error:  # noqa: BLE001 - whatever stops the bundle loading is the finding
        return _red("model", f"{bundle_dir} does not load: {_one_line(error)}", fix)
    loaded = time.monotonic() - started
    identity = model.identity
    name = (
        f"{identity.name} {identity.version}, weights {identity.weights_digest[:12] or '?'}, "
        f"device UID {identity.device_uid}"
    )
    started = time.monotonic()
    try:
        findings = model.score([synthetic_lesion()], [Demographics.unknown()])
        probability = float(findings[0].probability)
    except Exception as error:  # noqa: BLE001 - a scoring failure of any kind is the finding
        return _red("model", f"{name}: test inference failed: {_one_line(error)}", fix)
    took = time.monotonic() - started
    if not (math.isfinite(probability) and 0.0 <= probability <= 1.0):
        return _red(
            "model",
            f"{name}: test inference gave {probability!r}, not a probability",
            "the weights are broken: restore models/ from the release or retrain",
        )
    return Check(
        "model",
        True,
        f"{name}; loaded in {loaded:.1f} s, test inference on a synthetic image in "
        f"{took:.2f} s (p={probability:.3f})",
    )


# ------------------------------------------------------------------------------------ PACS


def check_pacs(pacs: PacsSettings | None, calling_ae: str) -> Check:
    """C-ECHO to the PACS the SRs go to, as the sender associates (same AE titles, same
    TCP_NODELAY and rejection handling), naming why it failed: refused, timed out, rejected."""
    if pacs is None:
        return Check("pacs", True, "not configured (results stay in outbox)")
    if pacs.protocol == STOW_RS:
        return _check_dicomweb(pacs.dicomweb_url)
    from dicom_io.sender import CStoreSender
    from plugin.peers import pacs_tls_context

    try:
        ssl_context = pacs_tls_context(pacs)
    except ConfigError as error:
        return _red("pacs", str(error), "check [pacs] tls_* (PEM files readable by dermfusion)")
    sender = CStoreSender(
        calling_ae=calling_ae,
        peer_ae=pacs.ae_title,
        host=pacs.host,
        port=pacs.port,
        connection_timeout=PACS_CONNECT_TIMEOUT_S,
        acse_timeout=PACS_ASSOCIATION_TIMEOUT_S,
        dimse_timeout=PACS_ASSOCIATION_TIMEOUT_S,
        network_timeout=PACS_ASSOCIATION_TIMEOUT_S,
        ssl_context=ssl_context,
    )
    # A plain TCP connect first: pynetdicom reports refused, timed out and unresolvable alike
    # as "aborted", and the fix differs.
    unreachable = _connect(pacs.host, pacs.port, f"C-ECHO to {sender.peer}", "[pacs] host/port")
    return unreachable or _echo(sender, f"C-ECHO to {sender.peer}")


def _check_dicomweb(url: str) -> Check:
    """STOW-RS: only whether the DICOMweb server accepts connections (a store is not tried:
    the doctor writes nothing into the PACS)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    unreachable = _connect(parts.hostname or "", port, f"STOW-RS to {url}", "[pacs] dicomweb_url")
    return unreachable or Check(
        "pacs", True, f"STOW-RS to {url}: the server accepts connections (no store tried)"
    )


def _connect(host: str, port: int, what: str, keys: str) -> Check | None:
    """A red Check when nothing accepts a TCP connection at host:port, saying why."""
    where = f"check {keys}"
    try:
        with socket.create_connection((host, port), timeout=PACS_CONNECT_TIMEOUT_S):
            return None
    except ConnectionRefusedError:
        return _red("pacs", f"{what} refused", f"is the PACS running? {where}")
    except TimeoutError:
        return _red(
            "pacs",
            f"{what} timed out after {PACS_CONNECT_TIMEOUT_S:.0f} s",
            f"a firewall in between, or the wrong host? {where}",
        )
    except socket.gaierror as error:
        return _red("pacs", f"{what}: host not found ({error.strerror})", where)
    except OSError as error:
        return _red("pacs", f"{what} failed: {error.strerror or error}", where)


def _echo(sender: CStoreSender, what: str) -> Check:
    """The sender's own C-ECHO, its failure turned into the fix a PACS administrator needs."""
    from dicom_io.sender import PacsRejectedError, PacsUnavailableError

    try:
        took = sender.echo()
    except PacsRejectedError as error:
        return _red("pacs", f"{what}: {error}", "see the PACS's log for why it refused C-ECHO")
    except PacsUnavailableError as error:
        if "association rejected" in str(error):
            return _red(
                "pacs",
                f"{what} rejected: {error}",
                f"check [pacs] ae_title (the PACS's own AE title) and that the PACS knows "
                f"{sender.calling_ae} ([listener] ae_title) as a modality",
            )
        return _red(
            "pacs",
            f"{what} failed: {error}",
            "is that port the PACS's DICOM port? check [pacs] host/port",
        )
    return Check("pacs", True, f"{what} answered success in {took * 1000:.0f} ms")


# ------------------------------------------------------------------------------------ FHIR


def capability_gaps(statement: dict[str, Any]) -> list[str]:
    """What a CapabilityStatement lacks of what dermfusion uses (empty: nothing).

    We POST one transaction Bundle of conditional creates (``ifNoneExist``) of DiagnosticReport,
    Observation, Device and Provenance, and search Patient by identifier. ``conditionalCreate``
    and ``searchParam`` are judged only where the server declares them (many leave them out).
    """
    servers = [r for r in statement.get("rest") or [] if r.get("mode", "server") == "server"]
    if not servers:
        return ["a rest entry in server mode"]
    system = {i.get("code") for rest in servers for i in rest.get("interaction") or []}
    resources: dict[str, dict[str, Any]] = {}
    for rest in servers:
        for resource in rest.get("resource") or []:
            resources.setdefault(str(resource.get("type")), resource)
    gaps = [] if "transaction" in system else ["system interaction transaction"]
    for resource_type in (*FHIR_CREATED_TYPES, "Patient"):
        resource = resources.get(resource_type)
        if resource is None:
            gaps.append(resource_type)
            continue
        interactions = {i.get("code") for i in resource.get("interaction") or []}
        if resource_type == "Patient":
            if "search-type" not in interactions:
                gaps.append("Patient search-type")
            params = {p.get("name") for p in resource.get("searchParam") or []}
            if params and "identifier" not in params:
                gaps.append("Patient search parameter identifier")
            continue
        if "create" not in interactions:
            gaps.append(f"{resource_type} create")
        if resource.get("conditionalCreate") is False:
            gaps.append(f"{resource_type} conditionalCreate")
    return gaps


def check_fhir(fhir: FhirSettings | None, transport: httpx.BaseTransport | None = None) -> Check:
    """GET [base]/metadata and hold its CapabilityStatement against what the reports need, so
    an EHR endpoint that would refuse every transaction is found before the first report."""
    if fhir is None:
        return Check("fhir", True, "not configured (results stay in outbox)")
    import httpx

    from fhir_io import FhirError
    from fhir_io.client import FHIR_JSON, https_context
    from plugin.peers import fhir_auth

    url = f"{fhir.base_url}/metadata"
    where = "check [fhir] base_url"
    try:
        with httpx.Client(
            timeout=FHIR_TIMEOUT_S,
            transport=transport,
            headers={"Accept": FHIR_JSON},
            follow_redirects=False,
            verify=https_context(fhir.ca_certificates),
            auth=fhir_auth(fhir),
        ) as http:
            response = http.get(url)
    except FhirError as error:  # the OAuth2 token request failed (names no secret)
        return _red("fhir", str(error), "check [fhir] token_url, client_id and client secret")
    except httpx.TimeoutException:
        return _red(
            "fhir",
            f"GET {url} timed out after {FHIR_TIMEOUT_S:.0f} s",
            f"is it overloaded? {where}",
        )
    except httpx.TransportError as error:
        return _red(
            "fhir",
            f"GET {url} unreachable ({type(error).__name__}: {_one_line(error)})",
            f"is the FHIR server running? {where}",
        )
    if response.status_code != 200:
        return _red(
            "fhir",
            f"GET {url} answered HTTP {response.status_code}",
            f"{where} (the FHIR base, e.g. https://ehr.example.org/fhir)",
        )
    try:
        statement = response.json()
    except ValueError:
        statement = None
    if not isinstance(statement, dict) or statement.get("resourceType") != "CapabilityStatement":
        return _red("fhir", f"GET {url} answered something other than a CapabilityStatement", where)
    version = str(statement.get("fhirVersion") or "")
    if version and not version.startswith(FHIR_VERSIONS):
        return _red(
            "fhir", f"{fhir.base_url} speaks FHIR {version}", "dermfusion needs an R4 endpoint"
        )
    gaps = capability_gaps(statement)
    if gaps:
        return _red(
            "fhir",
            f"{fhir.base_url} lacks {', '.join(gaps)}",
            "dermfusion sends transaction Bundles of conditional creates and searches Patient "
            "by identifier: enable them on the server or point [fhir] base_url at one that has",
        )
    software = statement.get("software") or {}
    served = " ".join(str(software.get(k)) for k in ("name", "version") if software.get(k))
    return Check(
        "fhir",
        True,
        f"{fhir.base_url} ({served or 'server'}, FHIR {version or '?'}): transaction, "
        f"conditional create of {', '.join(FHIR_CREATED_TYPES)}, Patient search",
    )


# ------------------------------------------------------------------------------------ listener


def check_listener_port(listener: ListenerSettings) -> Check:
    """`serve` must be able to bind its DICOM port; a bind here is the only honest test."""
    address = f"{listener.bind_address}:{listener.port}"
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            listener.bind_address, listener.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        return _red(
            "listener port",
            f"{address}: address not found ({error.strerror})",
            "check [listener] bind_address",
        )
    with socket.socket(family, kind, proto) as sock:
        # As pynetdicom's server does: connections in TIME_WAIT do not make the port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return _red(
                    "listener port",
                    f"{address} in use (is dermfusion serve already running?)",
                    "stop what listens there, or set [listener] port",
                )
            if error.errno == errno.EADDRNOTAVAIL:
                return _red(
                    "listener port",
                    f"{address}: not an address of this host",
                    "check [listener] bind_address",
                )
            if error.errno == errno.EACCES:
                return _red(
                    "listener port",
                    f"{address}: permission denied (ports below 1024 need privileges)",
                    "set [listener] port to 1024 or above (e.g. 11112)",
                )
            return _red(
                "listener port", f"{address}: {error.strerror or error}", "check [listener]"
            )
    return Check("listener port", True, f"{address} free for the DICOM listener")


# ------------------------------------------------------------------------------------ doctor


@dataclass
class Doctor:
    """Runs every check for one installation, in the order a study needs them."""

    settings: Settings

    def checks(self) -> Iterator[Check]:
        settings = self.settings
        yield check_storage(settings.storage)
        yield check_free_space(settings.storage)
        yield check_model(settings.model.bundle_dir, _configured_load(settings))
        yield check_pacs(settings.pacs, settings.listener.ae_title)
        yield check_fhir(settings.fhir)
        yield check_listener_port(settings.listener)


def examine(config: str | Path | None, out: TextIO | None = None) -> int:
    """Print one line per check as it completes; 0 when all are green, else 1."""
    out = out or sys.stdout
    colour = out.isatty() and "NO_COLOR" not in os.environ

    def show(check: Check) -> bool:
        print(check.line(colour=colour), file=out, flush=True)
        return check.ok

    config_check, settings = check_config(config)
    if not show(config_check) or settings is None:
        return 1
    results = [show(check) for check in Doctor(settings).checks()]
    return 0 if all(results) else 1


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
