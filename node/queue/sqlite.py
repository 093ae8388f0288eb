"""The embedded queue backend: one SQLite file in WAL mode with synchronous=FULL, so a committed row survives a crash
or power loss. Connections are lent from a pool, one caller at a time each, and go back after every transaction or
read (a connection per thread would leak two file descriptors with every association thread pynetdicom starts);
SQLite serialises the writers."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from node.queue import UNFINISHED, Job, JobState, NewJob, ResultObject

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid    TEXT NOT NULL UNIQUE,
    sop_class_uid       TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    calling_ae          TEXT NOT NULL,
    called_ae           TEXT NOT NULL,
    peer_address        TEXT NOT NULL,
    spool_path          TEXT,
    state               TEXT NOT NULL,
    error               TEXT,
    attempts            INTEGER NOT NULL DEFAULT 0,
    received_at         REAL NOT NULL,
    updated_at          REAL NOT NULL,
    next_attempt_at     REAL NOT NULL DEFAULT 0,
    results             TEXT NOT NULL DEFAULT '[]',
    delivered           TEXT NOT NULL DEFAULT '[]',
    timings             TEXT NOT NULL DEFAULT '{}',
    accession_number    TEXT NOT NULL DEFAULT '',
    study_date          TEXT NOT NULL DEFAULT '',
    finding             TEXT,
    model_version       TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, next_attempt_at, id);
"""

# Columns added after the first release, for a queue.sqlite written by an older cxrnode.
ADDED_COLUMNS = {
    "accession_number": "TEXT NOT NULL DEFAULT ''",
    "study_date": "TEXT NOT NULL DEFAULT ''",
    "finding": "TEXT",
    "model_version": "TEXT",
}


class QueueError(Exception):
    """The queue database could not be read or written (disk full, permissions, corruption)."""


