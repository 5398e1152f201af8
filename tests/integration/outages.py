"""Outage scenarios against the real peers, shared by the tests (small counts) and
``benchmarks/outages.py`` (the full counts): a burst of studies with SIGKILLs at random moments,
and the PACS and/or FHIR server down for a while. Each returns what a reliability table reports:
studies sent, lost (acknowledged, never reported), duplicated (stored twice), recovery time."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from fhir_io import STUDY_UID_SYSTEM, FhirClient
from tests.integration.dermfusion_process import DermfusionProcess
from tests.integration.orthanc_server import OrthancServer
from tests.integration.studies import dermoscopy_study, storescu


@dataclass(frozen=True)
class Outcome:
    studies: int
    kills: int
    resent: int  # studies sent again because storescu saw the service die mid-association
    lost: int  # studies without an SR or without a DiagnosticReport
    duplicated: int  # studies with more than one SR or more than one DiagnosticReport
    recovery_seconds: float  # from the last send (or the peers' return) to all delivered


def make_studies(folder: Path, count: int, prefix: str) -> list[tuple[str, list[Path]]]:
    """One-image dermoscopy studies with complete demographics (no FHIR lookup needed)."""
    return [
        dermoscopy_study(
            folder,
            patient_id=f"{prefix}-{index:04d}",
            patient_name="Outage^Test",
            first_image=index,
            sex="F" if index % 2 else "M",
        )
        for index in range(count)
    ]


def sent(ae_title: str, port: int, files: Sequence[Path]) -> bool:
    """True when every file was acknowledged with success."""
    return storescu(ae_title, port, files).returncode == 0


def sr_counts(orthanc: OrthancServer) -> dict[str, int]:
    """SR instances per StudyInstanceUID in Orthanc (one query for the whole archive)."""
    series = orthanc.find({"Level": "Series", "Query": {"Modality": "SR"}, "Expand": True})
    counts: dict[str, int] = {}
    for item in series:
        study = orthanc.get_json(f"/studies/{item['ParentStudy']}")["MainDicomTags"][
            "StudyInstanceUID"
        ]
        counts[study] = counts.get(study, 0) + len(item["Instances"])
    return counts


def report_counts(fhir_url: str, study_uids: Sequence[str]) -> dict[str, int]:
    with FhirClient(fhir_url) as client:
        return {
            uid: len(
                client.search(
                    "DiagnosticReport", {"identifier": f"{STUDY_UID_SYSTEM}|urn:oid:{uid}"}
                )
            )
            for uid in study_uids
        }


def _settle(
    orthanc: OrthancServer, fhir_url: str, uids: Sequence[str], timeout: float, since: float
) -> tuple[dict[str, int], dict[str, int], float]:
    """Poll until every study has an SR and a report (or timeout); the counts then, and when
    the last one arrived (seconds after ``since``), then a few seconds more for duplicates."""
    deadline = time.monotonic() + timeout
    done_at = None
    while time.monotonic() < deadline:
        srs = sr_counts(orthanc)
        if all(srs.get(u, 0) for u in uids):
            reports = report_counts(fhir_url, uids)
            if all(reports.values()):
                done_at = time.monotonic()
                break
        time.sleep(1.0)
    time.sleep(3.0)  # long enough for a second delivery or a second scoring to show
    srs, reports = sr_counts(orthanc), report_counts(fhir_url, uids)
    return srs, reports, (done_at - since) if done_at is not None else float("inf")


def _outcome(
    uids: Sequence[str],
    srs: dict[str, int],
    reports: dict[str, int],
    *,
    kills: int,
    resent: int,
    recovery: float,
) -> Outcome:
    return Outcome(
        studies=len(uids),
        kills=kills,
        resent=resent,
        lost=sum(1 for u in uids if not srs.get(u) or not reports.get(u)),
        duplicated=sum(1 for u in uids if srs.get(u, 0) > 1 or reports.get(u, 0) > 1),
        recovery_seconds=recovery,
    )


def sigkill_burst(
    service: DermfusionProcess,
    orthanc: OrthancServer,
    fhir_url: str,
    folder: Path,
    *,
    studies: int,
    kills: int,
    seed: int,
    settle_timeout: float,
) -> Outcome:
    """Send ``studies`` one after another while another thread SIGKILLs the service at
    ``kills`` random moments over the burst (mid-association, mid-scoring, mid-delivery); a
    study whose storescu failed is sent again once the service is back, as a PACS would."""
    rng = random.Random(seed)
    burst = make_studies(folder, studies, f"KILL{seed}")
    # Roughly 0.5 s per one-image study on these cores: spread the kills over the burst and a
    # little after it, so some land while the tail is being scored and delivered.
    moments = sorted(rng.uniform(0.5, 0.6 * studies + 3.0) for _ in range(kills))
    stop = threading.Event()
    killed: list[float] = []
    restart = threading.Lock()  # one thread at a time kills or starts the service

    def killer() -> None:
        start = time.monotonic()
        for moment in moments:
            if stop.wait(max(0.0, start + moment - time.monotonic())):
                return
            with restart:
                process = service.process
                if process is not None and process.poll() is None:
                    process.send_signal(signal.SIGKILL)
                    process.wait(timeout=30)
                    killed.append(time.monotonic() - start)
                _ensure_running(service)  # as systemd's Restart=on-failure would

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    resent = 0
    try:
        for _, files in burst:
            while True:
                with restart:
                    _ensure_running(service)
                if sent(service.ae_title, service.port, files):
                    break
                resent += 1
        thread.join(timeout=0.6 * studies + 120.0)
    finally:
        stop.set()
    _ensure_running(service)
    uids = [uid for uid, _ in burst]
    srs, reports, recovery = _settle(orthanc, fhir_url, uids, settle_timeout, time.monotonic())
    return _outcome(uids, srs, reports, kills=len(killed), resent=resent, recovery=recovery)


def _ensure_running(service: DermfusionProcess, tries: int = 5) -> None:
    """Start the service again if it is dead (a kill may also land while it is starting)."""
    for attempt in range(tries):
        process = service.process
        if process is not None and process.poll() is None:
            return
        service.process = None
        try:
            service.start()
            return
        except RuntimeError:
            if attempt == tries - 1:
                raise


def peers_down(
    service: DermfusionProcess,
    orthanc: OrthancServer,
    fhir_url: str,
    fhir_down: Callable[[], AbstractContextManager[None]],
    folder: Path,
    *,
    studies: int,
    outage_seconds: float,
    pacs: bool,
    fhir: bool,
    settle_timeout: float,
    before_return: Callable[[list[str]], None] | None = None,
) -> Outcome:
    """Stop the PACS and/or the FHIR server, send ``studies`` while they are down, keep them
    down ``outage_seconds``, bring them back: everything owed is delivered once.
    ``before_return`` is called with the studies' UIDs while the peers are still down."""
    batch = make_studies(folder, studies, f"DOWN{int(pacs)}{int(fhir)}")
    uids = [uid for uid, _ in batch]
    with _down(orthanc, pacs), fhir_down() if fhir else _nothing():
        started = time.monotonic()
        for _, files in batch:
            assert sent(service.ae_title, service.port, files)
        time.sleep(max(0.0, outage_seconds - (time.monotonic() - started)))
        if before_return is not None:
            before_return(uids)  # e.g. what the peer that stayed up got meanwhile
    back = time.monotonic()
    srs, reports, recovery = _settle(orthanc, fhir_url, uids, settle_timeout, back)
    return _outcome(uids, srs, reports, kills=0, resent=0, recovery=recovery)


class _down(AbstractContextManager[None]):
    def __init__(self, orthanc: OrthancServer, stop: bool) -> None:
        self.orthanc, self.stop = orthanc, stop

    def __enter__(self) -> None:
        if self.stop:
            self.orthanc.stop()

    def __exit__(self, *exc: object) -> None:
        if self.stop:
            self.orthanc.start()


class _nothing(AbstractContextManager[None]):
    def __exit__(self, *exc: object) -> None:
        return None


def iter_table(rows: Sequence[tuple[str, Outcome]]) -> Iterator[str]:
    yield "| scenario | studies | kills | resent | lost | duplicated | recovery s |"
    yield "| --- | --- | --- | --- | --- | --- | --- |"
    for name, o in rows:
        yield (
            f"| {name} | {o.studies} | {o.kills} | {o.resent} | {o.lost} | {o.duplicated} "
            f"| {o.recovery_seconds:.1f} |"
        )
