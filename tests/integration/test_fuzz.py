"""Hostile and broken input through a real association (issue 19, item 4).

A few hundred mutated instances (tests/integration/fuzzing.py), each its own study, go to a
running `dermfusion serve` over pynetdicom. The listener must answer each with a clear status and
stay up; every instance it accepted must end (scored, or failed or parked with a reason) within
a bounded time; nothing may be logged with a traceback; memory stays bounded. The full count
runs in benchmarks/fuzz_listener.py.
"""

from __future__ import annotations

import sqlite3
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
from tests.integration.fuzzing import fuzz_cases

pytestmark = pytest.mark.integration
CASES = 200
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
