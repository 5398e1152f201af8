"""One typed settings object, loaded from TOML over the documented defaults.

The defaults and the meaning of every key live in ``configs/dermfusion.toml``; this module only
types and checks them, so bad values are refused with the key that holds them.
"""

from __future__ import annotations

import ipaddress
import os
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
_PACS_TLS_KEYS = {"tls_ca_certificates", "tls_certificate", "tls_private_key", "tls_check_hostname"}
_FHIR_BEARER_KEYS = {"bearer_token_file", "bearer_token_env"}
_FHIR_CLIENT_CREDENTIALS_KEYS = {
    "token_url", "client_id", "client_secret_file", "client_secret_env", "scope"
}  # fmt: skip
_FHIR_AUTH_KEYS = _FHIR_BEARER_KEYS | _FHIR_CLIENT_CREDENTIALS_KEYS


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
    # DICOM TLS for our C-STORE (dimse only): on with a CA; our certificate only if required.
    tls_ca_certificates: Path | None = None
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    tls_check_hostname: bool = True


@dataclass(frozen=True)
class SecretSource:
    """Where a token or client secret is read from: a file or an environment variable (never
    the TOML itself, which more people can read than the secret should reach)."""

    file: Path | None = None
    env: str | None = None


@dataclass(frozen=True)
class ClientCredentialsSettings:
    """OAuth2 client credentials grant; the secret, like a token, comes from a file or env."""

    token_url: str
    client_id: str
    client_secret: SecretSource
    scope: str = ""


@dataclass(frozen=True)
class FhirSettings:
    base_url: str
    patient_identifier_system: str
    ca_certificates: Path | None = None  # PEM for https; None: the system CA store
    bearer_token: SecretSource | None = None
    client_credentials: ClientCredentialsSettings | None = None


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
    def cache(self) -> Path:
        """Derived files that can be made again (the image branch's ONNX export)."""
        return self.dir / "cache"

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
    threads: int = 0  # torch threads for scoring; 0: half the cores (plugin.model.use_threads)
    runtime: str = "onnxruntime"  # where the image branch runs: "onnxruntime" or "torch"

    @property
    def model_card(self) -> str:
        """What the FHIR Device names as the model card: the configured URL, else the card's
        place in the bundle (all a reader of the EHR can be told without a URL)."""
        return self.model_card_url or "monai_bundle/docs/README.md in the dermfusion bundle"


@dataclass(frozen=True)
class SyslogSettings:
    """The audit collector: RFC 5424 over TCP (octet counting), with TLS per RFC 5425."""

    host: str
    port: int
    tls: bool = False
    ca_certificates: Path | None = None  # PEM; None: the system CA store (with tls)