class SQLiteQueue:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._idle: list[sqlite3.Connection] = []  # the pool: connections no caller holds
        self._opened: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        with self._borrowed() as db:
            try:
                db.executescript(SCHEMA)  # executescript manages its own transaction
                present = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
                for column, declaration in ADDED_COLUMNS.items():
                    if column not in present:
                        db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {declaration}")
            except sqlite3.Error as error:
                raise QueueError(f"{self.path}: cannot create the job tables ({error})") from error

    # -- connections ------------------------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=30000")
        except sqlite3.Error as error:
            raise QueueError(f"{self.path}: cannot open the job database ({error})") from error
        db.row_factory = sqlite3.Row
        with self._lock:
            self._opened.append(db)
        return db

    @contextmanager
    def _borrowed(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._idle.pop() if self._idle else None
        if db is None:
            db = self._open()
        try:
            yield db
        finally:
            with self._lock:
                self._idle.append(db)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE (the write lock at once, so two writers never deadlock upgrading) ... COMMIT, or ROLLBACK
        on any error; sqlite3 errors become QueueError."""
        with self._borrowed() as db:
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as error:
                raise QueueError(f"{self.path}: {error}") from error
            try:
                yield db
            except BaseException as error:
                db.execute("ROLLBACK")
                if isinstance(error, sqlite3.Error):
                    raise QueueError(f"{self.path}: {error}") from error
                raise
            try:
                db.execute("COMMIT")
            except sqlite3.Error as commit_error:
                db.execute("ROLLBACK")
                raise QueueError(f"{self.path}: commit failed ({commit_error})") from commit_error

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        try:
            with self._borrowed() as db:
                return db.execute(sql, params).fetchall()
        except sqlite3.Error as error:
            raise QueueError(f"{self.path}: {error}") from error

    # -- the Queue interface ----------------------------------------------------------------------------------------

    def add(self, job: NewJob) -> tuple[int, bool]:
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT id FROM jobs WHERE sop_instance_uid = ?", (job.sop_instance_uid,)).fetchone()
            if row is not None:
                return int(row["id"]), False
            cursor = db.execute(
                "INSERT INTO jobs (sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid,"
                " transfer_syntax_uid, calling_ae, called_ae, peer_address, spool_path, state, error,"
                " received_at, updated_at, accession_number, study_date) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    job.sop_instance_uid,
                    job.sop_class_uid,
                    job.study_instance_uid,
                    job.series_instance_uid,
                    job.transfer_syntax_uid,
                    job.calling_ae,
                    job.called_ae,
                    job.peer_address,
                    job.spool_path,
                    job.state.value,
                    job.error,
                    now,
                    now,
                    job.accession_number,
                    job.study_date,
                ),
            )
            return int(cursor.lastrowid or 0), True

    def claim(self, limit: int) -> list[Job]:
        now = time.time()
        with self._transaction() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE state = ? ORDER BY id LIMIT ?", (JobState.RECEIVED.value, limit)
            ).fetchall()
            db.executemany(
                "UPDATE jobs SET state = ?, updated_at = ? WHERE id = ?",
                [(JobState.INFERRING.value, now, row["id"]) for row in rows],
            )
        return [_job(row, state=JobState.INFERRING) for row in rows]

    def set_state(
        self, job_id: int, state: JobState, *, expect: JobState | None = None, error: str | None = None
    ) -> None:
        with self._transaction() as db:
            sql = "UPDATE jobs SET state = ?, error = ?, updated_at = ? WHERE id = ?"
            params: list[object] = [state.value, error, time.time(), job_id]
            if expect is not None:
                sql += " AND state = ?"
                params.append(expect.value)
            db.execute(sql, params)

    def set_results(
        self,
        job_id: int,
        results: Sequence[ResultObject],
        state: JobState,
        *,
        finding: Mapping[str, object] | None = None,
        model_version: str | None = None,
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET results = ?, state = ?, error = NULL, attempts = 0, next_attempt_at = 0,"
                " delivered = '[]', finding = ?, model_version = ?, updated_at = ? WHERE id = ?",
                (
                    json.dumps([r.__dict__ for r in results]),
                    state.value,
                    None if finding is None else json.dumps(finding),
                    model_version,
                    time.time(),
                    job_id,
                ),
            )

    def due(self, now: float, limit: int) -> list[Job]:
        rows = self._read(
            "SELECT * FROM jobs WHERE state = ? AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?",
            (JobState.SENDING.value, now, limit),
        )
        return [_job(row) for row in rows]

    def next_due_at(self) -> float | None:
        rows = self._read("SELECT MIN(next_attempt_at) AS t FROM jobs WHERE state = ?", (JobState.SENDING.value,))
        value = rows[0]["t"] if rows else None
        return float(value) if value is not None else None

    def record_attempt(
        self,
        job_id: int,
        *,
        delivered: Sequence[str],
        error: str | None,
        next_attempt_at: float,
        state: JobState,
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET delivered = ?, error = ?, next_attempt_at = ?, state = ?,"
                " attempts = attempts + ?, updated_at = ? WHERE id = ?",
                (
                    json.dumps(sorted(delivered)),
                    error,
                    next_attempt_at,
                    state.value,
                    1 if error else 0,
                    time.time(),
                    job_id,
                ),
            )

    def add_timing(self, job_id: int, stage: str, seconds: float) -> None:
        with self._transaction() as db:
            row = db.execute("SELECT timings FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return
            timings = json.loads(row["timings"])
            timings[stage] = round(timings.get(stage, 0.0) + seconds, 4)
            db.execute("UPDATE jobs SET timings = ? WHERE id = ?", (json.dumps(timings), job_id))

    def get(self, job_id: int) -> Job | None:
        rows = self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def find(self, sop_instance_uid: str) -> Job | None:
        rows = self._read("SELECT * FROM jobs WHERE sop_instance_uid = ?", (sop_instance_uid,))
        return _job(rows[0]) if rows else None

    def jobs(self, state: JobState | None = None, limit: int = 100, before: int | None = None) -> list[Job]:
        conditions: list[str] = []
        params: list[object] = []
        if state is not None:
            conditions.append("state = ?")
            params.append(state.value)
        if before is not None:
            conditions.append("id < ?")
            params.append(before)
        where = f"WHERE {' AND '.join(conditions)} " if conditions else ""
        rows = self._read(f"SELECT * FROM jobs {where}ORDER BY id DESC LIMIT ?", [*params, limit])
        return [_job(row) for row in rows]

    def counts(self) -> dict[JobState, int]:
        rows = self._read("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        counts = {state: 0 for state in JobState}
        counts.update({JobState(row["state"]): int(row["n"]) for row in rows})
        return counts

    def oldest_unfinished(self) -> float | None:
        marks = ",".join("?" * len(UNFINISHED))
        rows = self._read(
            f"SELECT MIN(received_at) AS t FROM jobs WHERE state IN ({marks})", [s.value for s in UNFINISHED]
        )
        value = rows[0]["t"] if rows else None
        return float(value) if value is not None else None

    def check_writable(self) -> None:
        with self._transaction():
            pass  # BEGIN IMMEDIATE takes the write lock; the commit of nothing is instant

    def revive(self, job_ids: Sequence[int] | None) -> list[Job]:
        now = time.time()
        with self._transaction() as db:
            if job_ids is None:
                rows = db.execute(
                    "SELECT * FROM jobs WHERE state IN (?, ?) ORDER BY id",
                    (JobState.DEAD.value, JobState.FAILED.value),
                ).fetchall()
            else:
                marks = ",".join("?" * len(job_ids))
                rows = db.execute(f"SELECT * FROM jobs WHERE id IN ({marks}) ORDER BY id", list(job_ids)).fetchall()
            revived = []
            for row in rows:
                state = JobState(row["state"])
                if state is JobState.FAILED or (state is JobState.SKIPPED and row["spool_path"]):
                    target = JobState.RECEIVED
                elif state in (JobState.DEAD, JobState.DONE, JobState.SENDING):
                    target = JobState.SENDING if json.loads(row["results"]) else JobState.RECEIVED
                else:
                    continue  # received / inferring / writing: already on its way
                db.execute(
                    "UPDATE jobs SET state = ?, attempts = 0, next_attempt_at = 0, delivered = ?, error = NULL,"
                    " updated_at = ? WHERE id = ?",
                    (target.value, "[]", now, row["id"]),
                )
                revived.append(_job(row, state=target))
        return revived

    def recover(self) -> int:
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = ?, updated_at = ? WHERE state IN (?, ?)",
                (JobState.RECEIVED.value, time.time(), JobState.INFERRING.value, JobState.WRITING.value),
            )
            return cursor.rowcount

    def close(self) -> None:
        with self._lock:
            for db in self._opened:
                try:
                    db.close()
                except sqlite3.Error:
                    pass
            self._opened.clear()
            self._idle.clear()


def _job(row: sqlite3.Row, state: JobState | None = None) -> Job:
    return Job(
        id=int(row["id"]),
        sop_instance_uid=row["sop_instance_uid"],
        sop_class_uid=row["sop_class_uid"],
        study_instance_uid=row["study_instance_uid"],
        series_instance_uid=row["series_instance_uid"],
        transfer_syntax_uid=row["transfer_syntax_uid"],
        calling_ae=row["calling_ae"],
        called_ae=row["called_ae"],
        peer_address=row["peer_address"],
        spool_path=row["spool_path"],
        state=state or JobState(row["state"]),
        error=row["error"],
        attempts=int(row["attempts"]),
        received_at=float(row["received_at"]),
        updated_at=float(row["updated_at"]),
        next_attempt_at=float(row["next_attempt_at"]),
        results=tuple(ResultObject(**r) for r in json.loads(row["results"])),
        delivered=tuple(json.loads(row["delivered"])),
        timings=json.loads(row["timings"]),
        accession_number=row["accession_number"],
        study_date=row["study_date"],
        finding=None if row["finding"] is None else json.loads(row["finding"]),
        model_version=row["model_version"],
    )
