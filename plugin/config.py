"""One typed settings object, loaded from TOML over the documented defaults.

The defaults and the meaning of every key live in ``configs/dermfusion.toml``; this module only
types and checks them, so bad values are refused with the key that holds them.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULTS_FILE = REPO_ROOT / "configs" / "dermfusion.toml"
DEFAULT_PATIENT_IDENTIFIER_SYSTEM = "urn:dermfusion:patient-id"
_AE_TITLE = re.compile(r"^[ -~]{1,16}$")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class ListenerSettings:
    ae_title: str
    port: int
    allowed_calling_aes: tuple[str, ...]
    bind_address: str


@dataclass(frozen=True)
class StudySettings:
    stable_seconds: float
    max_attempts: int


@dataclass(frozen=True)
class PacsSettings:
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class FhirSettings:
    base_url: str
    patient_identifier_system: str


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

    @property
    def outbox(self) -> Path:
        return self.dir / "outbox"

    @property
    def state_database(self) -> Path:
        """The one SQLite file of plugin.state: the service and the operator commands share it."""
        return self.dir / "state.sqlite3"


@dataclass(frozen=True)
class ModelSettings:
    bundle_dir: Path


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

    @property
    def patient_identifier_system(self) -> str:
        return (
            self.fhir.patient_identifier_system if self.fhir else DEFAULT_PATIENT_IDENTIFIER_SYSTEM
        )


_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "listener": {"ae_title": str, "port": int, "allowed_calling_aes": list, "bind_address": str},
    "study": {"stable_seconds": (int, float), "max_attempts": int},
    "pacs": {"ae_title": str, "host": str, "port": int},
    "fhir": {"base_url": str, "patient_identifier_system": str},
    "demographics": {"on_conflict": str, "fhir_wait_seconds": (int, float)},
    "outbox": {
        "retry_initial_seconds": (int, float),
        "retry_max_seconds": (int, float),
        "max_attempts": int,
    },
    "saliency": {"secondary_capture": bool},
    "storage": {"dir": str},
    "model": {"bundle_dir": str},
}
_OPTIONAL_SECTIONS = {"pacs", "fhir"}


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
        missing = set(schema) - set(values)
        if section == "fhir":
            missing -= {"patient_identifier_system"}
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


def _positive_count(key: str, value: int) -> int:
    if value < 1:
        raise ConfigError(f"{key} must be >= 1, got {value}")
    return value


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
    listener = raw["listener"]
    pacs = raw.get("pacs")
    fhir = raw.get("fhir")
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
        listener=ListenerSettings(
            ae_title=_ae("listener.ae_title", listener["ae_title"]),
            port=_port("listener.port", listener["port"]),
            allowed_calling_aes=tuple(
                _ae("listener.allowed_calling_aes", str(a)) for a in listener["allowed_calling_aes"]
            ),
            bind_address=listener["bind_address"],
        ),
        study=StudySettings(
            stable_seconds=stable,
            max_attempts=_positive_count("study.max_attempts", raw["study"]["max_attempts"]),
        ),
        pacs=None
        if pacs is None
        else PacsSettings(
            ae_title=_ae("pacs.ae_title", pacs["ae_title"]),
            host=pacs["host"],
            port=_port("pacs.port", pacs["port"]),
        ),
        fhir=None
        if fhir is None
        else FhirSettings(
            base_url=fhir["base_url"].rstrip("/"),
            patient_identifier_system=fhir.get(
                "patient_identifier_system", DEFAULT_PATIENT_IDENTIFIER_SYSTEM
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
        storage=StorageSettings(dir=_path(base, raw["storage"]["dir"])),
        model=ModelSettings(bundle_dir=_path(base, raw["model"]["bundle_dir"])),
    )
