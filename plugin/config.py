"""One typed settings object, loaded from TOML over the documented defaults.

The defaults and the meaning of every key live in ``configs/dermfusion.toml``; this module only
types and checks them, so bad values are refused with the key that holds them.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULTS_FILE = REPO_ROOT / "configs" / "dermfusion.toml"
DEFAULT_PATIENT_IDENTIFIER_SYSTEM = "urn:dermfusion:patient-id"
_AE_TITLE = re.compile(r"^[ -~]{1,16}$")
# How SRs reach the PACS: DICOM C-STORE, or DICOMweb STOW-RS (HTTP).
DIMSE = "dimse"
STOW_RS = "stow-rs"
# The C-STORE peer; STOW-RS needs only dicomweb_url, so these may be left out with it.
_DIMSE_PEER_KEYS = {"ae_title", "host", "port"}


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class ListenerSettings:
    ae_title: str
    port: int
    allowed_calling_aes: tuple[str, ...]
    bind_address: str
    allow_any_calling_ae: bool = False
    max_associations: int = 10
    max_associations_per_peer: int = 4
    idle_timeout_seconds: float = 15.0
    max_instance_mb: int = 100
    max_pixels: int = 100_000_000
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    tls_ca_certificates: Path | None = None


@dataclass(frozen=True)
class StudySettings:
    stable_seconds: float
    max_attempts: int


@dataclass(frozen=True)
class PacsSettings:
    """Where SRs and captures go: C-STORE to ``ae_title`` at ``host:port`` (protocol dimse), or
    STOW-RS to ``dicomweb_url`` (protocol stow-rs); the other protocol's fields stay empty."""

    ae_title: str = ""
    host: str = ""
    port: int = 0
    protocol: str = DIMSE
    dicomweb_url: str = ""


@dataclass(frozen=True)
class FhirSettings:
    base_url: str
    patient_identifier_system: str


@dataclass(frozen=True)
class HttpSettings:
    """The health, metrics and status endpoint; None (no ``[http]`` section) turns it off."""

    port: int
    bind_address: str = "127.0.0.1"
    recent_studies: int = 50


@dataclass(frozen=True)
class DemographicsSettings:
    on_conflict: str
    fhir_wait_seconds: float


@dataclass(frozen=True)
class OutboxSettings:
    retry_initial_seconds: float
    retry_max_seconds: float
    max_attempts: int

    @property
    def stuck_after_seconds(self) -> float:
        """An owed delivery older than this is stuck, not merely being retried: it has sat
        through the longest backoff three times (or nothing is delivering). A minute at least,
        so a burst of studies queued behind each other is not mistaken for it."""
        return max(60.0, 3 * self.retry_max_seconds)


@dataclass(frozen=True)
class SaliencySettings:
    secondary_capture: bool


@dataclass(frozen=True)
class StorageSettings:
    dir: Path
    min_free_mb: int = 512

    @property
    def spool(self) -> Path:
        return self.dir / "spool"

    @property
    def outbox(self) -> Path:
        return self.dir / "outbox"

    @property
    def state_database(self) -> Path:
        """The one SQLite file of plugin.state: the service and the operator commands share it."""
        return self.dir / "state.sqlite3"


@dataclass(frozen=True)
class RetentionSettings:
    keep_days: float  # 0: never delete
    pass_minutes: float = 60.0


@dataclass(frozen=True)
class ModelSettings:
    bundle_dir: Path
    model_card_url: str = ""

    @property
    def model_card(self) -> str:
        """What the FHIR Device names as the model card: the configured URL, else the card's
        place in the bundle (all a reader of the EHR can be told without a URL)."""
        return self.model_card_url or "monai_bundle/docs/README.md in the dermfusion bundle"


@dataclass(frozen=True)
class Settings:
    listener: ListenerSettings
    study: StudySettings
    pacs: PacsSettings | None
    fhir: FhirSettings | None
    demographics: DemographicsSettings
    outbox: OutboxSettings
    saliency: SaliencySettings
    storage: StorageSettings
    model: ModelSettings
    retention: RetentionSettings = RetentionSettings(keep_days=0.0)
    http: HttpSettings | None = None

    @property
    def patient_identifier_system(self) -> str:
        return (
            self.fhir.patient_identifier_system if self.fhir else DEFAULT_PATIENT_IDENTIFIER_SYSTEM
        )


