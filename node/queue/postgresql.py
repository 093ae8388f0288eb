"""The shared queue backend: one PostgreSQL database that any number of nodes, on any hosts, use at once.

- Claims lock the rows they take with `SELECT ... FOR UPDATE SKIP LOCKED`: concurrent claims skip each other's rows
  instead of waiting for them, and a row is re-checked once locked, so a job is never claimed twice.
- Leases and time stamps use the server's clock (`now()`, the transaction's start), so hosts whose clocks disagree
  still agree on when a lease expires. `next_attempt_at` is the sender's own clock, as it computed it.
- Wake-ups are NOTIFYs sent in the transaction that made the work (`node.queue.notifications`).
- Connections come from a psycopg-pool pool; a connection broken by a server restart is noticed when it is lent
  (`check_connection`) and replaced. While the server is away, calls raise QueueUnavailable after `timeout_s`.
- The schema is applied at start (`node/queue/migrations/postgresql/`) inside a transaction that first takes an
  advisory lock, so two nodes starting together apply each migration once.

The password comes from the URL, from PGPASSWORD or from ~/.pgpass (libpq reads both); messages never show it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

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
    redacted,
    revive_target,
)
from node.queue.migrations import migrations
from node.queue.notifications import CHANNELS, Listener

log = logging.getLogger(__name__)

NOW = "EXTRACT(EPOCH FROM now())::float8"
MIGRATION_LOCK = 0x6378726E6F6465  # "cxrnode": the advisory lock held while the schema is applied
HELD = tuple(s.value for s in LEASED)
Row = dict[str, Any]


class PostgreSQLQueue:
    def __init__(self, url: str, *, max_connections: int = 16, timeout_s: float = 5.0) -> None:
        self.url = url
        self.name = redacted(url)
        self._listener: Listener | None = None
        self.shared = True  # any number of nodes, on any hosts
        migrate(url, timeout_s)
        self._pool = ConnectionPool(
            url,
            kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": max(1, round(timeout_s))},
            min_size=1,
            max_size=max_connections,
            timeout=timeout_s,
            check=ConnectionPool.check_connection,
            name="cxrnode-queue",
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=timeout_s * 2)
        except PoolTimeout as error:
            self._pool.close()
            raise QueueUnavailable(f"{self.name}: no connection within {timeout_s * 2:.0f} s") from error

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[Row]]:
        """A connection from the pool in a transaction, committed when the block ends; psycopg errors become
        QueueError (QueueUnavailable when the server cannot be reached)."""
        try:
            with self._pool.connection() as db, db.transaction():
                yield db
        except PoolTimeout as error:
            raise QueueUnavailable(f"{self.name}: no database connection (server down or every one busy)") from error
        except (psycopg.OperationalError, psycopg.InterfaceError) as error:
            raise QueueUnavailable(f"{self.name}: {str(error).strip()}") from error
        except psycopg.Error as error:
            raise QueueError(f"{self.name}: {str(error).strip()}") from error

    def _all(self, sql: str, params: Sequence[object] | Mapping[str, object] = ()) -> list[Row]:
        with self._transaction() as db:
            return db.execute(sql, params).fetchall()

    @staticmethod
    def _notify(db: psycopg.Connection[Row], *states: JobState) -> None:
        """Announce the work the new states make; delivered when the transaction commits."""
        for work, state in ((Work.INFER, JobState.RECEIVED), (Work.SEND, JobState.SENDING)):
            if state in states:
                db.execute("SELECT pg_notify(%s, '')", (CHANNELS[work],))

    # -- the Queue contract -----------------------------------------------------------------------------------------

    def add(self, job: NewJob, objects: Mapping[str, bytes | memoryview] | None = None) -> tuple[int, bool]:
        with self._transaction() as db:
            row = db.execute(
                "INSERT INTO jobs (sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid,"
                " transfer_syntax_uid, calling_ae, called_ae, peer_address, spool_path, state, error, received_at,"
                f" updated_at, accession_number, study_date) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,{NOW},{NOW},%s,%s)"
                " ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING id",
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
                    job.accession_number,
                    job.study_date,
                ),
            ).fetchone()
            if row is None:
                existing = db.execute("SELECT id FROM jobs WHERE sop_instance_uid = %s", (job.sop_instance_uid,))
                return int(existing.fetchone()["id"]), False  # type: ignore[index]
            for key, data in (objects or {}).items():  # the PostgreSQL store's table: one commit with the job
                db.execute(
                    f"INSERT INTO objects (key, data, stored_at) VALUES (%s, %b, {NOW}) ON CONFLICT (key)"
                    " DO UPDATE SET data = EXCLUDED.data, stored_at = EXCLUDED.stored_at",
                    (key, data),
                )
            self._notify(db, job.state)
            return int(row["id"]), True

    def claim(self, limit: int, node_id: str, lease_s: float) -> list[Job]:
        rows = self._all(
            "WITH picked AS (SELECT id FROM jobs WHERE state = 'received'"
            f" OR (state IN ('inferring', 'writing') AND lease_until <= {NOW})"
            " ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
            f" UPDATE jobs SET state = 'inferring', owner = %(node)s, lease_until = {NOW} + %(lease)s,"
            f" updated_at = {NOW}, claims = jobs.claims + 1 FROM picked WHERE jobs.id = picked.id RETURNING jobs.*",
            {"limit": limit, "node": node_id, "lease": lease_s},
        )
        return sorted((_job(row) for row in rows), key=lambda job: job.id)

    def hand_back(self, job_ids: Sequence[int], node_id: str, *, error: str | None = None) -> list[int]:
        if not job_ids:
            return []
        with self._transaction() as db:
            rows = db.execute(
                "UPDATE jobs SET state = 'received', owner = NULL, lease_until = 0, claims = GREATEST(claims - 1, 0),"
                f" error = %s, updated_at = {NOW} WHERE id = ANY(%s) AND owner = %s"
                " AND state IN ('inferring', 'writing') RETURNING id",
                (error, list(job_ids), node_id),
            ).fetchall()
            if rows:
                self._notify(db, JobState.RECEIVED)
        return sorted(int(row["id"]) for row in rows)

    def renew(self, job_ids: Sequence[int], node_id: str, lease_s: float) -> list[int]:
        if not job_ids:
            return []
        rows = self._all(
            f"UPDATE jobs SET lease_until = {NOW} + %s WHERE id = ANY(%s) AND owner = %s AND state = ANY(%s)"
            " RETURNING id",
            (lease_s, list(job_ids), node_id, list(HELD)),
        )
        return sorted(int(row["id"]) for row in rows)

    def claim_due(self, now: float, limit: int, node_id: str, lease_s: float) -> list[Job]:
        rows = self._all(
            "WITH picked AS (SELECT id FROM jobs WHERE state = 'sending' AND next_attempt_at <= %(now)s"
            f" AND lease_until <= {NOW} ORDER BY next_attempt_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
            f" UPDATE jobs SET owner = %(node)s, lease_until = {NOW} + %(lease)s"
            " FROM picked WHERE jobs.id = picked.id RETURNING jobs.*",
            {"now": now, "limit": limit, "node": node_id, "lease": lease_s},
        )
        return sorted((_job(row) for row in rows), key=lambda job: (job.next_attempt_at, job.id))

    def _compare_and_set(
        self, sql: str, params: list[object], expect: JobState | None, node_id: str | None, *announce: JobState
    ) -> bool:
        if expect is not None:
            sql += " AND state = %s"
            params.append(expect.value)
        if node_id is not None:
            sql += " AND owner = %s"
            params.append(node_id)
        with self._transaction() as db:
            done = db.execute(sql + " RETURNING id", params).fetchone() is not None
            if done:
                self._notify(db, *announce)
        return done

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
        sql = f"UPDATE jobs SET state = %s, error = %s, updated_at = {NOW}"
        sql += "" if keeps_lease else ", owner = NULL, lease_until = 0"
        return self._compare_and_set(sql + " WHERE id = %s", [state.value, error, job_id], expect, node_id, state)

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
        return self._compare_and_set(
            "UPDATE jobs SET results = %s, state = %s, error = NULL, attempts = 0, next_attempt_at = 0,"
            f" delivered = '[]', finding = %s, model_version = %s, updated_at = {NOW}, owner = NULL, lease_until = 0"
            " WHERE id = %s",
            [
                Jsonb([r.__dict__ for r in results]),
                state.value,
                None if finding is None else Jsonb(dict(finding)),
                model_version,
                job_id,
            ],
            expect,
            node_id,
            state,
        )

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
        return self._compare_and_set(
            "UPDATE jobs SET delivered = %s, error = %s, next_attempt_at = %s, state = %s, attempts = attempts + %s,"
            f" updated_at = {NOW}, owner = NULL, lease_until = 0 WHERE id = %s",
            [Jsonb(sorted(delivered)), error, next_attempt_at, state.value, 1 if error else 0, job_id],
            JobState.SENDING,
            node_id,
        )

    def add_delivered(self, job_id: int, destination: str, *, node_id: str) -> bool:
        # One UPDATE: a concurrent one waits for the row lock and is then evaluated again on the row as it now is.
        return self._compare_and_set(
            "UPDATE jobs SET delivered = (SELECT jsonb_agg(name ORDER BY name) FROM"
            " (SELECT jsonb_array_elements_text(jobs.delivered) UNION SELECT %s::text) AS names(name)),"
            f" updated_at = {NOW} WHERE id = %s",
            [destination, job_id],
            JobState.SENDING,
            node_id,
        )

    def add_timing(self, job_id: int, stage: str, seconds: float) -> None:
        self._all(
            "UPDATE jobs SET timings = jsonb_set(timings, ARRAY[%(stage)s],"
            " to_jsonb(round(COALESCE((timings->>%(stage)s)::numeric, 0) + %(seconds)s::numeric, 4)))"
            " WHERE id = %(id)s RETURNING id",
            {"stage": stage, "seconds": seconds, "id": job_id},
        )

    def get(self, job_id: int) -> Job | None:
        rows = self._all("SELECT * FROM jobs WHERE id = %s", (job_id,))
        return _job(rows[0]) if rows else None

    def find(self, sop_instance_uid: str) -> Job | None:
        rows = self._all("SELECT * FROM jobs WHERE sop_instance_uid = %s", (sop_instance_uid,))
        return _job(rows[0]) if rows else None

    def jobs(self, state: JobState | None = None, limit: int = 100, before: int | None = None) -> list[Job]:
        where, params = ["TRUE"], []
        if state is not None:
            where.append("state = %s")
            params.append(state.value)
        if before is not None:
            where.append("id < %s")
            params.append(before)
        rows = self._all(f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT %s", [*params, limit])
        return [_job(row) for row in rows]

    def counts(self) -> dict[JobState, int]:
        rows = self._all("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        counts = {state: 0 for state in JobState}
        counts.update({JobState(row["state"]): int(row["n"]) for row in rows})
        return counts

    def oldest_unfinished(self) -> float | None:
        rows = self._all(
            "SELECT MIN(received_at) AS t FROM jobs WHERE state = ANY(%s)", ([s.value for s in UNFINISHED],)
        )
        value = rows[0]["t"] if rows else None
        return float(value) if value is not None else None

    def check_writable(self) -> None:
        rows = self._all("SELECT current_setting('transaction_read_only') AS read_only")
        if rows[0]["read_only"] != "off":
            raise QueueUnavailable(f"{self.name}: the database is read-only (a standby?); point the URL at the primary")

    def revive(self, job_ids: Sequence[int] | None) -> list[Job]:
        with self._transaction() as db:
            if job_ids is None:
                rows = db.execute(
                    "SELECT * FROM jobs WHERE state IN ('dead', 'failed') ORDER BY id FOR UPDATE"
                ).fetchall()
            else:
                rows = db.execute(
                    "SELECT * FROM jobs WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (list(job_ids),)
                ).fetchall()
            revived = []
            for row in rows:
                target = revive_target(JobState(row["state"]), bool(row["spool_path"]), bool(row["results"]))
                if target is None:
                    continue
                updated = db.execute(
                    "UPDATE jobs SET state = %s, attempts = 0, next_attempt_at = 0, delivered = '[]', error = NULL,"
                    f" owner = NULL, lease_until = 0, claims = 0, updated_at = {NOW} WHERE id = %s RETURNING *",
                    (target.value, row["id"]),
                ).fetchone()
                revived.append(_job(updated))  # type: ignore[arg-type]
            self._notify(db, *(job.state for job in revived))
        return revived

    def recover(self, node_id: str) -> int:
        with self._transaction() as db:
            owners = [row["owner"] for row in db.execute("SELECT DISTINCT owner FROM jobs WHERE owner IS NOT NULL")]
            gone = [owner for owner in owners if owner == node_id or holder_is_gone(owner)]
            resumed = db.execute(
                f"UPDATE jobs SET state = 'received', owner = NULL, lease_until = 0, updated_at = {NOW}"
                f" WHERE state IN ('inferring', 'writing') AND (lease_until <= {NOW} OR owner = ANY(%s))",
                (gone,),
            ).rowcount
            db.execute(
                "UPDATE jobs SET owner = NULL, lease_until = 0 WHERE state = 'sending' AND owner = ANY(%s)", (gone,)
            )
            if resumed:
                self._notify(db, JobState.RECEIVED)
        return resumed

    def heartbeat(self, node_id: str, roles: Sequence[str], host: str, started_at: float) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO nodes (node_id, roles, host, started_at, last_seen)"
                f" VALUES (%s, %s, %s, %s, {NOW}) ON CONFLICT (node_id) DO UPDATE SET roles = excluded.roles,"
                " host = excluded.host, started_at = excluded.started_at, last_seen = excluded.last_seen",
                (node_id, ",".join(roles), host, started_at),
            )
            db.execute(f"DELETE FROM nodes WHERE last_seen < {NOW} - %s", (FORGET_NODES_AFTER_S,))

    def nodes(self) -> list[NodeInfo]:
        rows = self._all(
            f"SELECT * FROM nodes WHERE last_seen >= {NOW} - %s ORDER BY last_seen DESC, node_id",
            (FORGET_NODES_AFTER_S,),
        )
        return [
            NodeInfo(
                node_id=row["node_id"],
                roles=tuple(r for r in row["roles"].split(",") if r),
                host=row["host"],
                started_at=float(row["started_at"]),
                last_seen=float(row["last_seen"]),
            )
            for row in rows
        ]

    def listen(self, work: Work, wake: WakeUp) -> None:
        if self._listener is None:
            self._listener = Listener(self.url)
        self._listener.add(work, wake)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        self._pool.close()


def migrate(url: str, timeout_s: float = 5.0) -> None:
    """Apply the migrations the database lacks, under an advisory lock (the queue and the PostgreSQL store both
    call it when they open)."""
    name = redacted(url)
    known = migrations("postgresql")
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=max(1, round(timeout_s))) as db:
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                db.execute(
                    "CREATE TABLE IF NOT EXISTS cxrnode_schema (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
                    " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
                applied = {int(row[0]) for row in db.execute("SELECT version FROM cxrnode_schema")}
                newest = max(applied, default=0)
                if newest > len(known):
                    raise QueueSchemaError(
                        f"{name}: schema version {newest} was written by a newer cxrnode (this one knows up "
                        f"to {len(known)}); run that version, or a newer one"
                    )
                for migration in known:
                    if migration.version not in applied:
                        db.execute(migration.sql.encode())  # several statements, no parameters
                        db.execute(
                            "INSERT INTO cxrnode_schema (version, name) VALUES (%s, %s)",
                            (migration.version, migration.name),
                        )
                        log.info("%s: schema migration %s applied", name, migration.name)
    except psycopg.OperationalError as error:
        raise QueueUnavailable(
            f"{name}: cannot connect ({str(error).strip()}); check that PostgreSQL runs there and that the "
            "user, the password (in the URL, PGPASSWORD or ~/.pgpass) and the database are right"
        ) from error
    except psycopg.Error as error:
        raise QueueSchemaError(f"{name}: cannot create the job tables ({str(error).strip()})") from error


def _job(row: Row) -> Job:
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
        state=JobState(row["state"]),
        error=row["error"],
        attempts=int(row["attempts"]),
        received_at=float(row["received_at"]),
        updated_at=float(row["updated_at"]),
        next_attempt_at=float(row["next_attempt_at"]),
        results=tuple(ResultObject(**r) for r in row["results"]),
        delivered=tuple(row["delivered"]),
        timings={k: float(v) for k, v in row["timings"].items()},
        accession_number=row["accession_number"],
        study_date=row["study_date"],
        finding=row["finding"],
        model_version=row["model_version"],
        owner=row["owner"],
        lease_until=float(row["lease_until"]),
        claims=int(row["claims"]),
    )
