"""The job queue: one row per received SOP Instance, moving through the states of `JobState`.

    received ──▶ inferring ──▶ writing ──▶ sending ──▶ done
        │            │            │           │
        └──▶ skipped └──▶ failed  └──▶ failed └──▶ (retry with backoff) ──▶ dead

`Queue` is the contract the SCP, worker, sender and CLI use, and `QueueError` and its subclasses are the only errors
they see; `open_queue` / `connect` pick the backend from a URL (`sqlite:///PATH`, the embedded default, or
`postgresql://USER@HOST:PORT/DB`) and nothing outside this package knows which one it is.

Several processes, on one host or many, share a queue. Whoever works on a job holds it: the job records its `owner`
(a node id, by default `hostname:pid`) and a lease (`lease_until`) that the owner renews while it works
(`node.queue.leases.LeaseKeeper`). A job whose lease expired is anyone's to take, at any time: its holder died.
Every state change names the state it expects (and, for a holder, itself), and says whether it happened; the loser
of a race learns it lost and lets go.
"""

from __future__ import annotations

import enum
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from node.config import Settings

QUEUE_FILE = "queue.sqlite"
"""The embedded queue's file in the data dir, when no `[queue] url` is configured."""
DEFAULT_LEASE_S = 30.0
FORGET_NODES_AFTER_S = 86400.0
"""A node silent this long drops out of `Queue.nodes` (its row is deleted at the next heartbeat of any node)."""


class JobState(enum.StrEnum):
    RECEIVED = "received"
    """The object is durably in the spool; waiting for a worker."""
    INFERRING = "inferring"
    """A worker has claimed it and is running the models (`owner` holds the lease)."""
    WRITING = "writing"
    """Findings are being written as result objects (`owner` holds the lease)."""
    SENDING = "sending"
    """Result objects are written; waiting for, or between, delivery attempts (`owner`: the sender delivering it)."""
    DONE = "done"
    """Every destination has every result (or, with no destination, the results are in data_dir/results)."""
    SKIPPED = "skipped"
    """Acknowledged but outside the acceptance filters (e.g. a lateral, a CT); `error` says why."""
    FAILED = "failed"
    """Could not be analysed (e.g. undecodable pixels); `error` says why. `cxrnode resend` retries it."""
    DEAD = "dead"
    """Delivery gave up after the configured attempts; `error` is the last failure. `cxrnode resend` revives it."""


UNFINISHED = (JobState.RECEIVED, JobState.INFERRING, JobState.WRITING, JobState.SENDING)
LEASED = (JobState.INFERRING, JobState.WRITING, JobState.SENDING)
"""The states in which a job can be held; in any other state it has no owner."""


def revive_target(state: JobState, kept: bool, has_results: bool) -> JobState | None:
    """Where `cxrnode resend` puts a job in `state`: failed ones, and skipped ones whose object was `kept`, are
    analysed again; dead, done and sending ones are sent again if they have results, else analysed again. None for
    one already on its way (received, inferring, writing) or a skipped one with nothing kept."""
    if state is JobState.FAILED or (state is JobState.SKIPPED and kept):
        return JobState.RECEIVED
    if state in (JobState.DEAD, JobState.DONE, JobState.SENDING):
        return JobState.SENDING if has_results else JobState.RECEIVED
    return None


class Work(enum.StrEnum):
    """What a wake-up announces (`Queue.listen`)."""

    INFER = "infer"
    """A job became `received`: something for a worker."""
    SEND = "send"
    """A job became `sending`: something for a sender."""


# -- errors -----------------------------------------------------------------------------------------------------------


class QueueError(Exception):
    """The queue could not be read or written (disk full, permissions, corruption, a refused statement)."""


class QueueUnavailable(QueueError):
    """The queue's database cannot be reached or written right now (server down, connection lost, every connection
    busy, the file locked too long). Nothing was changed; try again later."""


class QueueSchemaError(QueueError):
    """The database's tables are not ones this cxrnode can use (written by a newer version, or a migration failed)."""


class QueueURLError(QueueError, ValueError):
    """A queue URL this cxrnode does not understand."""


# -- records ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResultObject:
    """One result object written for a job."""

    kind: str  # "SEG", "SR", "GSPS", "SC"
    sop_class_uid: str
    sop_instance_uid: str
    path: str  # its key in the store (node.store.result_key; for the file store, also the path in its folder)


