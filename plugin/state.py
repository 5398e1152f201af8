"""What the service has received, processed and still owes, in one SQLite file.

``StateStore`` is the interface the service uses; ``SqliteStateStore`` is the embedded default.
A server database can replace it by implementing the same protocol. SQLite runs in WAL mode
with ``synchronous=FULL``: a row is on disk when its transaction commits, so an acknowledged
instance survives a SIGKILL.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class InstanceRow:
    sop_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    path: Path


@dataclass(frozen=True)
class OutboxItem:
    """A report still owed to a destination; ``key`` is stable, so enqueuing twice is a no-op."""

    key: str
    destination: str  # "pacs" or "fhir"
    path: Path
    attempts: int


class StateStore(Protocol):
    def record_instance(
        self, row: InstanceRow, association_id: str, received_at: float
    ) -> None: ...
    def close_association(self, association_id: str, closed_at: float) -> None: ...
    def close_all_associations(self, closed_at: float) -> int: ...
    def ready_studies(self, now: float, stable_seconds: float) -> list[str]: ...
    def pending_instances(self, study_instance_uid: str) -> list[InstanceRow]: ...
    def postpone_study(self, study_instance_uid: str, until: float, first_try: float) -> None: ...
    def first_try(self, study_instance_uid: str) -> float | None: ...
    def complete(
        self,
        reported: Sequence[str],
        failed: Sequence[tuple[str, str]],
        outbox: Sequence[OutboxItem],
        now: float,
    ) -> None: ...
    def due_outbox(self, now: float, limit: int) -> list[OutboxItem]: ...
    def delivered(self, key: str, now: float) -> None: ...
    def retry_later(self, key: str, error: str, next_attempt_at: float) -> None: ...
    def outbox_counts(self) -> dict[str, int]: ...


_SCHEMA = """
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


class SqliteStateStore:
    """The embedded state store. Thread-safe: one connection guarded by a lock."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def record_instance(self, row: InstanceRow, association_id: str, received_at: float) -> None:
        """A re-sent instance refreshes its arrival but keeps its state: it is not scored twice."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO associations (id, opened_at) VALUES (?, ?)",
                (association_id, received_at),
            )
            db.execute(
                """INSERT INTO instances (sop_instance_uid, study_instance_uid, sop_class_uid, path,
                       association_id, received_at)
                   VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT (sop_instance_uid) DO UPDATE SET
                       association_id = excluded.association_id,
                       received_at = excluded.received_at,
                       path = excluded.path""",
                (
                    row.sop_instance_uid,
                    row.study_instance_uid,
                    row.sop_class_uid,
                    str(row.path),
                    association_id,
                    received_at,
                ),
            )

    def close_association(self, association_id: str, closed_at: float) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE associations SET closed_at = ? WHERE id = ? AND closed_at IS NULL",
                (closed_at, association_id),
            )

    def close_all_associations(self, closed_at: float) -> int:
        """At start-up: associations open when the last process died will never be released."""
        with self._transaction() as db:
            return db.execute(
                "UPDATE associations SET closed_at = ? WHERE closed_at IS NULL", (closed_at,)
            ).rowcount

    def ready_studies(self, now: float, stable_seconds: float) -> list[str]:
        """Studies with unscored instances, no open association, quiet for ``stable_seconds``."""
        with self._lock:
            rows = self._db.execute(
                """SELECT i.study_instance_uid FROM instances i
                   JOIN associations a ON a.id = i.association_id
                   LEFT JOIN studies s ON s.study_instance_uid = i.study_instance_uid
                   GROUP BY i.study_instance_uid
                   HAVING SUM(i.state = 'received') > 0
                      AND SUM(a.closed_at IS NULL) = 0
                      AND MAX(i.received_at) <= ?
                      AND COALESCE(MAX(s.not_before), 0) <= ?
                   ORDER BY MAX(i.received_at)""",
                (now - stable_seconds, now),
            ).fetchall()
        return [r[0] for r in rows]

    def pending_instances(self, study_instance_uid: str) -> list[InstanceRow]:
        with self._lock:
            rows = self._db.execute(
                """SELECT sop_instance_uid, study_instance_uid, sop_class_uid, path FROM instances
                   WHERE study_instance_uid = ? AND state = 'received'
                   ORDER BY received_at, sop_instance_uid""",
                (study_instance_uid,),
            ).fetchall()
        return [InstanceRow(r[0], r[1], r[2], Path(r[3])) for r in rows]

    def postpone_study(self, study_instance_uid: str, until: float, first_try: float) -> None:
        with self._transaction() as db:
            db.execute(
                """INSERT INTO studies (study_instance_uid, first_try, not_before)
                   VALUES (?, ?, ?)
                   ON CONFLICT (study_instance_uid) DO UPDATE
                   SET not_before = excluded.not_before""",
                (study_instance_uid, first_try, until),
            )

    def first_try(self, study_instance_uid: str) -> float | None:
        with self._lock:
            row = self._db.execute(
                "SELECT first_try FROM studies WHERE study_instance_uid = ?", (study_instance_uid,)
            ).fetchone()
        return None if row is None else float(row[0])

    def complete(
        self,
        reported: Sequence[str],
        failed: Sequence[tuple[str, str]],
        outbox: Sequence[OutboxItem],
        now: float,
    ) -> None:
        """Mark instances done and enqueue what they owe, atomically (exactly-once processing)."""
        with self._transaction() as db:
            db.executemany(
                """INSERT OR IGNORE INTO outbox (key, destination, path, next_attempt_at,
                       enqueued_at) VALUES (?, ?, ?, ?, ?)""",
                [(o.key, o.destination, str(o.path), now, now) for o in outbox],
            )
            db.executemany(
                "UPDATE instances SET state = 'reported', error = NULL WHERE sop_instance_uid = ?",
                [(uid,) for uid in reported],
            )
            db.executemany(
                "UPDATE instances SET state = 'failed', error = ? WHERE sop_instance_uid = ?",
                [(error, uid) for uid, error in failed],
            )

    def due_outbox(self, now: float, limit: int) -> list[OutboxItem]:
        with self._lock:
            rows = self._db.execute(
                """SELECT key, destination, path, attempts FROM outbox
                   WHERE delivered_at IS NULL AND next_attempt_at <= ?
                   ORDER BY next_attempt_at LIMIT ?""",
                (now, limit),
            ).fetchall()
        return [OutboxItem(r[0], r[1], Path(r[2]), int(r[3])) for r in rows]

    def delivered(self, key: str, now: float) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE outbox SET delivered_at = ?, attempts = attempts + 1 WHERE key = ?",
                (now, key),
            )

    def retry_later(self, key: str, error: str, next_attempt_at: float) -> None:
        with self._transaction() as db:
            db.execute(
                """UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?
                   WHERE key = ?""",
                (error, next_attempt_at, key),
            )

    def outbox_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                """SELECT CASE WHEN delivered_at IS NULL THEN 'owed' ELSE 'delivered' END, COUNT(*)
                   FROM outbox GROUP BY 1"""
            ).fetchall()
        return {"owed": 0, "delivered": 0, **{r[0]: int(r[1]) for r in rows}}
