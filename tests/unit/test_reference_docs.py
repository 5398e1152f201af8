"""The generated reference documents match the code: CI fails when one was not regenerated.

Each comparison is against the real thing built here (a listener, an SR, the config schema),
not against the generator's own helpers, so a generator that stopped asking the code would fail.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset

from dicom_io.capture import SaliencyCaptureWriter
from dicom_io.images import read_image
from dicom_io.listener import StorageListener
from dicom_io.sr import MeasurementReportWriter
from plugin import config as config_module
from plugin import reference_docs
from plugin.domain import Demographics, Finding, ModelIdentity, Source, Sourced
from tests.conftest import REPO_ROOT, SAMPLES

DOCS = REPO_ROOT / "docs"
UNIT_FILE = REPO_ROOT / "configs" / "dermfusion.service"


def _section(text: str, heading: str) -> str:
    """The body under ``heading`` (a whole heading line) up to the next heading of its level
    or above."""
    lines = text.splitlines()
    start = lines.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    body = []
    for line in lines[start + 1 :]:
        match = re.match(r"^(#+) ", line)
        if match and len(match.group(1)) <= level:
            break
        body.append(line)
    return "\n".join(body)


class _Sink:
    def accept(self, instance: object) -> None:
        raise AssertionError("nothing is sent")

    def association_closed(self, association_id: str) -> None:
        raise AssertionError("nothing is sent")


# --------------------------------------------------------------------------- staleness


def test_committed_documents_are_what_the_code_generates(capsys: pytest.CaptureFixture) -> None:
    assert reference_docs.main(["--check"]) == 0, capsys.readouterr().err
    for name in reference_docs.DOCUMENTS:
        assert (DOCS / name).is_file()


def test_check_names_a_stale_document_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    reference_docs.write_documents(tmp_path)
    assert reference_docs.main(["--check", "--out", str(tmp_path)]) == 0
    stale = tmp_path / "configuration.md"
    stale.write_text(stale.read_text().replace("DERMFUSION", "DERMFUSI0N"))
    capsys.readouterr()
    assert reference_docs.main(["--check", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "configuration.md" in err
    assert "fhir.md" not in err and "dicom-conformance.md" not in err


def test_documents_are_reproducible_byte_for_byte() -> None:
    first, second = reference_docs.render_documents(), reference_docs.render_documents()
    assert first == second
    fixed = reference_docs.EXAMPLE_ISSUED.strftime("%Y-%m-%dT%H:%M:%S")
    for text in first.values():
        assert not re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d", text.replace(fixed, "")), "a time"
        assert str(REPO_ROOT) not in text


# --------------------------------------------------------------------------- conformance


def test_conformance_lists_exactly_the_sop_classes_and_syntaxes_the_listener_accepts() -> None:
    listener = StorageListener(ae_title="DERMFUSION", port=0, sink=_Sink())
    contexts = {
        str(c.abstract_syntax): {str(ts) for ts in c.transfer_syntax}
        for c in listener.supported_contexts
    }
    text = (DOCS / "dicom-conformance.md").read_text()
    classes = _section(text, "##### 4.2.1.1 SOP classes")
    listed = set(re.findall(r"^\| [^|]+ \| `([\d.]+)` \| No \| Yes \|$", classes, re.M))
    assert listed == set(contexts)
    table = _section(text, "##### 4.2.1.3 Accepted presentation contexts")
    pairs: dict[str, set[str]] = {}
    for sop, ts in re.findall(
        r"^\| [^|]+ \| `([\d.]+)` \| [^|]+ \| `([\d.]+)` \| SCP \|", table, re.M
    ):
        pairs.setdefault(sop, set()).add(ts)
    assert pairs == contexts
    # Dermoscopic Photography is not among pynetdicom's defaults: it must be there explicitly.
    assert "1.2.840.10008.5.1.4.1.1.77.1.7" in listed


def test_conformance_states_every_refusal_and_status_the_listener_can_send() -> None:
    import dicom_io.listener as listener_module
    from dicom_io.status import StoreStatus

    text = (DOCS / "dicom-conformance.md").read_text()
    rejections = _section(text, "##### 4.2.1.2 Association policies")
    for result, source, reason in listener_module._RJ_LABELS:
        assert re.search(rf"\| {result} \([^)]+\) \| {source} \(.+\) \| {reason} \(", rejections)
    statuses = _section(text, "##### 4.2.1.4 C-STORE SCP status codes")
    for status in StoreStatus:
        assert f"| 0x{int(status):04X} | {status.name} |" in statuses


# --------------------------------------------------------------------------- configuration


def test_every_schema_key_is_in_the_configuration_reference() -> None:
    text = (DOCS / "configuration.md").read_text()
    for section, keys in config_module._SCHEMA.items():
        body = _section(text, f"## {section}")
        for key in keys:
            assert re.search(rf"^\| `{key}` \| ", body, re.M), f"{section}.{key} missing"


def test_generation_fails_on_a_schema_key_the_defaults_file_does_not_document(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    schema = {section: dict(keys) for section, keys in config_module._SCHEMA.items()}
    schema["listener"]["undocumented_key"] = str
    monkeypatch.setattr(reference_docs, "_SCHEMA", schema)
    with pytest.raises(reference_docs.DocumentationError, match="listener.undocumented_key"):
        reference_docs.configuration_reference()


def test_defaults_parser_reads_commented_sections_keys_and_continuations() -> None:
    intro, sections = reference_docs.parse_defaults(
        "# Intro.\n\n[a]\n# A note\n# on two lines.\nx = 1   # one # not a comment end\n"
        '                # more\n# opt = "v#1"  # optional\n\n'
        "# [b]   # absent: off\n#        # still off\n# port = 8  # a port\n#         # tail\n"
    )
    assert intro == ["Intro."]
    a, b = sections
    assert (a.name, a.commented, a.notes) == ("a", False, [["A note", "on two lines."]])
    assert [(k.name, k.value, k.commented, k.meaning) for k in a.keys] == [
        ("x", "1", False, ["one # not a comment end", "more"]),
        ("opt", '"v#1"', True, ["optional"]),
    ]
    assert (b.name, b.commented, b.notes) == ("b", True, [["absent: off", "still off"]])
    assert [(k.name, k.meaning) for k in b.keys] == [("port", ["a port", "tail"])]


# --------------------------------------------------------------------------- SR annex


def _codes(ds: Dataset) -> Iterator[tuple[str, str]]:
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                if "CodeValue" in item:
                    yield str(item.CodingSchemeDesignator), str(item.CodeValue)
                yield from _codes(item)


def test_sr_annex_lists_every_code_of_a_freshly_built_sr() -> None:
    """Another SR than the example (not suspected, female, no site): its codes are listed too."""
    image = read_image(SAMPLES / "vlp_img2dcm.dcm")
    model = ModelIdentity("annex test model", "1.0.0", "f" * 64)
    capture = SaliencyCaptureWriter().build(
        source=image.dataset,
        ref=image.ref,
        overlay=np.zeros((8, 8, 3), dtype=np.uint8),
        model=model,
    )
    sr = MeasurementReportWriter().build(
        source=image.dataset,
        ref=image.ref,
        finding=Finding(0.001, 0.5, model, (("age", 0.01),)),
        demographics=Demographics(
            age=Sourced(40.0, Source.FHIR, "Patient.birthDate"),
            sex=Sourced("female", Source.FHIR, "Patient.gender"),
            site=Sourced.missing(),
        ),
        visual_explanation=capture,
    )
    codes = set(_codes(sr))
    assert ("SCT", "428263003") in codes and ("DCM", "F") in codes  # not in the example SR
    assert {("DCM", "111047"), ("99IHE", "Newcode1"), ("DCM", "130401")} <= codes
    annex = _section(
        (DOCS / "dicom-conformance.md").read_text(), "### 8.3 Coded terminology and templates"
    )
    listed = set(re.findall(r"^\| ([^|]+) \| `([^`]+)` \|", annex, re.M))
    assert codes - listed == set()


# --------------------------------------------------------------------------- systemd unit


def test_systemd_unit_runs_serve_as_a_dedicated_hardened_user(tmp_path: Path) -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    unit.read_string(UNIT_FILE.read_text())
    service = unit["Service"]
    assert service["Type"] == "simple"
    assert service["User"] not in ("", "root") and service["Group"] == service["User"]
    program, *args = service["ExecStart"].split()
    assert program.endswith("/bin/dermfusion") and Path(program).is_absolute()
    assert args == ["serve", "--config", "/etc/dermfusion/dermfusion.toml"]
    assert Path(program).parents[2] == Path(service["WorkingDirectory"])  # <dir>/.venv/bin
    assert service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "true"
    assert service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "true"
    assert service["UMask"] == "0077"
    assert service["ReadWritePaths"].split() == ["/var/lib/dermfusion"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    if shutil.which("systemd-analyze"):
        # The program is not installed here: verify a copy that starts an existing one.
        checked = tmp_path / "dermfusion.service"
        checked.write_text(UNIT_FILE.read_text().replace(program, sys.executable))
        result = subprocess.run(
            ["systemd-analyze", "verify", str(checked)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
