"""Hostile and broken input through a real association (issue 19, item 4).

A few hundred mutated instances (tests/integration/fuzzing.py), each its own study, go to a
running `dermfusion serve` over pynetdicom. The listener must answer each with a clear status and
stay up; every instance it accepted must end (scored, or failed or parked with a reason) within
a bounded time; nothing may be logged with a traceback; memory stays bounded. The full count
runs in benchmarks/fuzz_listener.py.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import subprocess
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest
from pydicom.uid import JPEGBaseline8Bit
from pynetdicom import AE

from dicom_io.images import SopClass
from tests.conftest import SAMPLES
from tests.integration.dermfusion_process import DermfusionProcess, running_dermfusion
from tests.integration.fuzzing import StreamCase, fuzz_cases, stream_cases

pytestmark = pytest.mark.integration
CASES = 200
STREAM_CASES = 100
# What a broken instance may be answered with: stored, or refused with a reason (out of
# resources, wrong SOP class, cannot understand). 0x0110 would be our own failure.
CLEAR_STATUSES = {0x0000, 0xA700, 0xA900, 0xC000, 0xB000, 0xB006, 0xB007}


def send_cases(service: DermfusionProcess, count: int, seed: int) -> tuple[Counter[int], int]:
    """Send ``count`` cases on associations of 50; statuses counted, and how many could not
    be sent at all (pynetdicom refused to encode them)."""
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(SopClass.DERMOSCOPIC_PHOTOGRAPHY.value, [JPEGBaseline8Bit])
    ae.dimse_timeout = ae.network_timeout = 60
    statuses: Counter[int] = Counter()
    unsent = 0
    assoc = None
    for index, case in enumerate(fuzz_cases(SAMPLES, count, seed)):
        if assoc is None or not assoc.is_established or index % 50 == 0:
            if assoc is not None and assoc.is_established:
                assoc.release()
            assoc = ae.associate("127.0.0.1", service.port, ae_title=service.ae_title)
            assert assoc.is_established, f"association refused before case {case.name}"
        try:
            reply = assoc.send_c_store(case.dataset)
        except (ValueError, TypeError, AttributeError, OverflowError, KeyError):
            unsent += 1
            continue
        assert "Status" in reply, f"no status for case {case.name}"
        statuses[int(reply.Status)] += 1
    if assoc is not None and assoc.is_established:
        assoc.release()
    return statuses, unsent


def unfinished(storage: Path) -> int:
    """Accepted instances not yet scored, failed, or in a parked study."""
    with closing(sqlite3.connect(storage / "state.sqlite3")) as db:
        return int(
            db.execute(
                """SELECT COUNT(*) FROM instances i
                   LEFT JOIN studies s ON s.study_instance_uid = i.study_instance_uid
                   WHERE i.state = 'received' AND s.parked_at IS NULL"""
            ).fetchone()[0]
        )


def outcomes(storage: Path) -> dict[str, int]:
    with closing(sqlite3.connect(storage / "state.sqlite3")) as db:
        rows = db.execute(
            """SELECT CASE WHEN s.parked_at IS NOT NULL THEN 'parked' ELSE i.state END,
                      COUNT(*)
               FROM instances i
               LEFT JOIN studies s ON s.study_instance_uid = i.study_instance_uid
               GROUP BY 1"""
        ).fetchall()
    return {state: int(n) for state, n in rows}


def resident_mib(service: DermfusionProcess) -> float:
    assert service.process is not None
    for line in Path(f"/proc/{service.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_mutated_instances_get_clear_statuses_and_every_accepted_one_ends(
    tmp_path: Path,
) -> None:
    with running_dermfusion(tmp_path / "svc", stable_seconds=0.2) as service:
        storage = service.workdir / "var"
        statuses, unsent = send_cases(service, CASES, seed=20261130)
        assert service.process is not None and service.process.poll() is None
        assert set(statuses) <= CLEAR_STATUSES, statuses
        accepted = sum(n for s, n in statuses.items() if s == 0 or 0xB000 <= s < 0xC000)
        assert accepted > CASES // 4  # most mutations leave an instance worth trying
        assert sum(statuses.values()) + unsent == CASES and unsent < CASES // 10
        deadline = time.monotonic() + 240
        while unfinished(storage) and time.monotonic() < deadline:
            time.sleep(1)
        assert unfinished(storage) == 0, outcomes(storage)
        ended = outcomes(storage)
        assert sum(ended.values()) == accepted
        assert ended.get("reported", 0) > 0
        log = service.log_text()
        assert "Traceback" not in log and "thread died" not in log
        assert resident_mib(service) < 3000


def send_stream(service: DermfusionProcess, case: StreamCase) -> None:
    """Write the case's bytes, then hang up without a release (as a crashed peer would)."""
    if not case.after_association:
        with socket.create_connection(("127.0.0.1", service.port), timeout=5) as sock:
            sock.sendall(case.payload)
        return
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", service.port, ae_title=service.ae_title)
    assert assoc.is_established, f"association refused before case {case.name}"
    raw = assoc.dul.socket.socket
    assert raw is not None
    with contextlib.suppress(OSError):  # the listener already hung up: also an answer
        raw.sendall(case.payload)
    assoc.abort()


def test_garbage_pdus_and_truncated_streams_leave_the_listener_serving(tmp_path: Path) -> None:
    """Below DIMSE: random bytes, lying PDU lengths (up to 4 GiB claimed), truncated requests
    and PDUs of the wrong type inside an association. The listener stays up and bounded, logs
    no traceback, and the next good study is scored."""
    with running_dermfusion(tmp_path / "svc", stable_seconds=0.2) as service:
        for case in stream_cases(STREAM_CASES, seed=20261130):
            send_stream(service, case)
            assert service.process is not None and service.process.poll() is None, case.name
        echo = subprocess.run(
            ["echoscu", "-aec", service.ae_title, "127.0.0.1", str(service.port)],
            capture_output=True,
        )
        assert echo.returncode == 0
        good = subprocess.run(
            [
                "storescu",
                "-R",
                "-xy",
                "-aec",
                service.ae_title,
                "127.0.0.1",
                str(service.port),
                str(SAMPLES / "dms_jpeg_baseline.dcm"),
            ],
            capture_output=True,
        )
        assert good.returncode == 0, good.stderr
        storage = service.workdir / "var"
        deadline = time.monotonic() + 60
        while unfinished(storage) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert outcomes(storage) == {"reported": 1}
        log = service.log_text()
        assert "Traceback" not in log and "thread died" not in log
        assert resident_mib(service) < 3000
