"""The SQLite state store: readiness rules, exactly-once completion, outbox bookkeeping,
parking and re-queueing, schema migration, and what the operator commands read and change."""

from __future__ import annotations

import sqlite3
import threading
import time
import zlib
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from plugin.state import (
    SCHEMA_VERSION,
    FailedInstance,
    InstanceRow,
    OutboxBacklog,
    OutboxItem,
    ParkedItem,
    SchemaVersionError,
    SqliteStateStore,
    StateDatabaseError,
)

STUDY = "1.2.3"


@pytest.fixture
def store(tmp_path: Path) -> SqliteStateStore:
    return SqliteStateStore(tmp_path / "state.sqlite3")


def _row(sop: str, study: str = STUDY) -> InstanceRow:
    return InstanceRow(sop, study, "1.2.840.10008.5.1.4.1.1.77.1.7", Path(f"/spool/{sop}.dcm"))


def test_a_study_over_one_association_is_ready_as_soon_as_it_is_released(
    store: SqliteStateStore,
) -> None:
    store.record_instance(_row("1.1"), "assoc-a", received_at=100.0)
    store.record_instance(_row("1.2"), "assoc-a", received_at=101.0)
    assert store.ready_studies(now=200.0, stable_seconds=2) == []  # association still open
    store.close_association("assoc-a", closed_at=101.1)
    assert store.ready_studies(now=101.1, stable_seconds=2) == [STUDY]  # no quiet period
    assert [r.sop_instance_uid for r in store.pending_instances(STUDY)] == ["1.1", "1.2"]


def test_a_study_over_several_associations_waits_stable_seconds_after_its_last_arrival(
    store: SqliteStateStore,
) -> None:
    store.record_instance(_row("1.1"), "assoc-a", received_at=100.0)
    store.record_instance(_row("1.2"), "assoc-b", received_at=101.0)
    store.close_association("assoc-a", closed_at=100.5)
    assert store.ready_studies(now=200.0, stable_seconds=2) == []  # assoc-b still open
    store.close_association("assoc-b", closed_at=101.5)
    assert store.ready_studies(now=102.5, stable_seconds=2) == []  # not quiet long enough
    assert store.ready_studies(now=103.0, stable_seconds=2) == [STUDY]
    store.record_instance(_row("1.3"), "assoc-c", received_at=103.5)  # a late instance
    store.close_association("assoc-c", closed_at=103.6)
    assert store.ready_studies(now=105.0, stable_seconds=2) == []  # its own quiet period
    assert store.ready_studies(now=105.5, stable_seconds=2) == [STUDY]
    assert [r.sop_instance_uid for r in store.pending_instances(STUDY)] == ["1.1", "1.2", "1.3"]


def test_a_study_with_an_open_association_is_never_ready(store: SqliteStateStore) -> None:
    store.record_instance(_row("1.1"), "assoc-a", received_at=100.0)
    assert store.ready_studies(now=1e9, stable_seconds=0) == []  # its only association
    store.close_association("assoc-a", closed_at=100.5)
    store.record_instance(_row("1.2"), "assoc-b", received_at=101.0)
    assert store.ready_studies(now=1e9, stable_seconds=0) == []  # one of two still open
    store.close_association("assoc-b", closed_at=102.0)
    assert store.ready_studies(now=1e9, stable_seconds=0) == [STUDY]


def test_a_scored_instance_from_another_association_still_counts(
    store: SqliteStateStore,
) -> None:
    store.record_instance(_row("1.1"), "assoc-a", received_at=100.0)
    store.close_association("assoc-a", closed_at=100.5)
    store.complete(reported=["1.1"], failed=[], outbox=[], now=101.0)
    store.record_instance(_row("1.2"), "assoc-b", received_at=110.0)  # the study grows
    store.close_association("assoc-b", closed_at=110.5)
    assert store.ready_studies(now=111.0, stable_seconds=2) == []  # two associations: wait
    assert store.ready_studies(now=112.0, stable_seconds=2) == [STUDY]