@dataclass(frozen=True)
class NewJob:
    """What the SCP knows when it records a received object."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    called_ae: str
    peer_address: str
    spool_path: str | None  # the object's key in the store (node.store); None for a skipped object not kept
    state: JobState = JobState.RECEIVED
    error: str | None = None
    accession_number: str = ""
    """Accession Number and Study Date (DICOM DA, YYYYMMDD) of the source, for the status page (never logged)."""
    study_date: str = ""


@dataclass(frozen=True)
class Job:
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    called_ae: str
    peer_address: str
    spool_path: str | None
    """The received object's key in the store (`node.store.object_key`); None when it was not kept."""
    state: JobState
    error: str | None
    attempts: int
    """Delivery attempts made since the job last entered `sending`."""
    received_at: float
    updated_at: float
    next_attempt_at: float
    results: tuple[ResultObject, ...] = ()
    delivered: tuple[str, ...] = ()
    """Names of the destinations that have every result."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent per stage (queue_wait, inference, writing, sending), for latency reports."""
    accession_number: str = ""
    study_date: str = ""
    finding: dict[str, object] | None = None
    """What the models found, as recorded with the results (`node.outputs.finding_summary`): opacity present,
    probability, severity % and extent per lung; None until the job has results."""
    model_version: str | None = None
    """The model version that made the results."""
    owner: str | None = None
    """The node id holding the job (a worker in inferring / writing, a sender in sending); None when nobody does."""
    lease_until: float = 0.0
    """Until when (Unix time; the database server's clock on PostgreSQL) the owner holds it, unless renewed."""
    claims: int = 0
    """How many times a worker claimed it for analysis (`Queue.claim`; `hand_back` takes back a claim not tried,
    `revive` starts again from 0). Above 1, a worker held it before and never finished it: it died (a crash in a
    native library, out of memory) or lost its lease, perhaps because of this very image, so the worker analyses it
    alone, and past `[inference] max_tries` fails it (node.worker)."""


@dataclass(frozen=True)
class NodeInfo:
    """One node sharing the queue, as its last heartbeat left it (`Queue.heartbeat`)."""

    node_id: str
    roles: tuple[str, ...]
    """What it runs: some of "receive", "infer", "send"."""
    host: str
    started_at: float
    last_seen: float
    """Unix time of its last heartbeat (the database server's clock on PostgreSQL)."""


# -- the contract -----------------------------------------------------------------------------------------------------


class Queue(Protocol):
    shared: bool
    """True when nodes on other hosts may use this queue too (PostgreSQL); False for this host's processes alone."""

    def add(self, job: NewJob, objects: Mapping[str, bytes | memoryview] | None = None) -> tuple[int, bool]:
        """Record a received object; (job id, True) when new, (existing id, False) for a SOP Instance seen before.
        `objects` (key: bytes), for the PostgreSQL store (`node.store`): kept in the queue's database in the same
        transaction as a new job, so that the job and its object are one commit; a queue that cannot keep
        objects (SQLite) raises QueueError."""

    def claim(self, limit: int, node_id: str, lease_s: float) -> list[Job]:
        """Atomically take up to `limit` jobs to analyse, oldest first: `received` ones, and `inferring` / `writing`
        ones whose lease expired (their holder died). Each moves to `inferring`, held by `node_id` for `lease_s`
        seconds, its `claims` counted up by one in the same statement (and returned so). Two callers never get the
        same job while its lease runs."""

    def hand_back(self, job_ids: Sequence[int], node_id: str, *, error: str | None = None) -> list[int]:
        """Jobs `node_id` holds in `inferring` / `writing` and put down for a reason other than the job itself (not
        tried after all, the store unreachable) go back to `received` with `error` (cleared if None), their last
        claim not counted (`claims` down by one), the lease let go. Returns the ids handed back."""

    def renew(self, job_ids: Sequence[int], node_id: str, lease_s: float) -> list[int]:
        """Extend to now + `lease_s` the leases `node_id` still holds among `job_ids`; returns those ids. A job that
        moved on (results recorded, delivered, failed) or was taken over after its lease expired is not renewed."""

    def claim_due(self, now: float, limit: int, node_id: str, lease_s: float) -> list[Job]:
        """For a sender: atomically take up to `limit` jobs in `sending` whose next attempt is due at `now` and that
        no live sender holds, oldest due first; each is held by `node_id` for `lease_s` seconds (state unchanged)."""

    def set_state(
        self,
        job_id: int,
        state: JobState,
        *,
        expect: JobState | None = None,
        node_id: str | None = None,
        error: str | None = None,
    ) -> bool:
        """Move a job to `state`, only if it is in `expect` and held by `node_id` (each when given); `error` is
        recorded, or cleared if None. Moving to a state outside inferring / writing lets go of the lease.
        Returns whether the job moved."""

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
        """Record the written result objects (with the finding they show and the model version that made them) and
        move to `state` (sending or done) in one transaction, letting go of the lease; only if the job is in
        `expect` and held by `node_id` (each when given). Returns whether it happened."""

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
        """After a delivery attempt: the destinations done so far, the error if any, the next try, the new state
        (sending, done or dead); lets go of the lease. Only if the job is still in `sending` (and held by `node_id`,
        when given). Returns whether it was recorded."""

    def add_delivered(self, job_id: int, destination: str, *, node_id: str) -> bool:
        """While `node_id` holds the job in `sending`: add `destination` to its `delivered` names (kept sorted, each
        once), in one step on the stored list, so that the workers of two destinations of one job never overwrite
        each other's progress. The lease and everything else stay as they are (`record_attempt` ends the attempt).
        Returns whether it was recorded (False: the job moved on, or another node took it over)."""

    def add_timing(self, job_id: int, stage: str, seconds: float) -> None: ...

    def get(self, job_id: int) -> Job | None: ...

    def find(self, sop_instance_uid: str) -> Job | None: ...

    def jobs(self, state: JobState | None = None, limit: int = 100, before: int | None = None) -> list[Job]:
        """Most recent first; only jobs with an id below `before`, when given (the next page)."""

    def counts(self) -> dict[JobState, int]: ...

    def oldest_unfinished(self) -> float | None:
        """received_at of the oldest job in received / inferring / writing / sending, or None."""

    def check_writable(self) -> None:
        """Raise QueueError if the queue cannot take a write now (for the readiness probe)."""

    def revive(self, job_ids: Sequence[int] | None) -> list[Job]:
        """`cxrnode resend`: dead jobs go back to `sending` (attempts reset), failed ones to `received`; `claims`
        starts again from 0. None means every dead or failed job. Returns the revived jobs."""

    def recover(self, node_id: str) -> int:
        """At start-up, or after this node's worker process died: jobs in `inferring` / `writing` that `node_id`
        holds, whose lease expired, or whose owner was a process on this host that is gone (`holder_is_gone`) go
        back to `received`; those owners' `sending` jobs are let go. A live node's jobs are never taken.
        Returns how many went back to `received`."""

    def heartbeat(self, node_id: str, roles: Sequence[str], host: str, started_at: float) -> None:
        """Record that `node_id` (running `roles` on `host` since `started_at`) is alive now. Nodes silent for a day
        are forgotten."""

    def nodes(self) -> list[NodeInfo]:
        """Every node that sent a heartbeat in the last day, most recently seen first."""

    def listen(self, work: Work, wake: WakeUp) -> None:
        """Until `close`, call `wake.set()` when a job becomes ready for `work`. PostgreSQL: a change made by any
        process on any host (LISTEN/NOTIFY); SQLite: changes made through this queue object only (other processes
        on the host ring their own wake-ups, and every stage polls at least once a second)."""

    def close(self) -> None: ...


