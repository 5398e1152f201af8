"""What the service has received, processed and still owes, in one SQLite file.

``StateStore`` is the interface the service uses; ``SqliteStateStore`` is the embedded default.
A server database can replace it by implementing the same protocol. SQLite runs in WAL mode
with ``synchronous=FULL``: a row is on disk when its transaction commits, so an acknowledged
instance survives a SIGKILL. Instances arriving together on several associations share one
commit (group commit): each caller returns once a commit holding its row is durable.

A study is ready to score when no association that brought one of its instances is still open
and then: at once, when every instance (scored or not) came over one association (its release
says the sender is done); otherwise once nothing arrived for ``stable_seconds`` (several
associations: another one may be on its way).

The schema carries its version in ``PRAGMA user_version`` and migrates forward on open, so the
state file of an older release keeps what it owes. A study or delivery that keeps failing is
*parked*: it stays in the database with its reason, is no longer tried, and can be re-queued.

The operator commands (``dermfusion status``, ``resend``, ``requeue``) open the file with
``SqliteStateStore.open_existing`` beside the running service: never creating or migrating it,
read-only where they only look, and only for as long as one command takes.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Self

from dicom_io.spool import PRIVATE_FILE_MODE, is_whole, private_directory


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
    rejections: int = 0  # failed attempts that retrying as-is would not fix; parked at the limit
    # The study the report is about, so a study's reports can be sent again (`dermfusion
    # resend`); None for an item enqueued before schema version 2, which did not record it.
    study_instance_uid: str | None = None


@dataclass(frozen=True)
class ParkedItem:
    """A study or a delivery that is no longer tried, and why (one line, no patient data)."""

    kind: str  # "study" or "outbox"
    key: str  # StudyInstanceUID, or the outbox key
    reason: str
    attempts: int
    parked_at: float
    destination: str | None = None  # a delivery's destination; None for a study
    # The study concerned: the key of a parked study; for a delivery, the study its report is
    # about (what to give `dermfusion resend`), None when enqueued before schema version 2.
    study_instance_uid: str | None = None


@dataclass(frozen=True)
class OutboxBacklog:
    """What one destination is owed and since when: a growing age means delivery is stuck."""

    destination: str
    owed: int
    oldest_enqueued_at: float | None  # None when nothing is owed


@dataclass(frozen=True)
class FailedInstance:
    """A received instance that will never be scored, and why (not retried: it is the file)."""

    sop_instance_uid: str
    study_instance_uid: str
    reason: str  # the recorded error without the spool path it starts with (the UID names it)
    received_at: float


@dataclass(frozen=True)
class ExpiredStudy:
    """A study that owes nothing and was last touched before the retention cut-off: its spool
    files and the report files of its deliveries (all delivered) may go."""

    study_instance_uid: str
    spool_files: tuple[Path, ...]
    report_files: tuple[Path, ...]


@dataclass(frozen=True)
class ScoredResult:
    """One scored image as the status page shows it: UIDs and numbers, never patient data."""

    sop_instance_uid: str  # the source image
    study_instance_uid: str
    sr_sop_instance_uid: str  # names the report files (<uid>.dcm, .json, _saliency.png)
    probability: float
    threshold: float
    suspected: bool
    model: str  # "name version"
    scored_at: float


@dataclass(frozen=True)
class DeliveryState:
    """Where one report stands with its destination."""

    key: str
    destination: str
    study_instance_uid: str | None
    attempts: int
    delivered_at: float | None
    parked_at: float | None
    last_error: str | None


class StateStore(Protocol):
    def record_instance(
        self,
        row: InstanceRow,
        association_id: str,
        received_at: float,
        checksum: int | None = None,
    ) -> None: ...
    def close_association(self, association_id: str, closed_at: float) -> None: ...
    def close_all_associations(self, closed_at: float) -> int: ...
    def forget_unspooled_instances(self) -> int: ...
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
        results: Sequence[ScoredResult] = (),
    ) -> None: ...
    def due_outbox(self, now: float, limit: int) -> list[OutboxItem]: ...
    def delivered(self, key: str, now: float) -> None: ...
    def retry_later(self, key: str, error: str, next_attempt_at: float) -> None: ...
    def reject_delivery(
        self, key: str, reason: str, now: float, next_attempt_at: float | None
    ) -> None: ...
    def outbox_counts(self) -> dict[str, int]: ...
    def study_attempts(self, study_instance_uid: str) -> int: ...
    def record_study_failure(
        self, study_instance_uid: str, reason: str, now: float, retry_at: float | None
    ) -> int: ...
    def clear_study_failures(self, study_instance_uid: str) -> None: ...
    def parked(self) -> list[ParkedItem]: ...
    def requeue_parked_studies(self, study_instance_uids: Sequence[str] = ()) -> int: ...
    def requeue_parked_deliveries(self, now: float, keys: Sequence[str] = ()) -> int: ...
    def outbox_backlog(self) -> list[OutboxBacklog]: ...
    def failed_instances(self, limit: int) -> list[FailedInstance]: ...
    def knows_study(self, study_instance_uid: str) -> bool: ...
    def requeue_study_deliveries(self, study_instance_uid: str, now: float) -> dict[str, int]: ...
    def expired_studies(self, cutoff: float, limit: int) -> list[ExpiredStudy]: ...
    def forget_study(self, study_instance_uid: str) -> None: ...
    def studies_waiting(self) -> int: ...
    def recent_results(self, studies: int) -> list[ScoredResult]: ...
    def deliveries(self, study_instance_uids: Sequence[str]) -> list[DeliveryState]: ...


# Version 0: the schema of 0.5.0, which set no user_version. Created as-is on a new file, then
# migrated like an old one, so there is one path to the current schema.
_SCHEMA_V0 = """
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

