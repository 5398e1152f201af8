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
    assert settings.study.stable_seconds == 2
    assert settings.pacs is None and settings.fhir is None
    assert settings.storage.outbox == tmp_path / "var" / "outbox"
    assert settings.patient_identifier_system == DEFAULT_PATIENT_IDENTIFIER_SYSTEM
    assert settings.saliency.secondary_capture is False
    assert settings.study.max_attempts == 3 and settings.outbox.max_attempts == 10


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
""",
    )
    settings = load_settings(path, base_dir=tmp_path)
    assert settings.listener.allowed_calling_aes == ("ORTHANC",)
    assert settings.pacs is not None and settings.pacs.port == 4242
    assert settings.fhir is not None and settings.fhir.base_url == "http://127.0.0.1:8080/fhir"
    assert settings.patient_identifier_system == "urn:hospital:mrn"
    assert settings.storage.dir == Path("/srv/dermfusion")
    assert settings.saliency.secondary_capture is True


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
