"""The SQLite state store: readiness rules, exactly-once completion, outbox bookkeeping,
parking and re-queueing, schema migration."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from plugin.state import (
    SCHEMA_VERSION,
    InstanceRow,
    OutboxItem,
    ParkedItem,
    SchemaVersionError,
    SqliteStateStore,
)

STUDY = "1.2.3"


@pytest.fixture
def store(tmp_path: Path) -> SqliteStateStore:
    return SqliteStateStore(tmp_path / "state.sqlite3")


def _row(sop: str, study: str = STUDY) -> InstanceRow:
    return InstanceRow(sop, study, "1.2.840.10008.5.1.4.1.1.77.1.7", Path(f"/spool/{sop}.dcm"))


def test_study_is_ready_only_after_release_and_quiet_period(store: SqliteStateStore) -> None:
    store.record_instance(_row("1.1"), "assoc-a", received_at=100.0)
    store.record_instance(_row("1.2"), "assoc-a", received_at=101.0)
    assert store.ready_studies(now=200.0, stable_seconds=2) == []  # association still open
    store.close_association("assoc-a", closed_at=101.5)
    assert store.ready_studies(now=102.5, stable_seconds=2) == []  # not quiet long enough
    assert store.ready_studies(now=103.0, stable_seconds=2) == [STUDY]
    store.record_instance(_row("1.3"), "assoc-b", received_at=103.5)  # a late instance
    assert store.ready_studies(now=110.0, stable_seconds=2) == []
    store.close_association("assoc-b", closed_at=104.0)
    assert store.ready_studies(now=110.0, stable_seconds=2) == [STUDY]
    assert [r.sop_instance_uid for r in store.pending_instances(STUDY)] == ["1.1", "1.2", "1.3"]


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
    assert store.parked() == [ParkedItem("study", STUDY, "scoring failed: KeyError", 2, 12.0)]
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
        ParkedItem("outbox", "sr:1", "refused or unreadable: status 0xA700", 3, 12.0)
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
