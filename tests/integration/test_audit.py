"""The audit trail of a running `dermfusion serve`: studies sent with DCMTK storescu and an
association with a wrong called AE are recorded in the audit file and at a syslog collector
(a TCP server in this process); while the collector is down the records wait on disk and
arrive, in order and once, when it is back. No patient identifier in any record."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.integration.dermfusion_process import eventually, free_port, running_dermfusion
from tests.integration.studies import dermoscopy_study, storescu
from tests.unit.test_audit import Collector

pytestmark = pytest.mark.integration
DMS = "1.2.840.10008.5.1.4.1.1.77.1.7"
PATIENT_NAME = "Auditcheck^Yolanda"
PATIENT_ID = "AUDIT-ID-7070"
BIRTH_DATE = "19630217"


def _study(folder: Path, images: int) -> tuple[str, list[Path]]:
    return dermoscopy_study(
        folder,
        patient_id=PATIENT_ID,
        patient_name=PATIENT_NAME,
        images=images,
        age="061Y",
        birth_date=BIRTH_DATE,
    )


def _xml(messages: list[bytes]) -> list[str]:
    """The XML of each syslog message (after the header and the BOM)."""
    return [m.split(b"\xef\xbb\xbf", 1)[1].decode() for m in messages]


def _event_id(xml: str) -> str:
    return str(ET.fromstring(xml).find("EventIdentification/EventID").get("csd-code"))  # type: ignore[union-attr]


def _stored(xml: str, study_uid: str) -> int | None:
    """Instances of ``study_uid`` a DICOM Instances Transferred record names, else None."""
    message = ET.fromstring(xml)
    if _event_id(xml) != "110104":
        return None
    for study in message.findall("ParticipantObjectIdentification"):
        if study.get("ParticipantObjectID") == study_uid:
            return sum(int(s.get("NumberOfInstances", "0")) for s in study.iter("SOPClass"))
    return None


def test_associations_and_refusals_reach_the_file_and_the_collector_even_one_that_was_down(
    tmp_path: Path,
) -> None:
    syslog_port = free_port()
    collector = Collector(syslog_port)
    audit = ["[audit]", 'syslog_host = "127.0.0.1"', f"syslog_port = {syslog_port}"]
    first, first_files = _study(tmp_path, 2)
    second, second_files = _study(tmp_path, 1)
    later = None
    try:
        with running_dermfusion(tmp_path / "df", extra=audit) as service:
            audit_file = tmp_path / "df" / "var" / "audit" / "audit.log"

            def file_lines() -> list[str]:
                return audit_file.read_text().splitlines() if audit_file.exists() else []

            eventually(
                lambda: any(_event_id(x) == "110100" for x in _xml(collector.messages)),
                30,
                "the Application Start record at the collector",
            )
            sent = storescu(service.ae_title, service.port, first_files)
            assert sent.returncode == 0, sent.stderr
            refused = storescu("NOT-OURS", service.port, first_files[:1])
            assert refused.returncode != 0
            for where, lines in (
                ("file", file_lines),
                ("collector", lambda: _xml(collector.messages)),
            ):
                eventually(
                    lambda lines=lines: any(_stored(x, first) == 2 for x in lines()),
                    30,
                    f"the stored association (2 instances) in the {where}",
                )
                eventually(
                    lambda lines=lines: any(
                        _event_id(x) == "110113" and "NOT-OURS" in x for x in lines()
                    ),
                    30,
                    f"the refused association in the {where}",
                )
            (accepted,) = [x for x in file_lines() if _stored(x, first) is not None]
            assert 'UserID="STORESCU"' in accepted and 'csd-code="110153"' in accepted
            assert 'NetworkAccessPointID="127.0.0.1"' in accepted

            collector.close()  # the collector goes down; the service goes on
            sent = storescu(service.ae_title, service.port, second_files)
            assert sent.returncode == 0, sent.stderr
            eventually(
                lambda: any(_stored(x, second) == 1 for x in file_lines()),
                30,
                "the second study's record in the file",
            )
            outgoing = audit_file.parent / "outgoing"
            # the file line is written first, then the spool copy: wait for that, not the line
            eventually(lambda: any(outgoing.iterdir()), 10, "the record waiting in the spool")
            assert not any(_stored(x, second) is not None for x in _xml(collector.messages))

            later = Collector(syslog_port)  # back: what it missed arrives
            eventually(
                lambda: any(_stored(x, second) == 1 for x in _xml(later.messages)),
                60,
                "the spooled record at the restarted collector",
            )
            eventually(lambda: not any(outgoing.iterdir()), 10, "an empty spool")
            received = _xml(collector.messages) + _xml(later.messages)
            assert received == file_lines()  # in order, each exactly once
            assert service.log_text().count("association refused") == 1
        everything = audit_file.read_text()
        assert _event_id(everything.splitlines()[-1]) == "110100"  # Application Stop
        for mark in (PATIENT_NAME, PATIENT_ID, BIRTH_DATE, "Auditcheck", "Patient"):
            assert mark not in everything
    finally:
        collector.close()
        if later is not None:
            later.close()
