"""Reliability under outages, against the real peers (small counts here; the full counts are
``benchmarks/outages.py``): SIGKILLs at random moments during a burst, the FHIR server down,
the PACS and the FHIR server down together. Nothing acknowledged is lost, nothing duplicated."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.integration.dermfusion_process import free_port, running_dermfusion
from tests.integration.fhir_server import running_fhir_server
from tests.integration.orthanc_server import OrthancServer
from tests.integration.outages import peers_down, sigkill_burst, sr_counts

pytestmark = pytest.mark.integration
FHIR_VENV = REPO_ROOT / ".venv-fhir"


class RestartableFhir:
    """A FHIR server that can be stopped and brought back on the same port with its data."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.port = workdir, free_port()
        self._stack = contextlib.ExitStack()
        self.base_url = self.start()

    def start(self) -> str:
        return self._stack.enter_context(running_fhir_server(FHIR_VENV, self.workdir, self.port))

    def stop(self) -> None:
        self._stack.close()
        self._stack = contextlib.ExitStack()

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        self.stop()
        try:
            yield
        finally:
            self.start()


@pytest.fixture
def fhir(tmp_path: Path) -> Iterator[RestartableFhir]:
    server = RestartableFhir(tmp_path / "fhir")
    try:
        yield server
    finally:
        server.stop()


def test_sigkill_at_random_moments_during_a_burst_loses_and_duplicates_nothing(
    orthanc: OrthancServer, fhir: RestartableFhir, tmp_path: Path
) -> None:
    with running_dermfusion(
        tmp_path / "svc", pacs_port=orthanc.dicom_port, fhir_url=fhir.base_url
    ) as service:
        outcome = sigkill_burst(
            service,
            orthanc,
            fhir.base_url,
            tmp_path / "studies",
            studies=8,
            kills=3,
            seed=19,
            settle_timeout=180,
        )
    assert outcome.kills == 3
    assert (outcome.lost, outcome.duplicated) == (0, 0), outcome


def test_fhir_down_then_back_delivers_every_report_once_and_the_pacs_is_not_held_up(
    orthanc: OrthancServer, fhir: RestartableFhir, tmp_path: Path
) -> None:
    with running_dermfusion(
        tmp_path / "svc", pacs_port=orthanc.dicom_port, fhir_url=fhir.base_url
    ) as service:
        srs_while_fhir_down: list[dict[str, int]] = []
        outcome = peers_down(
            service,
            orthanc,
            fhir.base_url,
            fhir.down,
            tmp_path / "studies",
            studies=3,
            outage_seconds=20,
            pacs=False,
            fhir=True,
            settle_timeout=120,
            before_return=lambda uids: srs_while_fhir_down.append(
                {uid: sr_counts(orthanc).get(uid, 0) for uid in uids}
            ),
        )
        assert "to fhir failed" in service.log_text()
    # Delivery is per destination: the SRs reached the PACS while the FHIR server was down.
    (during,) = srs_while_fhir_down
    assert list(during.values()) == [1, 1, 1]
    assert (outcome.lost, outcome.duplicated) == (0, 0), outcome


def test_pacs_and_fhir_down_together_then_back_deliver_everything_once(
    orthanc: OrthancServer, fhir: RestartableFhir, tmp_path: Path
) -> None:
    with running_dermfusion(
        tmp_path / "svc", pacs_port=orthanc.dicom_port, fhir_url=fhir.base_url
    ) as service:
        outcome = peers_down(
            service,
            orthanc,
            fhir.base_url,
            fhir.down,
            tmp_path / "studies",
            studies=3,
            outage_seconds=20,
            pacs=True,
            fhir=True,
            settle_timeout=120,
        )
        log = service.log_text()
        assert "to pacs failed" in log and "to fhir failed" in log
    assert (outcome.lost, outcome.duplicated) == (0, 0), outcome
