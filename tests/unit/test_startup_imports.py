"""A command imports what it needs, not what another command needs (issue 21: start-up).

Each check runs the real ``dermfusion`` entry point (``plugin.cli.main``) in a fresh
interpreter and looks at ``sys.modules`` when it returns: which packages were loaded, never how
long that took (timings live in benchmarks/startup.py). A module-level ``import torch`` (or
MONAI, highdicom, pynetdicom, fhir.resources) put back anywhere on the path of ``--help`` or
of an operator command makes these fail.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, SAMPLES

# The heavy packages, by top-level name ("fhir" is fhir.resources' namespace).
TORCH, MONAI, HIGHDICOM, PYNETDICOM, FHIR, HTTPX, PROMETHEUS = (
    "torch",
    "monai",
    "highdicom",
    "pynetdicom",
    "fhir",
    "httpx",
    "prometheus_client",
)
HEAVY = frozenset({TORCH, MONAI, HIGHDICOM, PYNETDICOM, FHIR, HTTPX, PROMETHEUS})
# Not forbidden to the operator commands (the state database's spool helpers and the log
# redaction use pydicom), but `--help` needs none of them.
DICOM_STACK = frozenset({"pydicom", "numpy", "PIL"})

# Runs `dermfusion ARGS...` the way the console script does, then writes the exit status and
# the loaded modules to the file named by its first argument.
_PROBE = """
import json, sys
out, argv = sys.argv[1], sys.argv[2:]
from plugin.cli import main
try:
    status = main(argv)
except SystemExit as exit:
    status = exit.code
with open(out, "w") as f:
    json.dump({"status": status, "modules": sorted(sys.modules)}, f)
"""

UID = "1.2.826.0.1.3680043.8.498.1"


def _run(tmp_path: Path, *argv: str) -> tuple[int, set[str], str]:
    """Exit status, top-level packages loaded, and stderr of `dermfusion ARGV` in a new process."""
    out = tmp_path / "probe.json"
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(out), *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert out.is_file(), f"the probe did not finish: {done.returncode}\n{done.stderr[-3000:]}"
    result = json.loads(out.read_text())
    return result["status"], {m.split(".")[0] for m in result["modules"]}, done.stderr


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A configuration over an empty state database (as the service leaves it before its first
    study), no PACS and no FHIR server."""
    from plugin.config import load_settings
    from plugin.state import SqliteStateStore

    path = tmp_path / "dermfusion.toml"
    path.write_text(f'[storage]\ndir = "{tmp_path / "var"}"\n')
    SqliteStateStore(load_settings(path).storage.state_database).close()
    return path


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["status", "--help"],
        ["resend", "--help"],
        ["requeue", "--help"],
        ["doctor", "--help"],
        ["serve", "--help"],
        ["predict", "--help"],
        ["infer", "--help"],
        ["train", "--help"],
        ["evaluate", "--help"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_help_loads_no_library_beyond_the_standard_one(tmp_path: Path, argv: list[str]) -> None:
    status, loaded, _ = _run(tmp_path, *argv)
    assert status == 0
    assert sorted(loaded & (HEAVY | DICOM_STACK)) == []


def test_a_bad_command_line_exits_2_without_loading_anything_heavy(tmp_path: Path) -> None:
    status, loaded, err = _run(tmp_path, "no-such-command")
    assert status == 2
    assert "invalid choice" in err
    assert sorted(loaded & (HEAVY | DICOM_STACK)) == []


@pytest.mark.parametrize(
    ("argv", "expected_status"),
    [
        (["status"], 0),
        (["resend", UID], 1),  # no such study
        (["resend", "not-a-uid"], 2),
        (["requeue", "--parked"], 0),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else str(value),
)
def test_operator_commands_load_no_model_dicom_network_or_fhir_library(
    tmp_path: Path, config: Path, argv: list[str], expected_status: int
) -> None:
    status, loaded, err = _run(tmp_path, *argv, "--config", str(config))
    assert status == expected_status, err
    assert sorted(loaded & HEAVY) == []


def test_status_of_a_missing_state_database_exits_2_without_loading_anything_heavy(
    tmp_path: Path,
) -> None:
    config = tmp_path / "dermfusion.toml"
    config.write_text(f'[storage]\ndir = "{tmp_path / "nothing"}"\n')
    status, loaded, err = _run(tmp_path, "status", "--config", str(config))
    assert status == 2
    assert err.startswith("dermfusion status: ")
    assert sorted(loaded & HEAVY) == []


def test_a_configuration_error_exits_2_without_loading_anything_heavy(tmp_path: Path) -> None:
    config = tmp_path / "dermfusion.toml"
    config.write_text("[no_such_section]\n")
    status, loaded, err = _run(tmp_path, "status", "--config", str(config))
    assert status == 2
    assert err.startswith("dermfusion: configuration: ")
    assert sorted(loaded & HEAVY) == []


def test_predict_loads_neither_dicom_nor_fhir_nor_the_service(tmp_path: Path) -> None:
    """One image, a CSV with only image names: the bundle runs (torch, MONAI), nothing else."""
    sample = sorted(SAMPLES.glob("ISIC_*.jpg"))[0]
    images = tmp_path / "images"
    images.mkdir()
    (images / sample.name).write_bytes(sample.read_bytes())
    metadata = tmp_path / "metadata.csv"
    metadata.write_text(f"image_name\n{sample.stem}\n")
    out = tmp_path / "predicted.csv"
    argv = ["predict", "--images", str(images), "--metadata", str(metadata), "--out", str(out)]
    status, loaded, err = _run(tmp_path, *argv)
    assert status == 0, err[-3000:]
    assert out.read_text().splitlines()[0] == "image_name,melanoma_probability,melanoma_suspected"
    assert {TORCH, MONAI} <= loaded
    assert sorted(loaded & {PYNETDICOM, HIGHDICOM, FHIR, HTTPX, PROMETHEUS}) == []


def test_infer_loads_the_report_builders_but_no_network_client(tmp_path: Path) -> None:
    """What `infer` imports before it reads its first file (a missing one: exit 1, one line):
    the SR and FHIR builders, not pynetdicom, the FHIR HTTP client or the metrics endpoint."""
    missing = tmp_path / "missing.dcm"
    status, loaded, err = _run(tmp_path, "infer", str(missing), "--out", str(tmp_path / "out"))
    assert status == 1
    assert f"dermfusion infer: {missing}: " in err
    assert {HIGHDICOM, FHIR} <= loaded
    assert sorted(loaded & {PYNETDICOM, HTTPX, PROMETHEUS}) == []


def _module_level_imports(nodes: list[ast.stmt]) -> list[str]:
    """Modules imported when the module runs: not in functions, not under ``if TYPE_CHECKING``."""
    names: list[str] = []
    for node in nodes:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.If) and ast.unparse(node.test) in {
            "TYPE_CHECKING",
            "typing.TYPE_CHECKING",
        }:
            names += _module_level_imports(node.orelse)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, [])
                if isinstance(children, list):
                    names += _module_level_imports(children)
    return names