# _MIGRATIONS[n] takes the schema from version n to n + 1.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: failures counted, parking with a reason
        "ALTER TABLE studies ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE studies ADD COLUMN last_error TEXT",
        "ALTER TABLE studies ADD COLUMN parked_at REAL",
        "ALTER TABLE outbox ADD COLUMN rejections INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE outbox ADD COLUMN parked_at REAL",
    ),
    (  # 2: each delivery knows its study, so a study's reports can be sent again
        "ALTER TABLE outbox ADD COLUMN study_instance_uid TEXT",
        "CREATE INDEX IF NOT EXISTS outbox_by_study ON outbox (study_instance_uid)",
    ),
    (  # 3: each scored image's result, for the status page (UIDs and numbers only)
        """CREATE TABLE IF NOT EXISTS results (
               sop_instance_uid TEXT PRIMARY KEY,
               study_instance_uid TEXT NOT NULL,
               sr_sop_instance_uid TEXT NOT NULL,
               probability REAL NOT NULL,
               threshold REAL NOT NULL,
               suspected INTEGER NOT NULL,
               model TEXT NOT NULL,
               scored_at REAL NOT NULL
           )""",
        "CREATE INDEX IF NOT EXISTS results_by_time ON results (scored_at)",
        "CREATE INDEX IF NOT EXISTS results_by_study ON results (study_instance_uid)",
    ),
    (  # 4: the CRC-32 of a spool file flushed with its row, checked after a crash
        "ALTER TABLE instances ADD COLUMN spool_crc32 INTEGER",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)
# Seconds an operator command waits for the service's write lock (its transactions are short).
OPERATOR_BUSY_TIMEOUT_SECONDS = 10.0


class SchemaVersionError(RuntimeError):
    """The state file was written by a newer release: opening it could lose what it records."""