@dataclass(frozen=True)
class AuditSettings:
    """The ATNA audit trail (plugin.audit); ``file`` is relative to ``[storage] dir``."""

    enabled: bool = True
    file: Path = Path("audit/audit.log")
    source_id: str = "DERMFUSION"
    syslog: SyslogSettings | None = None  # None: the file only


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
    audit: AuditSettings = AuditSettings()

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
    "pacs": {
        "protocol": str,
        "ae_title": str,
        "host": str,
        "port": int,
        "dicomweb_url": str,
        "tls_ca_certificates": str,
        "tls_certificate": str,
        "tls_private_key": str,
        "tls_check_hostname": bool,
    },
    "fhir": {
        "base_url": str,
        "patient_identifier_system": str,
        "ca_certificates": str,
        "bearer_token_file": str,
        "bearer_token_env": str,
        "token_url": str,
        "client_id": str,
        "client_secret_file": str,
        "client_secret_env": str,
        "scope": str,
    },
    "demographics": {"on_conflict": str, "fhir_wait_seconds": (int, float)},
    "outbox": {
        "retry_initial_seconds": (int, float),
        "retry_max_seconds": (int, float),
        "max_attempts": int,
    },
    "saliency": {"secondary_capture": bool},
    "storage": {"dir": str, "min_free_mb": int},
    "retention": {"keep_days": (int, float), "pass_minutes": (int, float)},
    "model": {"bundle_dir": str, "model_card_url": str, "threads": int, "runtime": str},
    "http": {"bind_address": str, "port": int, "recent_studies": int},
    "audit": {
        "enabled": bool,
        "file": str,
        "source_id": str,
        "syslog_host": str,
        "syslog_port": int,
        "syslog_tls": bool,
        "syslog_ca_certificates": str,
    },
}
_OPTIONAL_SECTIONS = {"pacs", "fhir", "http"}
# Keys that have no default: absent means "not used" (TLS off, no client certificates) or, in
# an optional section, the dataclass default.
_OPTIONAL_KEYS = {
    "listener": {"tls_certificate", "tls_private_key", "tls_ca_certificates"},
    "http": {"bind_address", "recent_studies"},
    # dimse (the default) needs no URL; TLS is off without a CA
    "pacs": {"protocol", "dicomweb_url", *_PACS_TLS_KEYS},
    "fhir": {"ca_certificates", *_FHIR_AUTH_KEYS},  # no auth: an open (test) server
    "audit": {"syslog_host", "syslog_port", "syslog_tls", "syslog_ca_certificates"},
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


def _choice(key: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        listed = " or ".join(f'"{c}"' for c in choices)
        raise ConfigError(f"{key} must be {listed}, got {value!r}")
    return value


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
        pacs=None if pacs is None else _pacs(pacs, base),
        fhir=None if fhir is None else _fhir(fhir, base),
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
            threads=int(_non_negative("model.threads", raw["model"]["threads"])),
            runtime=_choice("model.runtime", raw["model"]["runtime"], ("onnxruntime", "torch")),
        ),
        retention=RetentionSettings(
            keep_days=_non_negative("retention.keep_days", raw["retention"]["keep_days"]),
            pass_minutes=_positive("retention.pass_minutes", raw["retention"]["pass_minutes"]),
        ),
        http=None if http is None else _http(http),
        audit=_audit(raw["audit"], base),
    )