_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "listener": {
        "ae_title": str,
        "port": int,
        "allowed_calling_aes": list,
        "bind_address": str,
        "allow_any_calling_ae": bool,
        "max_associations": int,
        "max_associations_per_peer": int,
        "idle_timeout_seconds": (int, float),
        "max_instance_mb": int,
        "max_pixels": int,
        "tls_certificate": str,
        "tls_private_key": str,
        "tls_ca_certificates": str,
    },
    "study": {"stable_seconds": (int, float), "max_attempts": int},
    "pacs": {"protocol": str, "ae_title": str, "host": str, "port": int, "dicomweb_url": str},
    "fhir": {"base_url": str, "patient_identifier_system": str},
    "demographics": {"on_conflict": str, "fhir_wait_seconds": (int, float)},
    "outbox": {
        "retry_initial_seconds": (int, float),
        "retry_max_seconds": (int, float),
        "max_attempts": int,
    },
    "saliency": {"secondary_capture": bool},
    "storage": {"dir": str, "min_free_mb": int},
    "retention": {"keep_days": (int, float), "pass_minutes": (int, float)},
    "model": {"bundle_dir": str, "model_card_url": str},
    "http": {"bind_address": str, "port": int, "recent_studies": int},
}
_OPTIONAL_SECTIONS = {"pacs", "fhir", "http"}
# Keys that have no default: absent means "not used" (TLS off, no client certificates) or, in
# an optional section, the dataclass default.
_OPTIONAL_KEYS = {
    "listener": {"tls_certificate", "tls_private_key", "tls_ca_certificates"},
    "http": {"bind_address", "recent_studies"},
    "pacs": {"protocol", "dicomweb_url"},  # dimse (the default) needs no URL
}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in override.items():
        if section not in _SCHEMA:
            raise ConfigError(f"unknown section [{section}]")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table")
        out.setdefault(section, {}).update(values)
    return out


def _check(raw: dict[str, Any]) -> None:
    for section, values in raw.items():
        schema = _SCHEMA[section]
        for key, value in values.items():
            if key not in schema:
                raise ConfigError(f"unknown key {section}.{key}")
            # bool is an int in Python: only a key declared bool takes true/false
            if isinstance(value, bool) != (schema[key] is bool) or not isinstance(
                value, schema[key]
            ):
                raise ConfigError(f"{section}.{key} has the wrong type: {value!r}")
        optional = _OPTIONAL_KEYS.get(section, set())
        if section == "pacs" and values.get("protocol", DIMSE) != DIMSE:
            # stow-rs needs no C-STORE peer (another protocol is refused by name in _pacs)
            optional = optional | _DIMSE_PEER_KEYS
        missing = set(schema) - set(values) - optional
        if missing:
            raise ConfigError(f"[{section}] lacks {', '.join(sorted(missing))}")


def _port(key: str, value: int) -> int:
    if not 1 <= value <= 65535:
        raise ConfigError(f"{key} must be a TCP port (1-65535), got {value}")
    return value


def _ae(key: str, value: str) -> str:
    if not _AE_TITLE.match(value) or value.strip() != value or "\\" in value:
        raise ConfigError(
            f"{key} must be 1-16 printable characters without backslash, got {value!r}"
        )
    return value


def _non_negative(key: str, value: float) -> float:
    if value < 0:
        raise ConfigError(f"{key} must be >= 0, got {value}")
    return float(value)


def _non_blank(key: str, value: str) -> str:
    if not value.strip():
        raise ConfigError(f"{key} must not be empty")
    return value


def _positive_count(key: str, value: int) -> int:
    if value < 1:
        raise ConfigError(f"{key} must be >= 1, got {value}")
    return value


def _positive(key: str, value: float) -> float:
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")
    return float(value)


