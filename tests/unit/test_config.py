from pathlib import Path

import pytest

from plugin.config import DEFAULT_PATIENT_IDENTIFIER_SYSTEM, ConfigError, load_settings


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def test_embedded_defaults_have_no_pacs_and_no_fhir(tmp_path: Path) -> None:
    settings = load_settings(base_dir=tmp_path)
    assert settings.listener.ae_title == "DERMFUSION"
    assert settings.listener.port == 11112
    assert settings.listener.allowed_calling_aes == ()
    assert settings.listener.bind_address == "127.0.0.1"  # loopback unless configured
    assert settings.listener.allow_any_calling_ae is False
    assert (settings.listener.max_associations, settings.listener.max_associations_per_peer) == (
        10,
        4,
    )
    assert settings.listener.idle_timeout_seconds == 15
    assert settings.listener.tls_certificate is None
    assert settings.study.stable_seconds == 2
    assert settings.pacs is None and settings.fhir is None
    assert settings.storage.outbox == tmp_path / "var" / "outbox"
    assert settings.patient_identifier_system == DEFAULT_PATIENT_IDENTIFIER_SYSTEM
    assert settings.saliency.secondary_capture is False
    assert settings.study.max_attempts == 3 and settings.outbox.max_attempts == 10
    assert settings.storage.min_free_mb == 512
    assert (settings.listener.max_instance_mb, settings.listener.max_pixels) == (100, 10**8)
    assert (settings.retention.keep_days, settings.retention.pass_minutes) == (30, 60)


