"""The SQLite state store: readiness rules, exactly-once completion, outbox bookkeeping."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugin.state import InstanceRow, OutboxItem, SqliteStateStore

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
    assert store.outbox_counts() == {"owed": 1, "delivered": 0}
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
    assert store.outbox_counts() == {"owed": 0, "delivered": 1}


def test_postponed_study_waits(store: SqliteStateStore) -> None:
    store.record_instance(_row("1.1"), "a", 1.0)
    store.close_association("a", 1.0)
    store.postpone_study(STUDY, until=30.0, first_try=10.0)
    assert store.ready_studies(now=29.0, stable_seconds=0) == []
    assert store.ready_studies(now=30.0, stable_seconds=0) == [STUDY]
    assert store.first_try(STUDY) == 10.0
