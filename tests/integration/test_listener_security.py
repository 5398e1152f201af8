"""`dermfusion serve` as a process, probed from outside: the unsafe-bind refusal, a calling AE
not on the list (DCMTK echoscu), and owner-only storage after a real study went through."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import SAMPLES, dermfusion_command, require_tool
from tests.integration.dermfusion_process import free_port, running_dermfusion, write_config

pytestmark = pytest.mark.integration


def test_serve_refuses_a_bind_other_hosts_reach_without_a_calling_ae_list(
    tmp_path: Path,
) -> None:
    config = write_config(
        tmp_path / "dermfusion.toml",
        port=free_port(),
        storage=tmp_path / "var",
        bind_address="0.0.0.0",
    )
    run = subprocess.run(
        [*dermfusion_command(), "--config", str(config), "serve"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "dermfusion: configuration: listener.bind_address '0.0.0.0' is reachable from other "
        "hosts and listener.allowed_calling_aes is empty: list the calling AE titles allowed "
        "to send, or set listener.allow_any_calling_ae = true"
    ]
    assert not (tmp_path / "var").exists()  # refused before anything was created


def test_unknown_calling_ae_is_refused_and_storage_is_owner_only(tmp_path: Path) -> None:
    # ECHOSCU: the readiness probe of DermfusionProcess.start.
    allowed = 'allowed_calling_aes = ["ECHOSCU", "STORESCU"]'
    with running_dermfusion(tmp_path / "df", listener=[allowed]) as service:
        refused = subprocess.run(
            [require_tool("echoscu"), "-aet", "WRONG", "-aec", service.ae_title]
            + ["127.0.0.1", str(service.port)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert refused.returncode != 0
        assert "Calling AE Title Not Recognized" in refused.stderr
        log = service.wait_for_log("association refused: calling AE 'WRONG' from 127.0.0.1:")
        assert "calling AE not in listener.allowed_calling_aes" in log

        wrong_called = subprocess.run(
            [require_tool("echoscu"), "-aec", "NOT_DERMFUSION", "127.0.0.1", str(service.port)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert wrong_called.returncode != 0
        service.wait_for_log("called AE 'NOT_DERMFUSION' is not ours")

        sent = subprocess.run(
            [require_tool("storescu"), "-R", "-xy", "-aet", "STORESCU", "-aec", service.ae_title]
            + ["127.0.0.1", str(service.port), str(SAMPLES / "dms_jpeg_baseline.dcm")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert sent.returncode == 0, sent.stderr
        service.wait_for_log(": scored 1 image(s)", timeout=120)

        storage = service.workdir / "var"
        folders = [storage, *(p for p in storage.rglob("*") if p.is_dir())]
        files = [p for p in storage.rglob("*") if p.is_file()]
        assert {p.name for p in files} >= {"state.sqlite3", "state.sqlite3-wal"}
        assert any(p.suffix == ".json" for p in files)  # the outbox's Bundle
        assert any(p.parent.parent.name == "spool" for p in files)
        for path in folders:
            assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