def is_loopback(host: str) -> bool:
    """Only a literal loopback address or ``localhost`` counts: any other name may resolve to
    an interface other hosts can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listener(raw: dict[str, Any], base: Path) -> ListenerSettings:
    """The listener section, refusing a bind other hosts can reach that would let any of them
    in (no calling AE list) unless the site said so explicitly."""
    allowed = tuple(_ae("listener.allowed_calling_aes", str(a)) for a in raw["allowed_calling_aes"])
    bind = raw["bind_address"]
    if not is_loopback(bind) and not allowed and not raw["allow_any_calling_ae"]:
        raise ConfigError(
            f"listener.bind_address {bind!r} is reachable from other hosts and "
            "listener.allowed_calling_aes is empty: list the calling AE titles allowed to "
            "send, or set listener.allow_any_calling_ae = true"
        )
    total = _positive_count("listener.max_associations", raw["max_associations"])
    per_peer = _positive_count(
        "listener.max_associations_per_peer", raw["max_associations_per_peer"]
    )
    if per_peer > total:
        raise ConfigError("listener.max_associations_per_peer must be <= listener.max_associations")
    tls = {
        key: _path(base, raw[key]) if raw.get(key) else None
        for key in ("tls_certificate", "tls_private_key", "tls_ca_certificates")
    }
    if (tls["tls_certificate"] is None) != (tls["tls_private_key"] is None):
        raise ConfigError("listener.tls_certificate and listener.tls_private_key go together")
    if tls["tls_ca_certificates"] is not None and tls["tls_certificate"] is None:
        raise ConfigError(
            "listener.tls_ca_certificates needs listener.tls_certificate and tls_private_key"
        )
    return ListenerSettings(
        ae_title=_ae("listener.ae_title", raw["ae_title"]),
        port=_port("listener.port", raw["port"]),
        allowed_calling_aes=allowed,
        bind_address=bind,
        allow_any_calling_ae=raw["allow_any_calling_ae"],
        max_associations=total,
        max_associations_per_peer=per_peer,
        idle_timeout_seconds=_positive(
            "listener.idle_timeout_seconds", raw["idle_timeout_seconds"]
        ),
        max_instance_mb=_positive_count("listener.max_instance_mb", raw["max_instance_mb"]),
        max_pixels=_positive_count("listener.max_pixels", raw["max_pixels"]),
        **tls,
    )


def _path(base: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base / path


def load_settings(path: str | Path | None = None, *, base_dir: Path | None = None) -> Settings:
    """Defaults from ``configs/dermfusion.toml`` with ``path`` merged over them.

    Relative paths resolve against ``base_dir`` (default: the repository root).
    """
    base = base_dir or REPO_ROOT
    with DEFAULTS_FILE.open("rb") as handle:
        raw = tomllib.load(handle)
    if path is not None:
        try:
            with Path(path).open("rb") as handle:
                raw = _merge(raw, tomllib.load(handle))
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: {error}") from None
        except OSError as error:
            raise ConfigError(f"{path}: {error.strerror}") from None
    _check(raw)
    pacs = raw.get("pacs")
    fhir = raw.get("fhir")
    http = raw.get("http")
    stable = _non_negative("study.stable_seconds", raw["study"]["stable_seconds"])
    demographics = raw["demographics"]
    if demographics["on_conflict"] not in ("dicom", "fhir"):
        raise ConfigError(
            f"demographics.on_conflict must be dicom or fhir, got {demographics['on_conflict']!r}"
        )
    outbox = raw["outbox"]
    initial = _non_negative("outbox.retry_initial_seconds", outbox["retry_initial_seconds"])
    longest = _non_negative("outbox.retry_max_seconds", outbox["retry_max_seconds"])
    if longest < initial:
        raise ConfigError("outbox.retry_max_seconds must be >= outbox.retry_initial_seconds")
    return Settings(
        listener=_listener(raw["listener"], base),
        study=StudySettings(
            stable_seconds=stable,
            max_attempts=_positive_count("study.max_attempts", raw["study"]["max_attempts"]),
        ),
        pacs=None if pacs is None else _pacs(pacs),
        fhir=None
        if fhir is None
        else FhirSettings(
            base_url=fhir["base_url"].rstrip("/"),
            patient_identifier_system=_non_blank(
                "fhir.patient_identifier_system", fhir["patient_identifier_system"]
            ),
        ),
        demographics=DemographicsSettings(
            on_conflict=demographics["on_conflict"],
            fhir_wait_seconds=_non_negative(
                "demographics.fhir_wait_seconds", demographics["fhir_wait_seconds"]
            ),
        ),
        outbox=OutboxSettings(
            retry_initial_seconds=initial,
            retry_max_seconds=longest,
            max_attempts=_positive_count("outbox.max_attempts", outbox["max_attempts"]),
        ),
        saliency=SaliencySettings(secondary_capture=raw["saliency"]["secondary_capture"]),
        storage=StorageSettings(
            dir=_path(base, raw["storage"]["dir"]),
            min_free_mb=int(_non_negative("storage.min_free_mb", raw["storage"]["min_free_mb"])),
        ),
        model=ModelSettings(
            bundle_dir=_path(base, raw["model"]["bundle_dir"]),
            model_card_url=raw["model"]["model_card_url"].strip(),
        ),
        retention=RetentionSettings(
            keep_days=_non_negative("retention.keep_days", raw["retention"]["keep_days"]),
            pass_minutes=_positive("retention.pass_minutes", raw["retention"]["pass_minutes"]),
        ),
        http=None if http is None else _http(http),
    )


def _pacs(raw: dict[str, Any]) -> PacsSettings:
    """C-STORE by default; STOW-RS needs a DICOMweb URL and nothing else. A URL without
    ``protocol = "stow-rs"`` is refused rather than ignored: it says the site meant HTTP."""
    protocol = raw.get("protocol", DIMSE)
    if protocol not in (DIMSE, STOW_RS):
        raise ConfigError(f'pacs.protocol must be "{DIMSE}" or "{STOW_RS}", got {protocol!r}')
    if protocol == DIMSE:
        if "dicomweb_url" in raw:
            raise ConfigError(f'pacs.dicomweb_url is used only with pacs.protocol = "{STOW_RS}"')
        return PacsSettings(
            ae_title=_ae("pacs.ae_title", raw["ae_title"]),
            host=raw["host"],
            port=_port("pacs.port", raw["port"]),
        )
    if "dicomweb_url" not in raw:
        raise ConfigError(
            f'pacs.dicomweb_url is required with pacs.protocol = "{STOW_RS}" '
            '(the DICOMweb root, e.g. "https://pacs.example.org/dicom-web")'
        )
    return PacsSettings(
        ae_title=_ae("pacs.ae_title", raw["ae_title"]) if "ae_title" in raw else "",
        host=raw.get("host", ""),
        port=_port("pacs.port", raw["port"]) if "port" in raw else 0,
        protocol=STOW_RS,
        dicomweb_url=_http_url("pacs.dicomweb_url", raw["dicomweb_url"]),
    )


def _http_url(key: str, value: str) -> str:
    """An http(s) URL with a host, without credentials (HTTP authentication is not supported,
    and a password would end up in logs), query or fragment; trailing slashes dropped."""
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ConfigError(f"{key} is not a URL: {value!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key} must be an http:// or https:// URL with a host, got {value!r}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{key} must not carry a user name or password")
    if parts.query or parts.fragment:
        raise ConfigError(f"{key} must not have a query or fragment, got {value!r}")
    return value.strip().rstrip("/")


def _http(raw: dict[str, Any]) -> HttpSettings:
    """The status endpoint shows study UIDs and results: loopback unless said otherwise."""
    defaults = HttpSettings(port=0)
    return HttpSettings(
        port=_port("http.port", raw["port"]),
        bind_address=_non_blank(
            "http.bind_address", raw.get("bind_address", defaults.bind_address)
        ),
        recent_studies=_positive_count(
            "http.recent_studies", raw.get("recent_studies", defaults.recent_studies)
        ),
    )
