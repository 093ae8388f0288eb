"""The embedded queue backend: one SQLite file in WAL mode with synchronous=FULL, so a committed row survives a crash
or power loss. Connections are lent from a pool, one caller at a time each, and go back after every transaction or
read (a connection per thread would leak two file descriptors with every association thread pynetdicom starts);
SQLite serialises the writers, and every write transaction takes the write lock at once (BEGIN IMMEDIATE), so a
claim or a compare-and-set sees no one else's change between its read and its write.

For one host: the processes sharing the file (the node and its worker process, `cxrnode jobs`) must see the same
file system with working locks; a network file system is not one. Several hosts share a queue on PostgreSQL."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from node.queue import (
    FORGET_NODES_AFTER_S,
    LEASED,
    UNFINISHED,
    Job,
    JobState,
    NewJob,
    NodeInfo,
    QueueError,
    QueueSchemaError,
    QueueUnavailable,
    ResultObject,
    WakeUp,
    Work,
    holder_is_gone,
    revive_target,
)
from node.queue.migrations import migrations

# Columns added by releases before schema versions, for a queue.sqlite written then (user_version 0).
ADDED_COLUMNS = {
    "accession_number": "TEXT NOT NULL DEFAULT ''",
    "study_date": "TEXT NOT NULL DEFAULT ''",
    "finding": "TEXT",
    "model_version": "TEXT",
}
HELD = ",".join(f"'{s.value}'" for s in LEASED)


class SQLiteQueue:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.shared = False  # the processes of one host
        self._idle: list[sqlite3.Connection] = []  # the pool: connections no caller holds
        self._opened: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._listeners: dict[Work, list[WakeUp]] = {work: [] for work in Work}
        try:
            self._migrate()
        except sqlite3.Error as error:
            raise QueueError(f"{self.path}: cannot create the job tables ({error})") from error

    def _migrate(self) -> None:
        """Apply the migrations this file lacks (PRAGMA user_version), all in one write transaction: a second
        process opening the file at the same time waits for the lock, then finds them applied."""
        known = migrations("sqlite")
        with self._transaction() as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > len(known):
                raise QueueSchemaError(
                    f"{self.path}: schema version {version} was written by a newer cxrnode (this one knows up to "
                    f"{len(known)}); run that version, or a newer one"
                )
            for migration in known[version:]:
                for statement in migration.statements():
                    db.execute(statement)
                if migration.version == 1:  # a file from before schema versions may lack later columns
                    present = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
                    for column, declaration in ADDED_COLUMNS.items():
                        if column not in present:
                            db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {declaration}")
            if version < len(known):
                db.execute(f"PRAGMA user_version = {len(known)}")

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

    def _error(self, error: sqlite3.Error, what: str = "") -> QueueError:
        text = f"{self.path}: {what}{error}"
        if isinstance(error, sqlite3.OperationalError) and "locked" in str(error):
            return QueueUnavailable(text + " (another process held the write lock for 30 s)")
        return QueueError(text)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE (the write lock at once, so two writers never deadlock upgrading) ... COMMIT, or ROLLBACK
        on any error; sqlite3 errors become QueueError."""
        with self._borrowed() as db:
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as error:
                raise self._error(error) from error
            try:
                yield db
            except BaseException as error:
                db.execute("ROLLBACK")
                if isinstance(error, sqlite3.Error):
                    raise self._error(error) from error
                raise
            try:
                db.execute("COMMIT")
            except sqlite3.Error as commit_error:
                db.execute("ROLLBACK")
                raise self._error(commit_error, "commit failed: ") from commit_error

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        try:
            with self._borrowed() as db:
                return db.execute(sql, params).fetchall()
        except sqlite3.Error as error:
            raise self._error(error) from error

    def _announce(self, *states: JobState) -> None:
        """After a commit: wake this object's listeners for the work the new states make."""
        for work, state in ((Work.INFER, JobState.RECEIVED), (Work.SEND, JobState.SENDING)):
            if state in states:
                for wake in list(self._listeners[work]):
                    wake.set()

    # -- the Queue contract -----------------------------------------------------------------------------------------

    def add(self, job: NewJob, objects: Mapping[str, bytes | memoryview] | None = None) -> tuple[int, bool]:
        if objects:
            raise QueueError(f"{self.path}: a SQLite queue keeps no objects; use a file:// store with it")
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
        self._announce(job.state)
        return int(cursor.lastrowid or 0), True

    def claim(self, limit: int, node_id: str, lease_s: float) -> list[Job]:
        now = time.time()
        with self._transaction() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE state = 'received' OR (state IN ('inferring', 'writing')"
                " AND lease_until <= ?) ORDER BY id LIMIT ?",
                (now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE jobs SET state = 'inferring', owner = ?, lease_until = ?, updated_at = ?, claims = claims + 1"
                " WHERE id = ?",
                [(node_id, now + lease_s, now, row["id"]) for row in rows],
            )
        return [
            _job(row, state=JobState.INFERRING, owner=node_id, lease_until=now + lease_s, claims=row["claims"] + 1)
            for row in rows
        ]

    def hand_back(self, job_ids: Sequence[int], node_id: str, *, error: str | None = None) -> list[int]:
        if not job_ids:
            return []
        marks = ",".join("?" * len(job_ids))
        with self._transaction() as db:
            rows = db.execute(
                "UPDATE jobs SET state = 'received', owner = NULL, lease_until = 0, claims = MAX(claims - 1, 0),"
                f" error = ?, updated_at = ? WHERE id IN ({marks}) AND owner = ?"
                " AND state IN ('inferring', 'writing') RETURNING id",
                [error, time.time(), *job_ids, node_id],
            ).fetchall()
        if rows:
            self._announce(JobState.RECEIVED)
        return sorted(int(row["id"]) for row in rows)

    def renew(self, job_ids: Sequence[int], node_id: str, lease_s: float) -> list[int]:
        if not job_ids:
            return []
        marks = ",".join("?" * len(job_ids))
        with self._transaction() as db:
            rows = db.execute(
                f"UPDATE jobs SET lease_until = ? WHERE id IN ({marks}) AND owner = ? AND state IN ({HELD})"
                " RETURNING id",
                [time.time() + lease_s, *job_ids, node_id],
            ).fetchall()
        return sorted(int(row["id"]) for row in rows)

    def claim_due(self, now: float, limit: int, node_id: str, lease_s: float) -> list[Job]:
        clock = time.time()
        with self._transaction() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE state = 'sending' AND next_attempt_at <= ? AND lease_until <= ?"
                " ORDER BY next_attempt_at, id LIMIT ?",
                (now, clock, limit),
            ).fetchall()
            db.executemany(
                "UPDATE jobs SET owner = ?, lease_until = ? WHERE id = ?",
                [(node_id, clock + lease_s, row["id"]) for row in rows],
            )
        return [_job(row, owner=node_id, lease_until=clock + lease_s) for row in rows]

    def set_state(
        self,
        job_id: int,
        state: JobState,
        *,
        expect: JobState | None = None,
        node_id: str | None = None,
        error: str | None = None,
    ) -> bool:
        keeps_lease = state in (JobState.INFERRING, JobState.WRITING)
        sql = "UPDATE jobs SET state = ?, error = ?, updated_at = ?"
        sql += "" if keeps_lease else ", owner = NULL, lease_until = 0"
        sql, params = _guarded(sql + " WHERE id = ?", [state.value, error, time.time(), job_id], expect, node_id)
        with self._transaction() as db:
            moved = db.execute(sql, params).rowcount == 1
        if moved:
            self._announce(state)
        return moved

    def set_results(
        self,
        job_id: int,
        results: Sequence[ResultObject],
        state: JobState,
        *,
        finding: Mapping[str, object] | None = None,
        model_version: str | None = None,
        expect: JobState | None = None,
        node_id: str | None = None,
    ) -> bool:
        sql, params = _guarded(
            "UPDATE jobs SET results = ?, state = ?, error = NULL, attempts = 0, next_attempt_at = 0,"
            " delivered = '[]', finding = ?, model_version = ?, updated_at = ?, owner = NULL, lease_until = 0"
            " WHERE id = ?",
            [
                json.dumps([r.__dict__ for r in results]),
                state.value,
                None if finding is None else json.dumps(finding),
                model_version,
                time.time(),
                job_id,
            ],
            expect,
            node_id,
        )
        with self._transaction() as db:
            done = db.execute(sql, params).rowcount == 1
        if done:
            self._announce(state)
        return done

    def record_attempt(
        self,
        job_id: int,
        *,
        delivered: Sequence[str],
        error: str | None,
        next_attempt_at: float,
        state: JobState,
        node_id: str | None = None,
    ) -> bool:
        sql, params = _guarded(
            "UPDATE jobs SET delivered = ?, error = ?, next_attempt_at = ?, state = ?, attempts = attempts + ?,"
            " updated_at = ?, owner = NULL, lease_until = 0 WHERE id = ?",
            [
                json.dumps(sorted(delivered)),
                error,
                next_attempt_at,
                state.value,
                1 if error else 0,
                time.time(),
                job_id,
            ],
            JobState.SENDING,
            node_id,
        )
        with self._transaction() as db:
            return db.execute(sql, params).rowcount == 1

    def add_delivered(self, job_id: int, destination: str, *, node_id: str) -> bool:
        with self._transaction() as db:  # BEGIN IMMEDIATE: nobody writes between the read and the write
            row = db.execute(
                "SELECT delivered FROM jobs WHERE id = ? AND state = 'sending' AND owner = ?", (job_id, node_id)
            ).fetchone()
            if row is None:
                return False
            names = sorted(set(json.loads(row["delivered"])) | {destination})
            db.execute(
                "UPDATE jobs SET delivered = ?, updated_at = ? WHERE id = ?", (json.dumps(names), time.time(), job_id)
            )
        return True

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
        where, params = ["1"], []
        if state is not None:
            where.append("state = ?")
            params.append(state.value)
        if before is not None:
            where.append("id < ?")
            params.append(before)
        rows = self._read(f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?", [*params, limit])
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
                rows = db.execute("SELECT * FROM jobs WHERE state IN ('dead', 'failed') ORDER BY id").fetchall()
            else:
                marks = ",".join("?" * len(job_ids))
                rows = db.execute(f"SELECT * FROM jobs WHERE id IN ({marks}) ORDER BY id", list(job_ids)).fetchall()
            revived = []
            for row in rows:
                target = revive_target(JobState(row["state"]), bool(row["spool_path"]), row["results"] != "[]")
                if target is None:
                    continue
                db.execute(
                    "UPDATE jobs SET state = ?, attempts = 0, next_attempt_at = 0, delivered = '[]', error = NULL,"
                    " owner = NULL, lease_until = 0, claims = 0, updated_at = ? WHERE id = ?",
                    (target.value, now, row["id"]),
                )
                revived.append(_job(row, state=target, owner=None, lease_until=0.0, claims=0))
        self._announce(*(job.state for job in revived))
        return revived

    def recover(self, node_id: str) -> int:
        now = time.time()
        with self._transaction() as db:
            owners = [row["owner"] for row in db.execute("SELECT DISTINCT owner FROM jobs WHERE owner IS NOT NULL")]
            gone = [owner for owner in owners if owner == node_id or holder_is_gone(owner)]
            marks = ",".join("?" * len(gone)) or "NULL"
            resumed = db.execute(
                "UPDATE jobs SET state = 'received', owner = NULL, lease_until = 0, updated_at = ?"
                f" WHERE state IN ('inferring', 'writing') AND (lease_until <= ? OR owner IN ({marks}))",
                [now, now, *gone],
            ).rowcount
            db.execute(
                f"UPDATE jobs SET owner = NULL, lease_until = 0 WHERE state = 'sending' AND owner IN ({marks})", gone
            )
        if resumed:
            self._announce(JobState.RECEIVED)
        return resumed

    def heartbeat(self, node_id: str, roles: Sequence[str], host: str, started_at: float) -> None:
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO nodes (node_id, roles, host, started_at, last_seen) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (node_id) DO UPDATE SET roles = excluded.roles, host = excluded.host,"
                " started_at = excluded.started_at, last_seen = excluded.last_seen",
                (node_id, ",".join(roles), host, started_at, now),
            )
            db.execute("DELETE FROM nodes WHERE last_seen < ?", (now - FORGET_NODES_AFTER_S,))

    def nodes(self) -> list[NodeInfo]:
        rows = self._read(
            "SELECT * FROM nodes WHERE last_seen >= ? ORDER BY last_seen DESC, node_id",
            (time.time() - FORGET_NODES_AFTER_S,),
        )
        return [_node(row) for row in rows]

    def listen(self, work: Work, wake: WakeUp) -> None:
        self._listeners[work].append(wake)

    def close(self) -> None:
        with self._lock:
            for db in self._opened:
                try:
                    db.close()
                except sqlite3.Error:
                    pass
            self._opened.clear()
            self._idle.clear()
            for wakes in self._listeners.values():
                wakes.clear()


def _guarded(sql: str, params: list[object], expect: JobState | None, node_id: str | None) -> tuple[str, list[object]]:
    """The compare part of a compare-and-set: the expected state and holder, when given."""
    if expect is not None:
        sql += " AND state = ?"
        params.append(expect.value)
    if node_id is not None:
        sql += " AND owner = ?"
        params.append(node_id)
    return sql, params


def _node(row: sqlite3.Row) -> NodeInfo:
    return NodeInfo(
        node_id=row["node_id"],
        roles=tuple(r for r in row["roles"].split(",") if r),
        host=row["host"],
        started_at=float(row["started_at"]),
        last_seen=float(row["last_seen"]),
    )


def _job(row: sqlite3.Row, **replaced: object) -> Job:
    job = Job(
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
        state=JobState(row["state"]),
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
        owner=row["owner"],
        lease_until=float(row["lease_until"]),
        claims=int(row["claims"]),
    )
    return replace(job, **replaced) if replaced else job  # type: ignore[arg-type]
