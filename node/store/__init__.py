"""The object store: received images, result objects and overlay pictures, under keys, never paths.

`Store` is the contract the receive path, the worker, the sender and the status page use, and `StoreError` and its
subclasses are the only errors they see; `open_store` / `connect` pick the backend from a URL and nothing outside
this package knows which one it is:

    file:///PATH        a folder (the default: the data dir). PATH/spool/<2 hex>/<SOP Instance UID>.dcm for received
                        objects, PATH/results/<Study Instance UID>/<kind>-<SOP Instance UID>.dcm for results,
                        PATH/thumbnails/ and PATH/overlays/ for the status page's pictures. Every object is written
                        to a temporary file, fsynced, renamed into place and its folder fsynced. On a shared mount
                        (NFS with working fsync, CephFS...) it is shared by every node that mounts it.
    postgresql://...    objects kept in the queue's database (a table of key and bytes); must name the same database
                        as the queue: a received object and its job row are written in ONE transaction.

Keys are made here (`object_key`, `result_key`, `picture_key`) from UIDs and job ids, and are the same whatever the
backend: `spool/ab/1.2.3.dcm`, `results/1.2.3/seg-1.2.4.dcm`, `thumbnails/7.png`. A job's `spool_path` and a
result's `path` in the queue are such keys (for the file store they are also the paths relative to its folder, as
they were before the store existed). A key is a relative path of plain names; anything else is refused, so no key
can reach outside the store.

`keep_received` is the one operation that touches both the store and the queue: an acknowledged object is either
stored and recorded, or neither (`Store.add_with_job`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from node.config import Settings
    from node.queue import NewJob, Queue

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
KEY_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
MAX_KEY = 400
OBJECTS = "spool"
RESULTS = "results"
THUMBNAILS = "thumbnails"  # overlay pictures for the status page, small
OVERLAYS = "overlays"  # likewise, full size
PICTURES = {THUMBNAILS: "png", OVERLAYS: "jpg"}


# -- errors -----------------------------------------------------------------------------------------------------------


class StoreError(Exception):
    """An object could not be stored, read or removed (I/O error, permissions, a refused statement)."""


class StoreFull(StoreError):
    """No space left for the object (disk or quota full). A C-STORE is answered 0xA700 Out of Resources; free some
    space (or lower the retention) and the sender's retry will be taken."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now (database down, mount gone). Nothing was changed; try again later."""


class StoreMissing(StoreError):
    """No object under this key (never stored, or already removed)."""


class StoreKeyError(StoreError, ValueError):
    """A key that is not a relative path of plain names (`..`, an absolute path, odd characters): refused."""


class StoreURLError(StoreError, ValueError):
    """A store URL this cxrnode does not understand, or a PostgreSQL store on another database than the queue."""


# -- keys -------------------------------------------------------------------------------------------------------------


def safe_uid(uid: str) -> str:
    """A UID as a name; anything that is not a well-formed UID is refused (ValueError; no path tricks)."""
    uid = uid.strip().rstrip("\x00")
    if not UID_PATTERN.match(uid) or len(uid) > 64:
        raise ValueError(f"{uid!r} is not a valid DICOM UID")
    return uid


def object_key(sop_instance_uid: str) -> str:
    """Where a received object is kept: spool/<2 hex of its SHA-1>/<SOP Instance UID>.dcm."""
    uid = safe_uid(sop_instance_uid)
    return f"{OBJECTS}/{hashlib.sha1(uid.encode()).hexdigest()[:2]}/{uid}.dcm"


def result_key(study_instance_uid: str, kind: str, sop_instance_uid: str) -> str:
    """Where a result object is kept: results/<Study Instance UID>/<kind>-<SOP Instance UID>.dcm."""
    return check_key(f"{RESULTS}/{safe_uid(study_instance_uid)}/{kind.lower()}-{safe_uid(sop_instance_uid)}.dcm")


def picture_key(folder: str, job_id: int) -> str:
    """A job's overlay picture for the status page: thumbnails/<job id>.png or overlays/<job id>.jpg."""
    return f"{folder}/{int(job_id)}.{PICTURES[folder]}"


def check_key(key: str) -> str:
    """`key` if it is a relative path of plain names (letters, digits, `.`, `_`, `-`, not starting with `.`), else
    StoreKeyError: no key reaches outside the store."""
    parts = key.split("/")
    if not key or len(key) > MAX_KEY or not all(KEY_PART.match(part) for part in parts):
        raise StoreKeyError(f"{key[:80]!r} is not a store key (relative path of plain names, e.g. spool/ab/1.2.dcm)")
    return key


# -- the contract -----------------------------------------------------------------------------------------------------


