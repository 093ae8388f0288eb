"""The PostgreSQL store: objects as rows (key, bytes) of the `objects` table in the queue's database
(node/queue/migrations/postgresql/0002_objects.sql), so that every node that reaches the queue reaches the objects.

A received object and its job are one transaction: `add_with_job` hands the object to `Queue.add`, which inserts
both before its single COMMIT. Once COMMIT returns, PostgreSQL has both in its write-ahead log, flushed to disk
(synchronous_commit on, the server's default): the image is acknowledged only then. Results and pictures are
written on their own (one statement each); a result written twice (a crash, a resend) replaces itself, its UIDs
being the same.

Bytes travel in binary (no hex escaping); the column is stored out of line without compression.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import errors
from psycopg_pool import ConnectionPool, PoolTimeout

from node.queue import QueueError, redacted
from node.store import StoreError, StoreFull, StoreMissing, StoreUnavailable, check_key

if TYPE_CHECKING:
    from node.queue import NewJob, Queue

NOW = "EXTRACT(EPOCH FROM now())::float8"


class PostgreSQLStore:
    def __init__(self, url: str, *, max_connections: int = 8, timeout_s: float = 5.0) -> None:
        from node.queue.postgresql import migrate

        self.url = redacted(url)
        self.shared = True
        try:
            migrate(url, timeout_s)  # the objects table comes with the queue's schema
        except QueueError as error:
            raise StoreUnavailable(str(error)) from error
        self._pool = ConnectionPool(
            url,
            kwargs={"autocommit": True, "connect_timeout": max(1, round(timeout_s))},
            min_size=1,
            max_size=max_connections,
            timeout=timeout_s,
            check=ConnectionPool.check_connection,
            name="cxrnode-store",
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=timeout_s * 2)
        except PoolTimeout as error:
            self._pool.close()
            raise StoreUnavailable(f"{self.url}: no connection within {timeout_s * 2:.0f} s") from error

    @contextmanager
    def _connection(self, key: str) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection() as db:
                yield db
        except errors.DiskFull as error:
            raise StoreFull(f"{self.url}: the database server's disk is full ({str(error).strip()})") from error
        except PoolTimeout as error:
            raise StoreUnavailable(f"{self.url}: no database connection (server down or every one busy)") from error
        except (psycopg.OperationalError, psycopg.InterfaceError) as error:
            raise StoreUnavailable(f"{self.url}: {str(error).strip()}") from error
        except psycopg.Error as error:
            raise StoreError(f"{self.url}: {key}: {str(error).strip()}") from error

    def _rows(self, key: str, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        with self._connection(key) as db:
            cursor = db.execute(sql, params, binary=True)
            return cursor.fetchall() if cursor.description else []

    def put(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        # Every commit is durable here; a picture costs no more than a result.
        self._rows(
            key,
            f"INSERT INTO objects (key, data, stored_at) VALUES (%s, %b, {NOW}) ON CONFLICT (key)"
            " DO UPDATE SET data = EXCLUDED.data, stored_at = EXCLUDED.stored_at",
            (check_key(key), data),
        )

    def get(self, key: str) -> bytes:
        rows = self._rows(key, "SELECT data FROM objects WHERE key = %s", (check_key(key),))
        if not rows:
            raise StoreMissing(f"{key} is not in {self.url}")
        return bytes(rows[0][0])

    def exists(self, key: str) -> bool:
        return bool(self._rows(key, "SELECT 1 FROM objects WHERE key = %s", (check_key(key),)))

    def delete(self, key: str) -> None:
        self._rows(key, "DELETE FROM objects WHERE key = %s", (check_key(key),))

    def keys(self, prefix: str, *, older_than_s: float = 0.0) -> Iterator[str]:
        rows = self._rows(
            prefix,
            f"SELECT key FROM objects WHERE starts_with(key, %s) AND stored_at <= {NOW} - %s",
            (check_key(prefix) + "/", older_than_s),
        )
        yield from (str(row[0]) for row in rows)

    def add_with_job(self, queue: Queue, key: str, data: bytes | memoryview, job: NewJob) -> tuple[int, bool]:
        return queue.add(job, objects={check_key(key): data})

    def prepare(self) -> int:
        return 0  # a transaction that did not commit left nothing

    def space(self) -> tuple[int, int] | None:
        return None

    def local_path(self, key: str) -> Path | None:
        return None  # objects are rows: the sender reads them into memory

    def where(self, key: str | None = None) -> str:
        return f"{self.url} (table objects{f', key {key}' if key else ''})"

    def close(self) -> None:
        self._pool.close()