def test_instances_whose_spool_file_is_missing_or_partial_are_forgotten(tmp_path: Path) -> None:
    """After a power cut: rows flushed with a file that did not make it are dropped."""
    store = SqliteStateStore(tmp_path / "s.db")
    whole, partial, replaced = tmp_path / "1.1.dcm", tmp_path / "1.4.dcm", tmp_path / "1.5.dcm"
    whole.write_bytes(b"DICM whole")
    partial.write_bytes(b"DICM")  # its row's checksum is that of b"DICM whole"
    replaced.write_bytes(b"anything")  # written before its row: no checksum to check
    crc = zlib.crc32(b"DICM whole")
    store.record_instance(InstanceRow("1.1", STUDY, "1.2", whole), "a", 1.0, checksum=crc)
    store.record_instance(InstanceRow("1.2", STUDY, "1.2", tmp_path / "1.2.dcm"), "a", 1.0)
    store.record_instance(InstanceRow("1.3", STUDY, "1.2", tmp_path / "1.3.dcm"), "a", 1.0)
    store.record_instance(InstanceRow("1.4", STUDY, "1.2", partial), "a", 1.0, checksum=crc)
    store.record_instance(InstanceRow("1.5", STUDY, "1.2", replaced), "a", 1.0)
    store.complete(reported=["1.3"], failed=[], outbox=[], now=2.0)  # scored: not ours to drop
    assert store.forget_unspooled_instances() == 2
    assert [r.sop_instance_uid for r in store.pending_instances(STUDY)] == ["1.1", "1.5"]
    assert store.forget_unspooled_instances() == 0
    store.record_instance(InstanceRow("1.2", STUDY, "1.2", tmp_path / "1.2.dcm"), "b", 3.0)
    assert {r.sop_instance_uid for r in store.pending_instances(STUDY)} == {"1.1", "1.2", "1.5"}


def test_concurrent_arrivals_are_all_recorded(store: SqliteStateStore) -> None:
    def arrive(first: int) -> None:
        for n in range(first, first + 25):
            store.record_instance(_row(f"1.{n}"), f"assoc-{first}", float(n))

    threads = [threading.Thread(target=arrive, args=(first,)) for first in range(0, 200, 25)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store.pending_instances(STUDY)) == 200