def test_contract_keys_are_read(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
[listener]
ae_title = "DF2"
port = 11113
allowed_calling_aes = ["ORTHANC"]
[study]
stable_seconds = 0.5
[pacs]
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242
[fhir]
base_url = "http://127.0.0.1:8080/fhir/"
patient_identifier_system = "urn:hospital:mrn"
[saliency]
secondary_capture = true
[storage]
dir = "/srv/dermfusion"
min_free_mb = 2048
[retention]
keep_days = 90
""",
    )
    settings = load_settings(path, base_dir=tmp_path)
    assert settings.listener.allowed_calling_aes == ("ORTHANC",)
    assert settings.pacs is not None and settings.pacs.port == 4242
    assert settings.fhir is not None and settings.fhir.base_url == "http://127.0.0.1:8080/fhir"
    assert settings.patient_identifier_system == "urn:hospital:mrn"
    assert settings.storage.dir == Path("/srv/dermfusion")
    assert settings.saliency.secondary_capture is True
    assert settings.storage.min_free_mb == 2048 and settings.retention.keep_days == 90


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[listener]\nport = 70000\n", "listener.port must be a TCP port"),
        ('[listener]\nae_title = "WAY_TOO_LONG_AE_TITLE"\n', "listener.ae_title"),
        ("[listener]\nprot = 1\n", "unknown key listener.prot"),
        ('[pacs]\nhost = "x"\n', "[pacs] lacks ae_title, port"),
        ('[study]\nstable_seconds = "2"\n', "study.stable_seconds has the wrong type"),
        ("[nope]\n", "unknown section [nope]"),
        ("[saliency]\nsecondary_capture = 1\n", "saliency.secondary_capture has the wrong type"),
        ("[listener]\nport = true\n", "listener.port has the wrong type"),
        ("[study]\nmax_attempts = 0\n", "study.max_attempts must be >= 1"),
        ("[outbox]\nmax_attempts = 2.5\n", "outbox.max_attempts has the wrong type"),
        ("[listener\n", "site.toml"),
        ('[fhir]\nbase_url = "http://x/fhir"\n', "[fhir] lacks patient_identifier_system"),
        (
            '[fhir]\nbase_url = "http://x/fhir"\npatient_identifier_system = " "\n',
            "fhir.patient_identifier_system must not be empty",
        ),
        ("[listener]\nmax_associations = 0\n", "listener.max_associations must be >= 1"),
        (
            "[listener]\nmax_associations = 2\nmax_associations_per_peer = 3\n",
            "listener.max_associations_per_peer must be <= listener.max_associations",
        ),
        ("[listener]\nidle_timeout_seconds = 0\n", "listener.idle_timeout_seconds must be > 0"),
        ("[storage]\nmin_free_mb = -1\n", "storage.min_free_mb must be >= 0"),
        ("[listener]\nmax_instance_mb = 0\n", "listener.max_instance_mb must be >= 1"),
        ("[listener]\nmax_pixels = 1.5\n", "listener.max_pixels has the wrong type"),
        ("[storage]\nmin_free_mb = 0.5\n", "storage.min_free_mb has the wrong type"),
        ("[retention]\nkeep_days = -1\n", "retention.keep_days must be >= 0"),
        ("[retention]\npass_minutes = 0\n", "retention.pass_minutes must be > 0"),
        ("[listener]\nallow_any_calling_ae = 1\n", "listener.allow_any_calling_ae has the wrong"),
        ('[listener]\ntls_certificate = "c.pem"\n', "listener.tls_certificate and listener.tls_pr"),
        (
            '[listener]\ntls_ca_certificates = "ca.pem"\n',
            "listener.tls_ca_certificates needs listener.tls_certificate",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_settings(_write(tmp_path, text), base_dir=tmp_path)


def test_cli_takes_config_after_the_subcommand_and_names_an_unreadable_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from plugin.cli import main

    assert main(["serve", "--config", str(tmp_path / "absent.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"dermfusion: configuration: {tmp_path / 'absent.toml'}: No such file or directory"
    )
    bad = _write(tmp_path, "[listener]\nport = 0\n")
    assert main(["--config", str(bad), "serve"]) == 2
    assert "listener.port must be a TCP port" in capsys.readouterr().err


UNSAFE_BIND = (
    "listener.bind_address '0.0.0.0' is reachable from other hosts and "
    "listener.allowed_calling_aes is empty: list the calling AE titles allowed to send, "
    "or set listener.allow_any_calling_ae = true"
)


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "", "192.0.2.7", "pacs-gw.example.org"])
def test_a_bind_other_hosts_reach_needs_a_calling_ae_list(tmp_path: Path, address: str) -> None:
    path = _write(tmp_path, f'[listener]\nbind_address = "{address}"\n')
    with pytest.raises(ConfigError, match="is reachable from other hosts"):
        load_settings(path, base_dir=tmp_path)


@pytest.mark.parametrize(
    "extra", ['allowed_calling_aes = ["ORTHANC"]', "allow_any_calling_ae = true"]
)
def test_a_bind_other_hosts_reach_is_allowed_with_a_list_or_explicitly(
    tmp_path: Path, extra: str
) -> None:
    path = _write(tmp_path, f'[listener]\nbind_address = "0.0.0.0"\n{extra}\n')
    assert load_settings(path, base_dir=tmp_path).listener.bind_address == "0.0.0.0"


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_binds_take_any_calling_ae(tmp_path: Path, address: str) -> None:
    path = _write(tmp_path, f'[listener]\nbind_address = "{address}"\n')
    assert load_settings(path, base_dir=tmp_path).listener.allowed_calling_aes == ()


def test_serve_refuses_an_unsafe_bind_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from plugin.cli import main

    path = _write(tmp_path, '[listener]\nbind_address = "0.0.0.0"\n')
    assert main(["serve", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"dermfusion: configuration: {UNSAFE_BIND}\n"


def test_tls_paths_resolve_against_the_base(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '[listener]\ntls_certificate = "tls/c.pem"\ntls_private_key = "/k.pem"\n'
        'tls_ca_certificates = "ca.pem"\n',
    )
    listener = load_settings(path, base_dir=tmp_path).listener
    assert listener.tls_certificate == tmp_path / "tls" / "c.pem"
    assert listener.tls_private_key == Path("/k.pem")
    assert listener.tls_ca_certificates == tmp_path / "ca.pem"