class WakeUp(Protocol):
    """How one stage tells the next that the queue has work for it: `threading.Event` within a process,
    `node.worker_process.Doorbell` between processes, `Queue.listen` between hosts. A missed call costs at most the
    stage's one-second poll."""

    def set(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...

    def clear(self) -> None: ...


# -- node ids ---------------------------------------------------------------------------------------------------------


def default_node_id() -> str:
    """`hostname:pid` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def holder_is_gone(owner: str) -> bool:
    """True when `owner` is a default node id of this host whose process no longer runs: its jobs can be taken
    back at once instead of when their leases expire. Any other id (another host, a chosen --node-id) is False."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


# -- opening ----------------------------------------------------------------------------------------------------------


def sqlite_path(url: str) -> Path | None:
    """The file of a `sqlite:///PATH` URL (PATH absolute: `sqlite:///var/lib/q.sqlite` and SQLAlchemy's
    `sqlite:////var/lib/q.sqlite` are the same file); None for another scheme."""
    if not url.startswith("sqlite:"):
        return None
    if not url.startswith("sqlite:///") or len(url) <= len("sqlite:///"):
        raise QueueURLError(f"{url!r}: write a SQLite queue as sqlite:///ABSOLUTE/PATH/queue.sqlite")
    return Path("/" + url[len("sqlite:///") :].lstrip("/"))


def check_url(url: str) -> str:
    """`url` if this cxrnode can open such a queue, else QueueURLError saying what is accepted."""
    if sqlite_path(url) is not None:
        return url
    if url.startswith(("postgresql://", "postgres://")):
        from psycopg.conninfo import conninfo_to_dict

        try:
            conninfo_to_dict(url)
        except Exception as error:  # psycopg.ProgrammingError: libpq's own parser refused it
            raise QueueURLError(f"{redacted(url)}: not a valid PostgreSQL URL ({error})") from None
        return url
    raise QueueURLError(
        f"{redacted(url)}: unknown queue URL; use sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE"
    )


def redacted(url: str) -> str:
    """The URL with any password replaced by `***`, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    credentials, at, location = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{location}"


def connect(url: str) -> Queue:
    """Open the queue at `url` (its tables created or upgraded first); QueueError if it cannot be opened."""
    path = sqlite_path(check_url(url))
    if path is not None:
        from node.queue.sqlite import SQLiteQueue

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise QueueError(f"{path.parent}: cannot create the queue's folder ({error})") from error
        return SQLiteQueue(path)
    from node.queue.postgresql import PostgreSQLQueue

    return PostgreSQLQueue(url)


def queue_url(settings: Settings) -> str:
    """The configured `[queue] url`, or the embedded default: data_dir/queue.sqlite."""
    return settings.queue.url or f"sqlite://{settings.node.data_dir / QUEUE_FILE}"


def open_queue(settings: Settings) -> Queue:
    """The node's queue, as configured."""
    return connect(queue_url(settings))