def test_a_failed_group_commit_fails_only_the_instance_it_belongs_to(
    store: SqliteStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two callers committed together: one row is refused, the other is still recorded."""
    real = store._insert_arrivals
    release = threading.Event()
    batches: list[int] = []

    def slow_then_real(batch: list[Any]) -> BaseException | None:
        batches.append(len(batch))
        release.wait(5)
        if any(a.row.sop_instance_uid == "bad" for a in batch):
            return sqlite3.OperationalError("disk I/O error")
        return real(batch)

    monkeypatch.setattr(store, "_insert_arrivals", slow_then_real)
    errors: dict[str, BaseException | None] = {}

    def arrive(sop: str) -> None:
        try:
            store.record_instance(_row(sop), "a", 1.0)
            errors[sop] = None
        except sqlite3.OperationalError as error:
            errors[sop] = error

    leader = threading.Thread(target=arrive, args=("1.1",))
    leader.start()
    time.sleep(0.1)  # the leader holds the commit: the next two wait and go together
    followers = [threading.Thread(target=arrive, args=(sop,)) for sop in ("bad", "1.2")]
    for thread in followers:
        thread.start()
    time.sleep(0.1)
    release.set()
    for thread in (leader, *followers):
        thread.join(10)
    assert batches[:2] == [1, 2]  # the leader alone, then the two followers together
    assert errors["1.1"] is None and errors["1.2"] is None
    assert isinstance(errors["bad"], sqlite3.OperationalError)
    assert [r.sop_instance_uid for r in store.pending_instances(STUDY)] == ["1.1", "1.2"]


def test_completion_is_exactly_once_and_resent_instances_are_not_rescored(
    store: SqliteStateStore,
) -> None:
    store.record_instance(_row("1.1"), "a", 1.0)
    store.record_instance(_row("1.2"), "a", 1.0)
    store.close_association("a", 2.0)
    owed = [OutboxItem("sr:9.9", "pacs", Path("/outbox/9.9.dcm"), 0)]
    store.complete(reported=["1.1"], failed=[("1.2", "not an image")], outbox=owed, now=5.0)
    store.complete(reported=["1.1"], failed=[], outbox=owed, now=6.0)  # a second run: no-op
    assert store.ready_studies(now=100.0, stable_seconds=0) == []
    assert store.outbox_counts() == {"owed": 1, "parked": 0, "delivered": 0}
    store.record_instance(_row("1.1"), "b", 50.0)  # the PACS sends the same image again
    store.close_association("b", 51.0)
    assert store.ready_studies(now=100.0, stable_seconds=0) == []


def test_open_associations_of_a_dead_process_are_closed_at_start(tmp_path: Path) -> None:
    first = SqliteStateStore(tmp_path / "s.db")
    first.record_instance(_row("1.1"), "a", 1.0)
    del first  # the process was killed mid-association
    second = SqliteStateStore(tmp_path / "s.db")
    assert second.ready_studies(now=100.0, stable_seconds=0) == []
    assert second.close_all_associations(closed_at=50.0) == 1
    assert second.ready_studies(now=100.0, stable_seconds=0) == [STUDY]


def test_outbox_retry_and_delivery(store: SqliteStateStore) -> None:
    item = OutboxItem("fhir:9.9", "fhir", Path("/outbox/9.9.json"), 0)
    store.complete(reported=[], failed=[], outbox=[item], now=10.0)
    assert [i.key for i in store.due_outbox(now=10.0, limit=5)] == ["fhir:9.9"]
    store.retry_later("fhir:9.9", "connection refused", next_attempt_at=20.0)
    assert store.due_outbox(now=19.0, limit=5) == []
    (due,) = store.due_outbox(now=20.0, limit=5)
    assert due.attempts == 1
    store.delivered("fhir:9.9", now=21.0)
    assert store.due_outbox(now=1e9, limit=5) == []
    assert store.outbox_counts() == {"owed": 0, "parked": 0, "delivered": 1}


def test_postponed_study_waits(store: SqliteStateStore) -> None:
    store.record_instance(_row("1.1"), "a", 1.0)
    store.close_association("a", 1.0)
    store.postpone_study(STUDY, until=30.0, first_try=10.0)
    assert store.ready_studies(now=29.0, stable_seconds=0) == []
    assert store.ready_studies(now=30.0, stable_seconds=0) == [STUDY]
    assert store.first_try(STUDY) == 10.0


def test_a_study_that_keeps_failing_is_parked_with_its_reason_and_can_be_requeued(
    store: SqliteStateStore,
) -> None:
    store.record_instance(_row("1.1"), "a", 1.0)
    store.close_association("a", 1.0)
    assert store.record_study_failure(STUDY, "scoring failed: ValueError", 10.0, 12.0) == 1
    assert store.ready_studies(now=11.0, stable_seconds=0) == []
    assert store.ready_studies(now=12.0, stable_seconds=0) == [STUDY]
    assert store.study_attempts(STUDY) == 1
    assert store.record_study_failure(STUDY, "scoring failed: KeyError", 12.0, None) == 2
    assert store.ready_studies(now=1e9, stable_seconds=0) == []  # parked: not tried again
    assert store.parked() == [
        ParkedItem("study", STUDY, "scoring failed: KeyError", 2, 12.0, study_instance_uid=STUDY)
    ]
    assert store.requeue_parked_studies(["9.9.9"]) == 0  # only the named ones
    assert store.requeue_parked_studies() == 1
    assert store.parked() == []
    assert store.study_attempts(STUDY) == 0
    assert store.ready_studies(now=13.0, stable_seconds=0) == [STUDY]


def test_a_parked_study_gets_another_try_when_an_instance_arrives_after_parking(
    store: SqliteStateStore,
) -> None:
    store.record_instance(_row("1.1"), "a", 1.0)
    store.close_association("a", 1.0)
    store.record_study_failure(STUDY, "scoring failed: ValueError", 10.0, None)
    store.record_instance(_row("1.2"), "b", 20.0)  # the study grew, or the PACS re-sent it
    store.close_association("b", 20.0)
    assert store.ready_studies(now=30.0, stable_seconds=0) == [STUDY]
    store.clear_study_failures(STUDY)  # that pass went through
    assert store.study_attempts(STUDY) == 0 and store.parked() == []


def test_a_rejected_delivery_is_counted_then_parked_and_requeued(store: SqliteStateStore) -> None:
    owed = [
        OutboxItem("sr:1", "pacs", Path("/outbox/1.dcm"), 0),
        OutboxItem("sr:2", "pacs", Path("/outbox/2.dcm"), 0),
    ]
    store.complete(reported=[], failed=[], outbox=owed, now=10.0)
    store.retry_later("sr:1", "PacsUnavailableError: connection refused", 11.0)
    store.reject_delivery("sr:1", "refused or unreadable: status 0xA700", 11.0, 12.0)
    due = {i.key: i for i in store.due_outbox(now=12.0, limit=5)}["sr:1"]
    assert (due.attempts, due.rejections) == (2, 1)
    store.reject_delivery("sr:1", "refused or unreadable: status 0xA700", 12.0, None)
    assert [i.key for i in store.due_outbox(now=1e9, limit=5)] == ["sr:2"]
    assert store.outbox_counts() == {"owed": 1, "parked": 1, "delivered": 0}
    assert store.parked() == [
        ParkedItem("outbox", "sr:1", "refused or unreadable: status 0xA700", 3, 12.0, "pacs")
    ]
    assert store.requeue_parked_deliveries(now=50.0) == 1
    again = {i.key: i for i in store.due_outbox(now=50.0, limit=5)}["sr:1"]
    assert again.rejections == 0
    assert store.outbox_counts() == {"owed": 2, "parked": 0, "delivered": 0}


# The CREATE statements of 0.5.0, verbatim: the state file every existing install has.
_SCHEMA_0_5_0 = """
CREATE TABLE IF NOT EXISTS associations (
    id TEXT PRIMARY KEY,
    opened_at REAL NOT NULL,
    closed_at REAL
);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    association_id TEXT NOT NULL REFERENCES associations(id),
    received_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'received' CHECK (state IN ('received', 'reported', 'failed')),
    error TEXT
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances (study_instance_uid, state);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    first_try REAL NOT NULL,
    not_before REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    key TEXT PRIMARY KEY,
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    enqueued_at REAL NOT NULL,
    delivered_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (delivered_at, next_attempt_at);
"""


def test_a_state_file_of_0_5_0_migrates_forward_and_keeps_what_it_owes(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(_SCHEMA_0_5_0)
    old.executescript(
        """INSERT INTO associations VALUES ('a', 1.0, 2.0);
           INSERT INTO instances (sop_instance_uid, study_instance_uid, sop_class_uid, path,
               association_id, received_at)
               VALUES ('1.1', '1.2.3', '1.2', '/spool/1.1.dcm', 'a', 1.0);
           INSERT INTO studies VALUES ('1.2.3', 5.0, 8.0);
           INSERT INTO outbox (key, destination, path, attempts, next_attempt_at, enqueued_at)
               VALUES ('sr:9', 'pacs', '/outbox/9.dcm', 4, 20.0, 3.0);"""
    )
    old.commit()
    assert old.execute("PRAGMA user_version").fetchone()[0] == 0
    old.close()

    store = SqliteStateStore(path)
    assert store.schema_version == SCHEMA_VERSION >= 1
    assert store.ready_studies(now=10.0, stable_seconds=0) == [STUDY]
    assert store.first_try(STUDY) == 5.0 and store.study_attempts(STUDY) == 0
    assert store.due_outbox(now=20.0, limit=5) == [
        OutboxItem("sr:9", "pacs", Path("/outbox/9.dcm"), 4, 0)
    ]
    store.reject_delivery("sr:9", "refused or unreadable: status 0xA700", 21.0, None)
    store.close()

    again = SqliteStateStore(path)  # opening a current file changes nothing
    assert again.schema_version == SCHEMA_VERSION
    assert [p.key for p in again.parked()] == ["sr:9"]
    again.close()


def test_a_state_file_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    SqliteStateStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(SchemaVersionError, match="newer"):
        SqliteStateStore(path)


# Operator commands: what `dermfusion status` and `resend` ask of the store (issue 20, item 3).

OTHER = "1.2.4"


def _owe(store: SqliteStateStore, study: str, sr: str, now: float) -> None:
    """What StudyProcessor records for one scored image with a PACS and a FHIR server."""
    store.complete(
        reported=[],
        failed=[],
        outbox=[
            OutboxItem(f"sr:{sr}", "pacs", Path(f"/outbox/{sr}.dcm"), 0, study_instance_uid=study),
            OutboxItem(f"sc:{sr}.1", "pacs", Path(f"/outbox/{sr}_saliency.dcm"), 0, 0, study),
            OutboxItem(f"fhir:{sr}", "fhir", Path(f"/outbox/{sr}.json"), 0, 0, study),
        ],
        now=now,
    )


def test_each_delivery_records_its_study(store: SqliteStateStore) -> None:
    _owe(store, STUDY, "9.1", now=10.0)
    due = store.due_outbox(now=10.0, limit=5)
    assert {(i.key, i.study_instance_uid) for i in due} == {
        ("sr:9.1", STUDY),
        ("sc:9.1.1", STUDY),
        ("fhir:9.1", STUDY),
    }


def test_backlog_counts_what_is_still_tried_per_destination_and_its_oldest(
    store: SqliteStateStore,
) -> None:
    assert store.outbox_backlog() == []
    _owe(store, STUDY, "9.1", now=10.0)
    _owe(store, OTHER, "9.2", now=20.0)
    store.delivered("fhir:9.1", now=21.0)
    store.reject_delivery("sr:9.1", "refused or unreadable: status 0xA700", 22.0, None)
    assert store.outbox_backlog() == [
        OutboxBacklog("fhir", 1, 20.0),  # fhir:9.2; fhir:9.1 was delivered
        OutboxBacklog("pacs", 3, 10.0),  # sc:9.1.1, sr:9.2, sc:9.2.1; sr:9.1 is parked
    ]


def test_failed_instances_newest_first_with_the_reason_but_not_the_spool_path(
    store: SqliteStateStore,
) -> None:
    for n, received in enumerate((5.0, 7.0, 6.0)):
        store.record_instance(_row(f"1.{n}"), "a", received)
    store.complete(
        reported=["1.0"],
        failed=[
            ("1.1", "/spool/1.1.dcm: not a DICOM file (File is missing DICOM File Meta)"),
            ("1.2", "/spool/1.2.dcm: Bits Allocated 16 is not supported (8-bit images only)"),
        ],
        outbox=[],
        now=8.0,
    )
    assert store.failed_instances(limit=5) == [
        FailedInstance("1.1", STUDY, "not a DICOM file (File is missing DICOM File Meta)", 7.0),
        FailedInstance("1.2", STUDY, "Bits Allocated 16 is not supported (8-bit images only)", 6.0),
    ]
    assert [f.sop_instance_uid for f in store.failed_instances(limit=1)] == ["1.1"]


def test_a_study_is_known_by_its_instances_its_attempts_or_its_deliveries(
    store: SqliteStateStore,
) -> None:
    assert not store.knows_study(STUDY)
    store.record_instance(_row("1.1"), "a", 1.0)
    assert store.knows_study(STUDY)
    store.postpone_study("7.7", until=5.0, first_try=1.0)
    _owe(store, "8.8", "9.1", now=1.0)
    assert store.knows_study("7.7") and store.knows_study("8.8")
    assert not store.knows_study("1.2")  # no prefix matching


def test_resending_a_study_owes_its_delivered_and_parked_reports_again_due_now(
    store: SqliteStateStore,
) -> None:
    _owe(store, STUDY, "9.1", now=10.0)
    _owe(store, OTHER, "9.2", now=10.0)
    for key in ("sr:9.1", "fhir:9.1", "sr:9.2", "sc:9.2.1", "fhir:9.2"):
        store.delivered(key, now=11.0)
    store.reject_delivery("sc:9.1.1", "refused or unreadable: status 0xA900", 12.0, None)
    assert store.outbox_counts() == {"owed": 0, "parked": 1, "delivered": 5}

    assert store.requeue_study_deliveries(STUDY, now=100.0) == {"fhir": 1, "pacs": 2}
    assert store.outbox_counts() == {"owed": 3, "parked": 0, "delivered": 3}  # other study kept
    due = store.due_outbox(now=100.0, limit=10)
    assert {i.key for i in due} == {"sr:9.1", "sc:9.1.1", "fhir:9.1"}
    assert all(i.rejections == 0 and i.study_instance_uid == STUDY for i in due)
    # Delivered ones are owed from now; the parked one was owed all along.
    assert store.outbox_backlog() == [
        OutboxBacklog("fhir", 1, 100.0),
        OutboxBacklog("pacs", 2, 10.0),
    ]
    assert store.requeue_study_deliveries("5.5.5", now=100.0) == {}


def test_deliveries_enqueued_before_schema_2_have_no_study(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(_SCHEMA_0_5_0)
    old.execute(
        """INSERT INTO outbox (key, destination, path, next_attempt_at, enqueued_at)
           VALUES ('sr:9', 'pacs', '/outbox/9.dcm', 20.0, 3.0)"""
    )
    old.commit()
    old.close()
    store = SqliteStateStore(path)
    (item,) = store.due_outbox(now=20.0, limit=5)
    assert item.study_instance_uid is None
    assert store.requeue_study_deliveries(STUDY, now=30.0) == {}
    store.close()


def test_an_operator_command_never_creates_or_migrates_the_state_file(tmp_path: Path) -> None:
    missing = tmp_path / "var" / "state.sqlite3"
    with pytest.raises(StateDatabaseError, match="no state database"):
        SqliteStateStore.open_existing(missing, read_only=True)
    assert not missing.parent.exists()

    old = tmp_path / "old.sqlite3"
    with closing(sqlite3.connect(old)) as db:
        db.executescript(_SCHEMA_0_5_0)
    with pytest.raises(StateDatabaseError, match=r"schema 0, this release reads .* migrate"):
        SqliteStateStore.open_existing(old)
    with closing(sqlite3.connect(old)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 0  # left as it was


def test_a_read_only_store_reads_beside_a_writing_service_and_cannot_write(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.sqlite3"
    service = SqliteStateStore(path)
    _owe(service, STUDY, "9.1", now=10.0)
    reader = SqliteStateStore.open_existing(path, read_only=True)
    with service._transaction() as db:  # the service in the middle of a write
        db.execute("UPDATE outbox SET delivered_at = 11.0 WHERE key = 'sr:9.1'")
        assert reader.outbox_counts()["owed"] == 3  # reads the last committed state
    assert reader.outbox_counts()["owed"] == 2
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.requeue_study_deliveries(STUDY, now=20.0)
    reader.close()

    writer = SqliteStateStore.open_existing(path)
    assert writer.requeue_study_deliveries(STUDY, now=20.0) == {"fhir": 1, "pacs": 2}
    writer.close()
    assert service.outbox_counts()["owed"] == 3
    service.close()


def test_a_parked_delivery_names_its_destination_and_study(store: SqliteStateStore) -> None:
    _owe(store, STUDY, "9.1", now=10.0)
    store.reject_delivery("fhir:9.1", "refused or unreadable: FhirRejectedError: 422", 12.0, None)
    assert store.parked() == [
        ParkedItem(
            "outbox",
            "fhir:9.1",
            "refused or unreadable: FhirRejectedError: 422",
            1,
            12.0,
            "fhir",
            STUDY,
        )
    ]


def test_instances_after_a_study_was_scored_start_a_new_round_with_fresh_timers(
    store: SqliteStateStore,
) -> None:
    store.record_instance(_row("1.1"), "a", 1.0)
    store.close_association("a", 1.0)
    store.postpone_study(STUDY, until=5.0, first_try=2.0)  # waited for the FHIR server
    store.complete(reported=["1.1"], failed=[], outbox=[], now=30.0)
    assert store.first_try(STUDY) is None  # the round is over
    store.record_instance(_row("1.2"), "b", 100.0)  # the study grows
    assert store.ready_studies(now=200.0, stable_seconds=0) == []  # association b still open
    store.close_association("b", 101.0)
    assert store.ready_studies(now=101.5, stable_seconds=2) == []  # its own quiet period
    assert store.ready_studies(now=103.0, stable_seconds=2) == [STUDY]
    assert [r.sop_instance_uid for r in store.pending_instances(STUDY)] == ["1.2"]
    assert store.first_try(STUDY) is None  # a new FHIR wait starts at its first try


def test_a_round_still_in_progress_keeps_its_timers(store: SqliteStateStore) -> None:
    store.record_instance(_row("1.1"), "a", 1.0)
    store.record_instance(_row("1.2"), "a", 1.0)
    store.close_association("a", 1.0)
    store.postpone_study(STUDY, until=5.0, first_try=2.0)
    store.complete(reported=["1.1"], failed=[], outbox=[], now=30.0)  # one image at a time
    assert store.first_try(STUDY) == 2.0


def test_studies_scored_in_one_pass_are_listed_newest_first_by_when_they_were_recorded(
    tmp_path: Path,
) -> None:
    """A scoring pass gives every study it scores the pass's time; the status page must still
    show the one scored last first."""
    from plugin.state import ScoredResult

    store = SqliteStateStore(tmp_path / "s.db")
    for study in ("1.2.1", "1.2.9"):  # scored in this order, in one pass at t = 5
        result = ScoredResult(f"{study}.1", study, f"{study}.9", 0.1, 0.5, False, "m 1", 5.0)
        store.complete(reported=[], failed=[], outbox=[], now=5.0, results=[result])
    assert [r.study_instance_uid for r in store.recent_results(10)] == ["1.2.9", "1.2.1"]
    assert [r.study_instance_uid for r in store.recent_results(1)] == ["1.2.9"]