def test_cli_imports_only_the_standard_library_at_module_level() -> None:
    """What plugin/cli.py imports when it is imported is the standard library: a command's own
    needs are imported inside that command."""
    tree = ast.parse((REPO_ROOT / "plugin" / "cli.py").read_text())
    imported = _module_level_imports(tree.body)
    assert "argparse" in imported  # the walk sees the module's imports
    outside = sorted(
        name
        for name in imported
        if name.split(".")[0] not in sys.stdlib_module_names and name != "__future__"
    )
    assert outside == []


def test_status_names_the_destinations_as_the_outbox_does() -> None:
    """cli spells the outbox's destination names itself (importing plugin.outbox would load the
    DICOM sender and the FHIR client); they must stay the ones the state database records."""
    from plugin import cli, outbox

    assert (cli._PACS, cli._FHIR) == (outbox.PACS, outbox.FHIR)


@pytest.mark.parametrize(
    ("statement", "absent"),
    [
        ("import dicom_io, fhir_io", {"pydicom", HTTPX, FHIR}),
        ("import dicom_io.spool", {HIGHDICOM, PYNETDICOM}),
        ("from fhir_io import FhirClient, FhirError", {FHIR}),
        ("from fhir_io import report_bundle", {HTTPX}),
    ],
)
def test_the_io_packages_load_a_submodule_when_one_of_its_names_is_used(
    statement: str, absent: set[str]
) -> None:
    code = f"{statement}\nimport sys\nprint(sorted({{m.split('.')[0] for m in sys.modules}}))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    loaded = set(ast.literal_eval(done.stdout.strip().splitlines()[-1]))
    assert sorted(loaded & absent) == []


@pytest.mark.parametrize("package_name", ["dicom_io", "fhir_io"])
def test_the_io_packages_still_export_every_name_they_list(package_name: str) -> None:
    import importlib

    package = importlib.import_module(package_name)
    for name in package.__all__:
        value = getattr(package, name)
        defining = importlib.import_module(package._EXPORTS[name])
        assert value is getattr(defining, name)
        assert name in dir(package)
    for submodule in package._SUBMODULES:
        assert getattr(package, submodule) is importlib.import_module(f"{package_name}.{submodule}")
    with pytest.raises(AttributeError, match="no_such_name"):
        package.no_such_name  # noqa: B018