class Store(Protocol):
    url: str
    """Where it is, for messages (a password is never shown)."""
    shared: bool
    """True when other nodes may keep objects here too (PostgreSQL, a configured file:// folder): start-up then
    removes no young object it did not write, and never takes a missing object for a lost one."""

    def put(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        """Keep `data` under `key`, replacing what was there; when it returns the object survives a crash or power
        loss (`durable=False`, for pictures: no fsync). StoreFull when there is no space, StoreError otherwise;
        after a failure the key holds its previous object or none, never part of one."""

    def get(self, key: str) -> bytes:
        """The object under `key`; StoreMissing if there is none."""

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove the object under `key`; nothing happens if there is none."""

    def keys(self, prefix: str, *, older_than_s: float = 0.0) -> Iterator[str]:
        """The keys under `prefix` (e.g. "spool"), in no particular order; only those stored at least
        `older_than_s` seconds ago, when given."""

    def add_with_job(self, queue: Queue, key: str, data: bytes | memoryview, job: NewJob) -> tuple[int, bool]:
        """Keep `data` under `key` and record `job` (whose spool_path is `key`) so that both are kept or neither,
        and return what `Queue.add` returns. File store: the object is written durably, then the job committed (a
        crash between the two leaves an object with no job, which `reconcile` removes at the next start; a failed
        commit removes it at once). PostgreSQL store: the object row and the job row are one transaction."""

    def prepare(self) -> int:
        """At start-up: remove what a crash left half-written. Returns how many were removed."""

    def space(self) -> tuple[int, int] | None:
        """(free, total) bytes where objects are written, for the low-water mark; None where the store cannot
        tell (PostgreSQL: the database server watches its own disk)."""

    def where(self, key: str | None = None) -> str:
        """Where the object under `key` (or the store) is, in words, for messages and logs."""

    def local_path(self, key: str) -> Path | None:
        """The file that holds the object under `key`, when the store keeps objects as local files (the sender
        streams it as it is); None otherwise."""

    def close(self) -> None: ...


def readable(store: Store, key: str) -> BytesIO:
    """The object under `key` as an in-memory file named like the key's last part (what pydicom's dcmread and
    messages that name a file need). StoreMissing if there is none."""
    data = BytesIO(store.get(key))
    data.name = key.rsplit("/", 1)[-1]
    return data


def keep_received(store: Store, queue: Queue, job: NewJob, data: bytes | memoryview | None) -> tuple[int, bool]:
    """Record a received object's job, keeping `data` (under its `object_key`) with it in one step; `data` None
    records the job alone (an object skipped and not kept). Raises StoreError or QueueError; on either, nothing was
    kept. Returns (job id, created) as `Queue.add` does."""
    from dataclasses import replace

    if data is None:
        return queue.add(job)
    key = object_key(job.sop_instance_uid)
    return store.add_with_job(queue, key, data, replace(job, spool_path=key))


# -- opening ----------------------------------------------------------------------------------------------------------


def file_path(url: str) -> Path | None:
    """The folder of a `file:///PATH` URL (PATH absolute); None for another scheme."""
    if not url.startswith("file:"):
        return None
    if not url.startswith("file:///") or len(url) <= len("file:///"):
        raise StoreURLError(f"{url!r}: write a file store as file:///ABSOLUTE/PATH")
    return Path("/" + url[len("file:///") :].lstrip("/"))


def check_url(url: str) -> str:
    """`url` if this cxrnode can open such a store, else StoreURLError saying what is accepted."""
    from node.queue import QueueURLError, redacted
    from node.queue import check_url as check_queue_url

    if file_path(url) is not None:
        return url
    if url.startswith(("postgresql://", "postgres://")):
        try:
            return check_queue_url(url)
        except QueueURLError as error:
            raise StoreURLError(str(error)) from None
    raise StoreURLError(f"{redacted(url)}: unknown store URL; use file:///PATH or postgresql://USER@HOST:PORT/DATABASE")


def same_database(a: str, b: str) -> bool:
    """Whether two PostgreSQL URLs name the same database (host, port, database; user and password may differ)."""
    from psycopg.conninfo import conninfo_to_dict

    def place(url: str) -> tuple[str, str, str]:
        info = conninfo_to_dict(url)
        return (str(info.get("host", "")), str(info.get("port", "5432")), str(info.get("dbname", "")))

    return place(a) == place(b)


def store_url(settings: Settings) -> str:
    """The configured `[store] url`, or the default: the data dir as a file store."""
    return settings.store.url or f"file://{settings.node.data_dir}"


def connect(url: str, queue_url: str | None = None, *, shared: bool = False) -> Store:
    """Open the store at `url`. A PostgreSQL store must be on the queue's database (`queue_url`, when given).
    `shared`: a file store on a folder other hosts mount too. StoreError if it cannot be opened."""
    folder = file_path(check_url(url))
    if folder is not None:
        from node.store.file import FileStore

        return FileStore(folder, shared=shared)
    if queue_url is not None and not (
        queue_url.startswith(("postgresql://", "postgres://")) and same_database(url, queue_url)
    ):
        from node.queue import redacted

        raise StoreURLError(
            f"{redacted(url)}: a PostgreSQL store keeps objects in the queue's database, so that an object and its "
            f"job are one commit; set [store] url to the [queue] url ({redacted(queue_url)}), or use file:///PATH"
        )
    from node.store.postgresql import PostgreSQLStore

    return PostgreSQLStore(url)


def open_store(settings: Settings) -> Store:
    """The node's store, as configured. A configured file:// store is taken to be shared (other nodes may hold
    jobs whose objects are in it); the default one, in the data dir, is this node's alone."""
    from node.queue import queue_url

    return connect(store_url(settings), queue_url(settings), shared=settings.store.url is not None)