def _pacs(raw: dict[str, Any], base: Path) -> PacsSettings:
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
            **_pacs_tls(raw, base),
        )
    if _PACS_TLS_KEYS & set(raw):
        raise ConfigError(
            f"pacs.{sorted(_PACS_TLS_KEYS & set(raw))[0]} is DICOM TLS for protocol "
            f'"{DIMSE}"; STOW-RS over https checks the server against the system CA store'
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


def _pacs_tls(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """The C-STORE's TLS fields: a CA turns TLS on; a client certificate needs its key and the
    CA (a certificate over plain TCP would be a configuration mistake, not a choice)."""
    ca, certificate, key = (
        raw.get(k) for k in ("tls_ca_certificates", "tls_certificate", "tls_private_key")
    )
    if (certificate is None) != (key is None):
        raise ConfigError("pacs.tls_certificate and pacs.tls_private_key go together")
    if ca is None and (certificate is not None or "tls_check_hostname" in raw):
        raise ConfigError(
            "pacs.tls_certificate, tls_private_key and tls_check_hostname need "
            "pacs.tls_ca_certificates (the CA that signed the PACS's certificate)"
        )
    return {
        "tls_ca_certificates": None if ca is None else _path(base, ca),
        "tls_certificate": None if certificate is None else _path(base, certificate),
        "tls_private_key": None if key is None else _path(base, key),
        "tls_check_hostname": raw.get("tls_check_hostname", True),
    }


def _fhir(raw: dict[str, Any], base: Path) -> FhirSettings:
    """The EHR's endpoint and how we authenticate to it: nothing, a static bearer token, or
    OAuth2 client credentials (not both). Secrets are checked readable here, so a missing file
    or unset variable stops the start, not the first report; they are not kept in settings."""
    ca = raw.get("ca_certificates")
    bearer = [k for k in sorted(_FHIR_BEARER_KEYS) if k in raw]
    credentials = [k for k in sorted(_FHIR_CLIENT_CREDENTIALS_KEYS) if k in raw]
    if bearer and credentials:
        raise ConfigError(
            f"fhir.{bearer[0]} and fhir.{credentials[0]}: use a bearer token or OAuth2 client "
            "credentials, not both"
        )
    if len(bearer) > 1:
        raise ConfigError("fhir.bearer_token_file and fhir.bearer_token_env: use one")
    client_credentials = None
    if credentials:
        if "token_url" not in raw:
            raise ConfigError(f"fhir.{credentials[0]} needs fhir.token_url (the OAuth2 endpoint)")
        if "client_id" not in raw:
            raise ConfigError("fhir.token_url needs fhir.client_id")
        client_credentials = ClientCredentialsSettings(
            token_url=_http_url("fhir.token_url", raw["token_url"]),
            client_id=_non_blank("fhir.client_id", raw["client_id"]),
            client_secret=_secret_source(raw, "client_secret", base),
            scope=raw.get("scope", "").strip(),
        )
    return FhirSettings(
        base_url=raw["base_url"].rstrip("/"),
        patient_identifier_system=_non_blank(
            "fhir.patient_identifier_system", raw["patient_identifier_system"]
        ),
        ca_certificates=None if ca is None else _readable(base, "fhir.ca_certificates", ca),
        bearer_token=_secret_source(raw, "bearer_token", base) if bearer else None,
        client_credentials=client_credentials,
    )


def _secret_source(raw: dict[str, Any], name: str, base: Path) -> SecretSource:
    """``<name>_file`` or ``<name>_env`` (exactly one), checked to hold a value now."""
    file, env = raw.get(f"{name}_file"), raw.get(f"{name}_env")
    if (file is None) == (env is None):
        raise ConfigError(f"fhir.{name}_file or fhir.{name}_env: set exactly one")
    if env is not None:
        if not read_secret(SecretSource(env=env)):
            raise ConfigError(f"fhir.{name}_env: environment variable {env} is unset or empty")
        return SecretSource(env=env)
    path = _readable(base, f"fhir.{name}_file", file)
    if not read_secret(SecretSource(file=path)):
        raise ConfigError(f"fhir.{name}_file: {path} is empty")
    return SecretSource(file=path)


def _readable(base: Path, key: str, value: str) -> Path:
    path = _path(base, value)
    try:
        with path.open("rb"):
            pass
    except OSError as error:
        raise ConfigError(f"{key}: {path} cannot be read ({error.strerror})") from None
    return path


def read_secret(source: SecretSource) -> str:
    """The secret's current value (stripped; empty if unset). Read on use, so a rotated file
    is picked up without a restart."""
    if source.env is not None:
        return os.environ.get(source.env, "").strip()
    assert source.file is not None
    return source.file.read_text(encoding="utf-8").strip()


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


def _audit(raw: dict[str, Any], base: Path) -> AuditSettings:
    """The audit trail; syslog forwarding only with ``syslog_host`` (and then its port)."""
    syslog_keys = {"syslog_port", "syslog_tls", "syslog_ca_certificates"} & set(raw)
    syslog = None
    if "syslog_host" in raw:
        if "syslog_port" not in raw:
            raise ConfigError("audit.syslog_host needs audit.syslog_port")
        tls = raw.get("syslog_tls", False)
        ca = raw.get("syslog_ca_certificates")
        if ca and not tls:
            raise ConfigError("audit.syslog_ca_certificates needs audit.syslog_tls = true")
        syslog = SyslogSettings(
            host=_non_blank("audit.syslog_host", raw["syslog_host"]),
            port=_port("audit.syslog_port", raw["syslog_port"]),
            tls=tls,
            ca_certificates=_path(base, ca) if ca else None,
        )
    elif syslog_keys:
        raise ConfigError(f"audit.{sorted(syslog_keys)[0]} needs audit.syslog_host")
    return AuditSettings(
        enabled=raw["enabled"],
        file=Path(_non_blank("audit.file", raw["file"])),
        source_id=_non_blank("audit.source_id", raw["source_id"]),
        syslog=syslog,
    )


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
