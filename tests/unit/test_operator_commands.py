"""`dermfusion status`, `resend` and `requeue` against a state database written by the real
SqliteStateStore: the lines they print, their exit statuses, and what they change."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from plugin.cli import main
from plugin.state import InstanceRow, OutboxItem, SqliteStateStore

STUDY = "1.2.826.0.1.3680043.8.498.1"
OTHER = "1.2.826.0.1.3680043.8.498.2"
DERMOSCOPY = "1.2.840.10008.5.1.4.1.1.77.1.7"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "dermfusion.toml"
    path.write_text(
        f'[storage]\ndir = "{tmp_path / "var"}"\n'
        '[pacs]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = 4242\n'
        '[fhir]\nbase_url = "http://127.0.0.1:8080/fhir"\n'
        'patient_identifier_system = "urn:oid:1.2.3"\n'
    )
    return path


@pytest.fixture
def store(tmp_path: Path) -> SqliteStateStore:
    return SqliteStateStore(tmp_path / "var" / "state.sqlite3")


def _scored(store: SqliteStateStore, study: str, sop: str, now: float) -> None:
    """One image received, scored and owed to the PACS (SR) and the FHIR server (Bundle)."""
    store.record_instance(
        InstanceRow(sop, study, DERMOSCOPY, Path(f"/var/spool/{study}/{sop}.dcm")), "a", now
    )
    store.close_association("a", now)
    sr = f"{sop}.9"
    store.complete(
        reported=[sop],
        failed=[],
        outbox=[
            OutboxItem(f"sr:{sr}", "pacs", Path(f"/var/outbox/{sr}.dcm"), 0, 0, study),
            OutboxItem(f"fhir:{sr}", "fhir", Path(f"/var/outbox/{sr}.json"), 0, 0, study),
        ],
        now=now,
    )


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], list[str]]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out.splitlines(), err.splitlines()


def test_status_of_a_quiet_service_is_ok(
    config: Path, store: SqliteStateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    _scored(store, STUDY, f"{STUDY}.1", now=time.time())
    store.delivered(f"sr:{STUDY}.1.9", now=time.time())
    status, out, err = _run(capsys, "status", "--config", str(config))
    assert (status, err) == (0, [])
    assert out[0] == "outbox pacs: nothing owed"
    assert out[1].startswith("outbox fhir: 1 owed, the oldest for ")
    assert re.fullmatch(r"storage: \d+ MiB free \(refusing new studies below 512\)", out[2])
    assert out[3:] == ["status: ok"]


def test_status_lists_parked_stuck_and_failed_and_exits_1(
    config: Path, store: SqliteStateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    long_ago = time.time() - 3600  # stuck: longer than 3 x retry_max_seconds (300 s)
    _scored(store, STUDY, f"{STUDY}.1", now=long_ago)
    store.reject_delivery(f"sr:{STUDY}.1.9", "refused or unreadable: status 0xA900", 0.0, None)
    store.record_instance(
        InstanceRow(f"{OTHER}.1", OTHER, DERMOSCOPY, Path(f"/var/spool/{OTHER}/{OTHER}.1.dcm")),
        "b",
        1.0,
    )
    store.record_instance(
        InstanceRow(f"{OTHER}.2", OTHER, DERMOSCOPY, Path(f"/var/spool/{OTHER}/{OTHER}.2.dcm")),
        "b",
        2.0,
    )
    store.complete(
        reported=[],
        failed=[(f"{OTHER}.2", f"/var/spool/{OTHER}/{OTHER}.2.dcm: no pixel data (7FE0,0010)")],
        outbox=[],
        now=3.0,
    )
    store.record_study_failure(OTHER, "scoring failed: ValueError at dicom_io/sr.py:1", 4.0, None)

    status, out, err = _run(capsys, "status", "--config", str(config))
    assert (status, err) == (1, [])
    assert out.pop(4).startswith("storage: ")
    assert out == [
        "outbox pacs: nothing owed",
        "outbox fhir: 1 owed, the oldest for 3600 s (stuck: owed longer than 900 s)",
        f"parked delivery sr:{STUDY}.1.9 to pacs (study {STUDY}): since 1970-01-01T00:00:00Z "
        "after 1 attempt(s): refused or unreadable: status 0xA900",
        f"parked study {OTHER}: since 1970-01-01T00:00:04Z after 1 attempt(s): "
        "scoring failed: ValueError at dicom_io/sr.py:1",
        f"failed instance {OTHER}.2 (study {OTHER}, received 1970-01-01T00:00:02Z): "
        "no pixel data (7FE0,0010)",
        "status: needs attention: parked deliveries 1, parked studies 1, stuck outbox fhir",
    ]


def test_status_says_when_low_disk_space_refuses_new_studies(
    config: Path, store: SqliteStateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    config.write_text(
        config.read_text().replace("[storage]\n", "[storage]\nmin_free_mb = 1000000000\n")
    )
    status, out, err = _run(capsys, "status", "--config", str(config))
    assert (status, err) == (1, [])
    assert re.fullmatch(
        r"storage: refusing new studies: \d+ MiB free on the storage volume, "
        r"below storage.min_free_mb \(1000000000\)",
        out[2],
    )
    assert out[-1] == "status: needs attention: low disk space"


def test_status_without_a_state_database_is_one_line_and_exit_2(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = _run(capsys, "status", "--config", str(config))
    assert (status, out) == (2, [])
    assert err == [f"dermfusion status: no state database at {tmp_path / 'var/state.sqlite3'}"]
    assert not (tmp_path / "var").exists()  # looking did not create it


def test_a_bad_config_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[outbox]\nmax_attempts = 0\n")
    status, out, err = _run(capsys, "status", "--config", str(bad))
    assert (status, out) == (2, [])
    assert err == ["dermfusion: configuration: outbox.max_attempts must be >= 1, got 0"]


def test_resend_owes_the_studys_reports_again(
    config: Path, store: SqliteStateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    _scored(store, STUDY, f"{STUDY}.1", now=now)
    _scored(store, OTHER, f"{OTHER}.1", now=now)
    for key in (f"sr:{STUDY}.1.9", f"fhir:{STUDY}.1.9", f"sr:{OTHER}.1.9", f"fhir:{OTHER}.1.9"):
        store.delivered(key, now)
    status, out, err = _run(capsys, "resend", STUDY, "--config", str(config))
    assert (status, err) == (0, [])
    assert out == [f"resend {STUDY}: 2 deliveries re-queued (fhir 1, pacs 1)"]
    due = store.due_outbox(now=time.time(), limit=10)
    assert sorted(i.key for i in due) == [f"fhir:{STUDY}.1.9", f"sr:{STUDY}.1.9"]


def test_resend_scores_a_parked_study_with_unscored_images_again(
    config: Path, store: SqliteStateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    _scored(store, STUDY, f"{STUDY}.1", now=1.0)
    store.record_instance(
        InstanceRow(f"{STUDY}.2", STUDY, DERMOSCOPY, Path(f"/var/spool/{STUDY}/{STUDY}.2.dcm")),
        "b",
        2.0,
    )
    store.close_association("b", 2.0)
    store.record_study_failure(STUDY, "scoring failed: KeyError at plugin/pipeline.py:1", 3.0, None)
    assert store.ready_studies(now=10.0, stable_seconds=0) == []
    status, out, _ = _run(capsys, "resend", STUDY, "--config", str(config))
    assert status == 0
    assert out == [
        f"resend {STUDY}: 2 deliveries re-queued (fhir 1, pacs 1); "
        "parked study re-queued for scoring (1 unscored instance(s))"
    ]
    assert store.ready_studies(now=10.0, stable_seconds=0) == [STUDY]


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["resend", "9.9.9"], 1, "dermfusion resend: no study 9.9.9 in the state database"),
        (
            ["resend", "1.2.3'; DROP TABLE outbox; --"],
            2,
            "dermfusion resend: STUDY_UID must be a DICOM UID (digits and dots, at most 64)",
        ),
        (
            ["resend", "1." * 40 + "1"],
            2,
            "dermfusion resend: STUDY_UID must be a DICOM UID (digits and dots, at most 64)",
        ),
    ],
)
def test_resend_refuses_an_unknown_or_malformed_uid_in_one_line(
    config: Path,
    store: SqliteStateStore,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    status: int,
    message: str,
) -> None:
    _scored(store, STUDY, f"{STUDY}.1", now=1.0)
    assert _run(capsys, *argv, "--config", str(config)) == (status, [], [message])
    assert store.outbox_counts()["owed"] == 2  # nothing changed


def test_resend_of_a_study_without_deliveries_says_so(
    config: Path, store: SqliteStateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    store.record_instance(
        InstanceRow(f"{STUDY}.1", STUDY, DERMOSCOPY, Path(f"/var/spool/{STUDY}/{STUDY}.1.dcm")),
        "a",
        1.0,
    )
    store.complete(reported=[f"{STUDY}.1"], failed=[], outbox=[], now=2.0)  # nothing configured
    status, out, err = _run(capsys, "resend", STUDY, "--config", str(config))
    assert (status, out, len(err)) == (1, [], 1)
    assert err[0].startswith(f"dermfusion resend: study {STUDY} has nothing to re-send")


def test_requeue_parked_gives_every_parked_item_another_try(
    config: Path, store: SqliteStateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    _scored(store, STUDY, f"{STUDY}.1", now=now)
    store.reject_delivery(f"sr:{STUDY}.1.9", "refused or unreadable: status 0xA900", now, None)
    store.record_instance(
        InstanceRow(f"{OTHER}.1", OTHER, DERMOSCOPY, Path(f"/var/spool/{OTHER}/{OTHER}.1.dcm")),
        "b",
        now,
    )
    store.record_study_failure(OTHER, "scoring failed: KeyError at plugin/pipeline.py:1", now, None)
    assert len(store.parked()) == 2
    status, out, _ = _run(capsys, "requeue", "--parked", "--config", str(config))
    assert (status, out) == (0, ["requeue: 1 parked deliveries and 1 parked studies re-queued"])
    assert store.parked() == []
    assert main(["status", "--config", str(config)]) == 0


def test_requeue_does_nothing_without_saying_what(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["requeue", "--config", str(config)])
    assert exit_.value.code == 2
    assert "--parked" in capsys.readouterr().err