def _owner_only(path: Path) -> None:
    """Create the database file 0600 before SQLite opens it (SQLite would take the umask's
    mode, and gives its -wal and -shm files the database's), or tighten an older one."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
    finally:
        os.close(fd)


class StateDatabaseError(RuntimeError):
    """The state file an operator command needs is absent, or not at this release's schema
    (only the service creates and migrates it, so a command never changes what it records)."""


@dataclass
class _Arrival:
    """One ``record_instance`` call waiting for a commit that holds its row."""

    row: InstanceRow
    association_id: str
    received_at: float
    checksum: int | None
    done: bool = False
    alone: bool = False  # its batch failed: commit it by itself, for its own error
    error: BaseException | None = field(default=None, repr=False)


class SqliteStateStore:
    """The embedded state store. Thread-safe: one connection guarded by a lock."""

    def __init__(self, path: Path) -> None:
        private_directory(path.parent)
        _owner_only(path)
        self._lock = threading.Lock()
        self._arrivals: list[_Arrival] = []
        self._committing = False
        self._arrived = threading.Condition(threading.Lock())
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        for suffix in ("-wal", "-shm"):  # SQLite gives them the database's mode; make sure
            sidecar = path.with_name(path.name + suffix)
            if sidecar.exists():
                os.chmod(sidecar, PRIVATE_FILE_MODE)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    @classmethod
    def open_existing(cls, path: Path, *, read_only: bool = False) -> Self:
        """Open the file of a (possibly running) service for an operator command.

        Unlike the constructor it never creates the file or migrates it: a typo in
        ``--config`` must not leave an empty database behind, and the running service owns the
        schema. ``read_only`` opens it so that the command cannot change anything. WAL mode
        lets it read while the service writes; writes wait up to
        OPERATOR_BUSY_TIMEOUT_SECONDS for the service's short transactions.
        """
        if not path.is_file():
            raise StateDatabaseError(f"no state database at {path}")
        db = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode={'ro' if read_only else 'rw'}",
            uri=True,
            check_same_thread=False,
            isolation_level=None,
            timeout=OPERATOR_BUSY_TIMEOUT_SECONDS,
        )
        try:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version != SCHEMA_VERSION:
                remedy = (
                    "start `dermfusion serve` once to migrate it"
                    if version < SCHEMA_VERSION
                    else "it was written by a newer release"
                )
                raise StateDatabaseError(
                    f"state database {path} has schema {version}, this release reads "
                    f"{SCHEMA_VERSION}: {remedy}"
                )
            if not read_only:
                db.execute("PRAGMA synchronous=FULL")
                db.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            db.close()
            raise
        store = cls.__new__(cls)
        store._lock = threading.Lock()
        store._arrivals = []
        store._committing = False
        store._arrived = threading.Condition(threading.Lock())
        store._db = db
        return store

    def _migrate(self) -> None:
        """Bring the file to SCHEMA_VERSION in one transaction: all steps or none."""
        with self._transaction() as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"state database schema {version} is newer than this release's {SCHEMA_VERSION}"
                )
            if version == SCHEMA_VERSION:
                return
            if version == 0:
                for statement in filter(str.strip, _SCHEMA_V0.split(";")):
                    db.execute(statement)
            for step in _MIGRATIONS[version:]:
                for statement in step:
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

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

    def record_instance(
        self,
        row: InstanceRow,
        association_id: str,
        received_at: float,
        checksum: int | None = None,
    ) -> None:
        """A re-sent instance refreshes its arrival but keeps its state: it is not scored twice.
        ``checksum``: the CRC-32 the spool gave for a file flushed together with this row (None:
        the file was whole before the row was written), for ``forget_unspooled_instances``.

        Durable when this returns. Concurrent callers are committed together: one waits for the
        commit in progress, then commits every row that arrived meanwhile in one transaction
        (one WAL sync for all); if that batch fails, each row is tried by itself, so an error
        reaches only the instance it belongs to.
        """
        arrival = _Arrival(row, association_id, received_at, checksum)
        with self._arrived:
            self._arrivals.append(arrival)
            while self._committing and not arrival.done:
                self._arrived.wait()
            lead = not arrival.done  # take everything waiting, ours included
            if lead:
                batch, self._arrivals = self._arrivals, []
                self._committing = True
        if lead:
            error = self._insert_arrivals(batch)
            with self._arrived:
                for waiting in batch:
                    waiting.alone = error is not None and len(batch) > 1
                    waiting.error = None if waiting.alone else error
                    waiting.done = True
                self._committing = False
                self._arrived.notify_all()
        if arrival.alone:
            arrival.error = self._insert_arrivals([arrival])
        if arrival.error is not None:
            raise arrival.error

    def _insert_arrivals(self, batch: list[_Arrival]) -> BaseException | None:
        """Commit the rows of ``batch`` in one transaction; the error, for their callers."""
        try:
            with self._transaction() as db:
                db.executemany(
                    "INSERT OR IGNORE INTO associations (id, opened_at) VALUES (?, ?)",
                    [(a.association_id, a.received_at) for a in batch],
                )
                db.executemany(
                    """INSERT INTO instances (sop_instance_uid, study_instance_uid,
                           sop_class_uid, path, association_id, received_at, spool_crc32)
                       VALUES (?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT (sop_instance_uid) DO UPDATE SET
                           association_id = excluded.association_id,
                           received_at = excluded.received_at,
                           path = excluded.path,
                           spool_crc32 = excluded.spool_crc32""",
                    [
                        (
                            a.row.sop_instance_uid,
                            a.row.study_instance_uid,
                            a.row.sop_class_uid,
                            str(a.row.path),
                            a.association_id,
                            a.received_at,
                            a.checksum,
                        )
                        for a in batch
                    ],
                )
        except BaseException as error:  # noqa: BLE001 - raised by the callers whose rows these are
            return error
        return None

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

    def forget_unspooled_instances(self) -> int:
        """At start-up, before the listener: forget instances still to be scored whose spool
        file is missing or not whole (``dicom_io.spool.is_whole``); returns how many.

        The listener commits an instance's row while its file is flushed, and acknowledges the
        instance only once both are durable: a power cut in between can leave the row with a
        partial file, or none. That instance was never acknowledged, so the sender still has
        it: forgetting the row lets its re-send be a new arrival (a row kept would be scored as
        a failure, and the re-send would then not be scored). A file that cannot be read is
        given the benefit of the doubt: its row stays.
        """
        with self._lock:
            rows = self._db.execute(
                """SELECT sop_instance_uid, path, spool_crc32 FROM instances
                   WHERE state = 'received'"""
            ).fetchall()
        partial = [(sop,) for sop, path, crc in rows if not _spooled_whole(Path(path), crc)]
        if partial:
            with self._transaction() as db:
                db.executemany(
                    "DELETE FROM instances WHERE sop_instance_uid = ? AND state = 'received'",
                    partial,
                )
        return len(partial)

    def ready_studies(self, now: float, stable_seconds: float) -> list[str]:
        """Studies with unscored instances, none of whose associations is still open, and:
        every instance (scored or not) received over one association, which is closed: ready
        at once (the sender is done with the study); over several associations: quiet for
        ``stable_seconds`` since the last arrival (more may be on their way).

        A postponed study waits until its ``not_before``. A parked study is left out until it
        is re-queued, or an instance arrives after it was parked (the PACS re-sent it, or the
        study grew): that earns it another try.
        """
        with self._lock:
            rows = self._db.execute(
                """SELECT i.study_instance_uid FROM instances i
                   JOIN associations a ON a.id = i.association_id
                   LEFT JOIN studies s ON s.study_instance_uid = i.study_instance_uid
                   WHERE i.study_instance_uid IN (
                       SELECT study_instance_uid FROM instances WHERE state = 'received')
                   GROUP BY i.study_instance_uid
                   HAVING SUM(a.closed_at IS NULL) = 0
                      AND (COUNT(DISTINCT i.association_id) = 1 OR MAX(i.received_at) <= :quiet)
                      AND COALESCE(MAX(s.not_before), 0) <= :now
                      AND (MAX(s.parked_at) IS NULL OR MAX(i.received_at) > MAX(s.parked_at))
                   ORDER BY MAX(i.received_at)""",
                {"quiet": now - stable_seconds, "now": now},
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
        results: Sequence[ScoredResult] = (),
    ) -> None:
        """Mark instances done and enqueue what they owe, atomically (exactly-once processing)."""
        with self._transaction() as db:
            db.executemany(
                """INSERT OR REPLACE INTO results (sop_instance_uid, study_instance_uid,
                       sr_sop_instance_uid, probability, threshold, suspected, model, scored_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                [
                    (
                        r.sop_instance_uid,
                        r.study_instance_uid,
                        r.sr_sop_instance_uid,
                        r.probability,
                        r.threshold,
                        int(r.suspected),
                        r.model,
                        r.scored_at,
                    )
                    for r in results
                ],
            )
            db.executemany(
                """INSERT OR IGNORE INTO outbox (key, destination, path, next_attempt_at,
                       enqueued_at, study_instance_uid) VALUES (?, ?, ?, ?, ?, ?)""",
                [
                    (o.key, o.destination, str(o.path), now, now, o.study_instance_uid)
                    for o in outbox
                ],
            )
            db.executemany(
                "UPDATE instances SET state = 'reported', error = NULL WHERE sop_instance_uid = ?",
                [(uid,) for uid in reported],
            )
            db.executemany(
                "UPDATE instances SET state = 'failed', error = ? WHERE sop_instance_uid = ?",
                [(error, uid) for uid, error in failed],
            )
            # A round that is over forgets its timers: instances arriving later start a new
            # round, with its own wait for the FHIR server (a parked study keeps its record).
            done = [uid for uid in reported] + [uid for uid, _ in failed]
            db.executemany(
                """DELETE FROM studies WHERE parked_at IS NULL AND study_instance_uid = (
                       SELECT study_instance_uid FROM instances WHERE sop_instance_uid = ?)
                   AND NOT EXISTS (
                       SELECT 1 FROM instances i
                       WHERE i.study_instance_uid = studies.study_instance_uid
                         AND i.state = 'received')""",
                [(uid,) for uid in done],
            )

    def due_outbox(self, now: float, limit: int) -> list[OutboxItem]:
        with self._lock:
            rows = self._db.execute(
                """SELECT key, destination, path, attempts, rejections, study_instance_uid
                   FROM outbox
                   WHERE delivered_at IS NULL AND parked_at IS NULL AND next_attempt_at <= ?
                   ORDER BY next_attempt_at LIMIT ?""",
                (now, limit),
            ).fetchall()
        return [OutboxItem(r[0], r[1], Path(r[2]), int(r[3]), int(r[4]), r[5]) for r in rows]

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

    def reject_delivery(
        self, key: str, reason: str, now: float, next_attempt_at: float | None
    ) -> None:
        """Count an attempt retrying will not fix; ``next_attempt_at`` None parks the item."""
        with self._transaction() as db:
            db.execute(
                """UPDATE outbox SET attempts = attempts + 1, rejections = rejections + 1,
                       last_error = ?, next_attempt_at = COALESCE(?, next_attempt_at),
                       parked_at = CASE WHEN ? IS NULL THEN ? END
                   WHERE key = ?""",
                (reason, next_attempt_at, next_attempt_at, now, key),
            )

    def outbox_counts(self) -> dict[str, int]:
        """Deliveries owed (still tried), parked (owed, not tried) and delivered."""
        with self._lock:
            rows = self._db.execute(
                """SELECT CASE WHEN delivered_at IS NOT NULL THEN 'delivered'
                               WHEN parked_at IS NOT NULL THEN 'parked' ELSE 'owed' END,
                          COUNT(*)
                   FROM outbox GROUP BY 1"""
            ).fetchall()
        return {"owed": 0, "parked": 0, "delivered": 0, **{r[0]: int(r[1]) for r in rows}}

    def study_attempts(self, study_instance_uid: str) -> int:
        """Failed passes over the study since it last succeeded or was re-queued."""
        with self._lock:
            row = self._db.execute(
                "SELECT attempts FROM studies WHERE study_instance_uid = ?", (study_instance_uid,)
            ).fetchone()
        return 0 if row is None else int(row[0])

    def record_study_failure(
        self, study_instance_uid: str, reason: str, now: float, retry_at: float | None
    ) -> int:
        """Count a failed pass and keep its reason; ``retry_at`` None parks the study.

        Returns the number of failed passes so far.
        """
        with self._transaction() as db:
            db.execute(
                """INSERT INTO studies (study_instance_uid, first_try, not_before, attempts,
                       last_error, parked_at)
                   VALUES (?, ?, COALESCE(?, ?), 1, ?, CASE WHEN ? IS NULL THEN ? END)
                   ON CONFLICT (study_instance_uid) DO UPDATE SET
                       attempts = attempts + 1,
                       last_error = excluded.last_error,
                       not_before = excluded.not_before,
                       parked_at = excluded.parked_at""",
                (study_instance_uid, now, retry_at, now, reason, retry_at, now),
            )
            row = db.execute(
                "SELECT attempts FROM studies WHERE study_instance_uid = ?", (study_instance_uid,)
            ).fetchone()
        return int(row[0])

    def clear_study_failures(self, study_instance_uid: str) -> None:
        """A pass succeeded: earlier failures no longer count towards parking."""
        with self._transaction() as db:
            db.execute(
                """UPDATE studies SET attempts = 0, last_error = NULL, parked_at = NULL
                   WHERE study_instance_uid = ?""",
                (study_instance_uid,),
            )

    def parked(self) -> list[ParkedItem]:
        """Everything parked, oldest first: what an operator has to look at."""
        with self._lock:
            rows = self._db.execute(
                """SELECT 'study', study_instance_uid, COALESCE(last_error, ''), attempts,
                          parked_at, NULL, study_instance_uid
                   FROM studies WHERE parked_at IS NOT NULL
                   UNION ALL
                   SELECT 'outbox', key, COALESCE(last_error, ''), attempts, parked_at,
                          destination, study_instance_uid
                   FROM outbox WHERE parked_at IS NOT NULL AND delivered_at IS NULL
                   ORDER BY 5, 2"""
            ).fetchall()
        return [ParkedItem(r[0], r[1], r[2], int(r[3]), float(r[4]), r[5], r[6]) for r in rows]

    def requeue_parked_studies(self, study_instance_uids: Sequence[str] = ()) -> int:
        """Give parked studies (all, or those named) a fresh set of attempts, now."""
        with self._transaction() as db:
            return db.execute(
                "UPDATE studies SET parked_at = NULL, attempts = 0, not_before = 0"
                " WHERE parked_at IS NOT NULL" + _named("study_instance_uid", study_instance_uids),
                tuple(study_instance_uids),
            ).rowcount

    def requeue_parked_deliveries(self, now: float, keys: Sequence[str] = ()) -> int:
        """Owe parked deliveries (all, or those named) again, due now, with fresh attempts."""
        with self._transaction() as db:
            return db.execute(
                "UPDATE outbox SET parked_at = NULL, rejections = 0, next_attempt_at = ?"
                " WHERE parked_at IS NOT NULL AND delivered_at IS NULL" + _named("key", keys),
                (now, *keys),
            ).rowcount

    def outbox_backlog(self) -> list[OutboxBacklog]:
        """Per destination with anything owed: how many deliveries are still being tried, and
        since when the oldest is owed (parked ones are not counted: they are not tried)."""
        with self._lock:
            rows = self._db.execute(
                """SELECT destination, COUNT(*), MIN(enqueued_at) FROM outbox
                   WHERE delivered_at IS NULL AND parked_at IS NULL
                   GROUP BY destination ORDER BY destination"""
            ).fetchall()
        return [OutboxBacklog(r[0], int(r[1]), float(r[2])) for r in rows]

    def failed_instances(self, limit: int) -> list[FailedInstance]:
        """The most recently received instances that could not be scored, newest first."""
        with self._lock:
            rows = self._db.execute(
                """SELECT sop_instance_uid, study_instance_uid, COALESCE(error, ''), path,
                          received_at
                   FROM instances WHERE state = 'failed'
                   ORDER BY received_at DESC, sop_instance_uid LIMIT ?""",
                (limit,),
            ).fetchall()
        return [
            FailedInstance(r[0], r[1], r[2].removeprefix(f"{r[3]}: "), float(r[4])) for r in rows
        ]

    def knows_study(self, study_instance_uid: str) -> bool:
        """Was anything of this study received, tried or owed? (Tells a mistyped UID apart
        from a study that merely has nothing to re-send.)"""
        with self._lock:
            row = self._db.execute(
                """SELECT EXISTS (SELECT 1 FROM instances WHERE study_instance_uid = ?)
                       OR EXISTS (SELECT 1 FROM studies WHERE study_instance_uid = ?)
                       OR EXISTS (SELECT 1 FROM outbox WHERE study_instance_uid = ?)""",
                (study_instance_uid,) * 3,
            ).fetchone()
        return bool(row[0])

    def requeue_study_deliveries(self, study_instance_uid: str, now: float) -> dict[str, int]:
        """Owe every delivery of the study's reports again, due now: delivered, parked or still
        owed (the peer may have lost what it acknowledged). Returns the count per destination.

        Safe to repeat: the SR keeps its SOP Instance UID and the FHIR creates are conditional.
        A delivered item's ``enqueued_at`` becomes now, so the backlog's age counts from the
        re-send; one that was never delivered keeps its age.
        """
        with self._transaction() as db:
            rows = db.execute(
                """UPDATE outbox SET delivered_at = NULL, parked_at = NULL, rejections = 0,
                       next_attempt_at = ?,
                       enqueued_at = CASE WHEN delivered_at IS NULL THEN enqueued_at ELSE ? END
                   WHERE study_instance_uid = ?
                   RETURNING destination""",
                (now, now, study_instance_uid),
            ).fetchall()
        counts: dict[str, int] = {}
        for (destination,) in rows:
            counts[destination] = counts.get(destination, 0) + 1
        return dict(sorted(counts.items()))

    def expired_studies(self, cutoff: float, limit: int) -> list[ExpiredStudy]:
        """Up to ``limit`` studies that are over: every instance scored or failed, not parked,
        every delivery delivered (none owed or parked), nothing received or delivered since
        ``cutoff``. Oldest first."""
        with self._lock:
            studies = [
                r[0]
                for r in self._db.execute(
                    """SELECT i.study_instance_uid FROM instances i
                       LEFT JOIN studies s ON s.study_instance_uid = i.study_instance_uid
                       GROUP BY i.study_instance_uid
                       HAVING SUM(i.state = 'received') = 0
                          AND MAX(i.received_at) < :cutoff
                          AND MAX(s.parked_at) IS NULL
                          AND NOT EXISTS (
                              SELECT 1 FROM outbox o
                              WHERE o.study_instance_uid = i.study_instance_uid
                                AND (o.delivered_at IS NULL OR o.delivered_at >= :cutoff))
                       ORDER BY MAX(i.received_at) LIMIT :limit""",
                    {"cutoff": cutoff, "limit": limit},
                )
            ]
            out = []
            for study in studies:
                spool = self._db.execute(
                    "SELECT path FROM instances WHERE study_instance_uid = ? ORDER BY path",
                    (study,),
                ).fetchall()
                reports = self._db.execute(
                    "SELECT path FROM outbox WHERE study_instance_uid = ? ORDER BY path", (study,)
                ).fetchall()
                out.append(
                    ExpiredStudy(
                        study,
                        tuple(Path(r[0]) for r in spool),
                        tuple(Path(r[0]) for r in reports),
                    )
                )
        return out

    def forget_study(self, study_instance_uid: str) -> None:
        """Remove every row of a study (and associations no instance refers to any more): an
        instance of it sent again later is a new arrival."""
        with self._transaction() as db:
            for table in ("outbox", "results", "instances", "studies"):
                db.execute(
                    f"DELETE FROM {table} WHERE study_instance_uid = ?", (study_instance_uid,)
                )
            db.execute(
                """DELETE FROM associations WHERE closed_at IS NOT NULL
                   AND id NOT IN (SELECT association_id FROM instances)"""
            )

    def studies_waiting(self) -> int:
        """Studies with instances received and not yet scored (the scoring queue's depth)."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(DISTINCT study_instance_uid) FROM instances WHERE state = 'received'"
            ).fetchone()
        return int(row[0])

    def recent_results(self, studies: int) -> list[ScoredResult]:
        """Every result of the ``studies`` most recently scored studies, newest first (studies
        scored in one pass share its time: the one recorded last is the newer)."""
        with self._lock:
            rows = self._db.execute(
                """SELECT r.sop_instance_uid, r.study_instance_uid, r.sr_sop_instance_uid,
                          r.probability, r.threshold, r.suspected, r.model, r.scored_at
                   FROM results r JOIN (
                       SELECT study_instance_uid, MAX(scored_at) AS latest,
                              MAX(rowid) AS last_row
                       FROM results
                       GROUP BY study_instance_uid ORDER BY latest DESC, last_row DESC LIMIT ?
                   ) recent ON recent.study_instance_uid = r.study_instance_uid
                   ORDER BY recent.latest DESC, recent.last_row DESC, r.sop_instance_uid""",
                (studies,),
            ).fetchall()
        return [
            ScoredResult(r[0], r[1], r[2], float(r[3]), float(r[4]), bool(r[5]), r[6], float(r[7]))
            for r in rows
        ]

    def deliveries(self, study_instance_uids: Sequence[str]) -> list[DeliveryState]:
        """The outbox rows of these studies (delivered, owed or parked)."""
        if not study_instance_uids:
            return []
        with self._lock:
            rows = self._db.execute(
                """SELECT key, destination, study_instance_uid, attempts, delivered_at,
                          parked_at, last_error
                   FROM outbox WHERE 1"""
                + _named("study_instance_uid", study_instance_uids)
                + " ORDER BY key",
                tuple(study_instance_uids),
            ).fetchall()
        return [DeliveryState(r[0], r[1], r[2], int(r[3]), r[4], r[5], r[6]) for r in rows]


def _spooled_whole(path: Path, checksum: int | None) -> bool:
    try:
        return is_whole(path, checksum)
    except OSError:
        return True  # cannot tell (permissions, I/O): keep what may have been acknowledged


def _named(column: str, values: Sequence[str]) -> str:
    """An ``AND column IN (?, …)`` clause for ``values``; empty when none are named (all)."""
    return f" AND {column} IN ({', '.join('?' * len(values))})" if values else ""
