"""The job queue: one row per received SOP Instance, moving through the states of `JobState`.

    received ──▶ inferring ──▶ writing ──▶ sending ──▶ done
        │            │            │           │
        └──▶ skipped └──▶ failed  └──▶ failed └──▶ (retry with backoff) ──▶ dead

`Queue` is the interface the SCP, worker, sender and CLI use; `node.queue.sqlite.SQLiteQueue` is the embedded backend.
A PostgreSQL backend implements the same methods (claiming with SELECT ... FOR UPDATE SKIP LOCKED) and nothing
else has to change.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class JobState(enum.StrEnum):
    RECEIVED = "received"
    """The object is durably in the spool; waiting for the worker."""
    INFERRING = "inferring"
    """The worker has claimed it and is running the models."""
    WRITING = "writing"
    """Findings are being written as result objects."""
    SENDING = "sending"
    """Result objects are written; waiting for, or between, delivery attempts."""
    DONE = "done"
    """Every destination has every result (or, with no destination, the results are in data_dir/results)."""
    SKIPPED = "skipped"
    """Acknowledged but outside the acceptance filters (e.g. a lateral, a CT); `error` says why."""
    FAILED = "failed"
    """Could not be analysed (e.g. undecodable pixels); `error` says why. `cxrnode resend` retries it."""
    DEAD = "dead"
    """Delivery gave up after the configured attempts; `error` is the last failure. `cxrnode resend` revives it."""


UNFINISHED = (JobState.RECEIVED, JobState.INFERRING, JobState.WRITING, JobState.SENDING)
TERMINAL = (JobState.DONE, JobState.SKIPPED, JobState.FAILED, JobState.DEAD)


@dataclass(frozen=True)
class ResultObject:
    """One result object written for a job."""

    kind: str  # "SEG", "SR", "GSPS", "SC"
    sop_class_uid: str
    sop_instance_uid: str
    path: str  # relative to the data dir


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
    spool_path: str | None  # relative to the data dir; None for a skipped object that was not kept
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


class Queue(Protocol):
    def add(self, job: NewJob) -> tuple[int, bool]:
        """Record a received object; (job id, True) when new, (existing id, False) for a SOP Instance seen before."""

    def claim(self, limit: int) -> list[Job]:
        """Atomically move up to `limit` of the oldest `received` jobs to `inferring` and return them."""

    def set_state(
        self, job_id: int, state: JobState, *, expect: JobState | None = None, error: str | None = None
    ) -> None:
        """Move a job to `state` (only if it is in `expect`, when given); `error` is recorded, or cleared if None."""

    def set_results(
        self,
        job_id: int,
        results: Sequence[ResultObject],
        state: JobState,
        *,
        finding: Mapping[str, object] | None = None,
        model_version: str | None = None,
    ) -> None:
        """Record the written result objects (with the finding they show and the model version that made them) and
        move to `state` (sending or done) in one transaction."""

    def due(self, now: float, limit: int) -> list[Job]:
        """Jobs in `sending` whose next attempt is due, oldest first."""

    def record_attempt(
        self,
        job_id: int,
        *,
        delivered: Sequence[str],
        error: str | None,
        next_attempt_at: float,
        state: JobState,
    ) -> None:
        """After a delivery attempt: the destinations done so far, the error if any, the next try, the new state."""

    def add_timing(self, job_id: int, stage: str, seconds: float) -> None: ...

    def get(self, job_id: int) -> Job | None: ...

    def find(self, sop_instance_uid: str) -> Job | None: ...

    def jobs(self, state: JobState | None = None, limit: int = 100, before: int | None = None) -> list[Job]:
        """Most recent first; with `before` (a job id), only the jobs with a smaller id: the next page."""

    def counts(self) -> dict[JobState, int]: ...

    def oldest_unfinished(self) -> float | None:
        """received_at of the oldest job in received / inferring / writing / sending, or None."""

    def next_due_at(self) -> float | None:
        """The earliest next_attempt_at of the jobs in `sending`, or None."""

    def check_writable(self) -> None:
        """Raise if the queue cannot take a write now (for the readiness probe)."""

    def revive(self, job_ids: Sequence[int] | None) -> list[Job]:
        """`cxrnode resend`: dead jobs go back to `sending` (attempts reset), failed ones to `received`.
        None means every dead or failed job. Returns the revived jobs."""

    def recover(self) -> int:
        """At start-up: jobs left in `inferring` or `writing` by a crash go back to `received`. Returns how many."""

    def close(self) -> None: ...


class WakeUp(Protocol):
    """How one stage tells the next that the queue has work for it: `threading.Event` within a process,
    `node.worker_process.Doorbell` between processes. A missed call costs at most the stage's one-second poll."""

    def set(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...

    def clear(self) -> None: ...
