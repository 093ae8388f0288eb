"""The sender: delivers each job's result objects to its destinations, with retries: by C-STORE, or by DICOMweb
STOW-RS (node.stow_client) to a destination with a url.

One thread hands out the work: it claims due jobs (held with a lease, node.queue) and puts each destination's part
in that destination's inbox (node.delivery.DestinationWorker: one thread per destination, its association kept open
while work keeps coming), so a destination that is down delays only its own results. Each destination's delivery is
recorded as it happens (`Queue.add_delivered`); when every destination of the job has answered, the attempt is
recorded (`Queue.record_attempt`).

A C-STORE destination has a job's results when every object was answered with Success or one of the storage
warnings 0xB000 / 0xB006 / 0xB007; a STOW-RS destination when it lists every one as stored. Otherwise the job is
tried again, for the destinations that lack them, after base × factor^(attempt-1) seconds (at most max_delay), and
after max_attempts it is `dead` with the last error; `cxrnode resend` revives it.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from node.audit import AuditLog
from node.config import SenderSettings, Settings
from node.delivery import DeliveryError, DestinationWorker, Parcel, client_tls_context, store
from node.faults import crash_point
from node.metrics import Metrics
from node.queue import Job, JobState, Queue, QueueError, ResultObject, WakeUp
from node.queue.leases import LeaseKeeper
from node.store import Store, readable

log = logging.getLogger(__name__)

__all__ = ["DeliveryError", "Sender", "backoff", "client_tls_context", "result_file", "store"]

CLAIM_LIMIT = 32


def backoff(settings: SenderSettings, attempts: int) -> float:
    """Seconds to wait after the `attempts`-th failed attempt (1-based)."""
    return float(min(settings.retry_max_delay_s, settings.retry_base_s * settings.retry_factor ** (attempts - 1)))


def result_file(store: Store, result: ResultObject) -> Path | BytesIO:
    """A result object to send (the one place the sender finds result files): the file itself when the store keeps
    files (streamed as it is), else the object read into memory."""
    return store.local_path(result.path) or readable(store, result.path)


@dataclass
class Attempt:
    """One delivery attempt of a job, while its destinations answer."""

    job: Job
    settings: Settings
    waiting: set[str]
    """Destinations that have not answered yet."""
    delivered: set[str]
    errors: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


class Sender:
    def __init__(
        self,
        settings: Callable[[], Settings],
        queue: Queue,
        store: Store,
        wake: WakeUp,
        audit: AuditLog,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.store = store
        self.wake = wake
        self.audit = audit
        self.metrics = metrics
        self.node_id = settings().queue.node_id
        self.leases = LeaseKeeper(queue, self.node_id, settings().queue.lease_s)  # no other sender takes ours
        self._state: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()  # _state, _attempts, _workers
        self._attempts: dict[int, Attempt] = {}
        self._workers: dict[str, DestinationWorker] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sender", daemon=True)

    def start(self) -> None:
        self.leases.start()
        self.thread.start()

    def destination_state(self) -> dict[str, dict[str, str]]:
        """Per destination: when it last took results, and the last error (for the status page)."""
        with self._lock:
            return {name: dict(state) for name, state in self._state.items()}

    def _note(self, destination: str, **fields: str) -> None:
        with self._lock:
            self._state.setdefault(destination, {}).update(fields)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the transfers in flight (each destination's current job), then stop; jobs not begun stay held
        until their leases end, and the next start sends them."""
        deadline = time.monotonic() + timeout
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout)
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.join(max(0.1, deadline - time.monotonic()))
        self.leases.stop()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                jobs = self.queue.claim_due(time.time(), CLAIM_LIMIT, self.node_id, self.settings().queue.lease_s)
                self.leases.hold(job.id for job in jobs)
                for job in jobs:
                    try:
                        self.dispatch(job)
                    except Exception:
                        log.exception("sender: job=%d could not be handed out; taken again when its lease ends", job.id)
                        self.leases.let_go([job.id])
                if not jobs:
                    # Poll at least every second: `cxrnode resend` (another process) changes the queue directly.
                    self.wake.wait(timeout=1.0)
                    self.wake.clear()
            except Exception:
                log.exception("sender: unexpected error; retrying in 5 s")
                self.stopping.wait(5.0)

    def dispatch(self, job: Job) -> None:
        """Put the job's results in the inbox of each destination that lacks them."""
        settings = self.settings()
        destinations = settings.destinations_for(job.calling_ae)
        missing = [r.path for r in job.results if not self.store.exists(r.path)]
        written = {r.kind for r in job.results}
        wanted = {kind for peer in destinations for kind in settings.objects_for(peer)}
        if missing or not wanted <= written:
            why = f"result file {missing[0]} missing" if missing else f"{sorted(wanted - written)} not written yet"
            log.warning("job=%d: %s (routing or output profiles changed?); analysing again", job.id, why)
            self.queue.set_state(job.id, JobState.RECEIVED, node_id=self.node_id, error=why)
            return
        todo = [peer for peer in destinations if peer.name not in job.delivered]
        attempt = Attempt(job, settings, waiting={peer.name for peer in todo}, delivered=set(job.delivered))
        with self._lock:
            if job.id in self._attempts:
                return  # already on its way (claimed again after a lost lease): its attempt records it
            if todo:
                self._attempts[job.id] = attempt
        if not todo:
            self._finish(attempt)
            return
        for peer in todo:
            results = tuple(r for r in job.results if r.kind in settings.objects_for(peer))
            self._worker(peer.name).put(
                Parcel(
                    job=job,
                    peer=peer,
                    results=results,
                    paths=tuple(result_file(self.store, r) for r in results),
                    calling_ae=settings.sender.calling_ae_title or settings.node.ae_title,
                    timeout=settings.sender.timeout_s,
                    tls=settings.tls,
                )
            )

    def _worker(self, destination: str) -> DestinationWorker:
        with self._lock:
            worker = self._workers.get(destination)
            if worker is None:
                worker = self._workers[destination] = DestinationWorker(destination, self._report, self.stopping)
                worker.start()
            return worker

    def _report(self, parcel: Parcel, error: Exception | None, seconds: float) -> None:
        """A destination's worker answered for one job (in that worker's thread)."""
        job, peer = parcel.job, parcel.peer
        audited = {
            "job": job.id,
            "destination": peer.name,
            "ae_title": peer.ae_title,
            "address": peer.url or f"{peer.host}:{peer.port}",
        }
        uids = {r.kind: r.sop_instance_uid for r in parcel.results}
        source = {"source_sop_instance_uid": job.sop_instance_uid, "study_instance_uid": job.study_instance_uid}
        if error is None:
            crash_point("sending")
            self.metrics.send_seconds.labels(destination=peer.name).observe(seconds)
            self._note(peer.name, last_delivered=_now(), last_error="")
            log.info(
                "job=%d delivered to %s (%s): %s",
                job.id,
                peer.name,
                peer.where,
                " ".join(f"{kind}={uid}" for kind, uid in uids.items()),
            )
            self.audit.record("delivery", outcome="delivered", **audited, **source, results=uids)
            try:
                if not self.queue.add_delivered(job.id, peer.name, node_id=self.node_id):
                    log.warning("job=%d: no longer held by %s; %s is not recorded", job.id, self.node_id, peer.name)
            except QueueError as queue_error:  # recorded with the attempt below, or sent again: never lost
                log.warning("job=%d: cannot record the delivery to %s yet: %s", job.id, peer.name, queue_error)
        else:
            self.metrics.send_failures.labels(destination=peer.name).inc()
            self._note(peer.name, last_error=f"{_now()} {error}"[:300])
            self.audit.record("delivery", outcome="failed", **audited, reason=str(error)[:300], **source, results=uids)
        with self._lock:
            attempt = self._attempts[job.id]
            attempt.waiting.discard(peer.name)
            if error is None:
                attempt.delivered.add(peer.name)
            else:
                attempt.errors.append(f"{peer.name}: {error}")
            finished = not attempt.waiting
            if finished:
                del self._attempts[job.id]
        if finished:
            try:
                self._finish(attempt)
            except QueueError as queue_error:
                log.error(
                    "job=%d: cannot record its delivery attempt (%s); tried again when its lease ends",
                    job.id,
                    queue_error,
                )
                self.leases.let_go([job.id])

    def _finish(self, attempt: Attempt) -> None:
        """Every destination of the job has answered: record the attempt (done, again later, or dead)."""
        job, settings = attempt.job, attempt.settings
        self.queue.add_timing(job.id, "sending", time.perf_counter() - attempt.started)
        delivered = sorted(attempt.delivered)
        if not attempt.errors:
            if self.queue.record_attempt(
                job.id, delivered=delivered, error=None, next_attempt_at=0, state=JobState.DONE, node_id=self.node_id
            ):
                if job.spool_path:
                    self.store.delete(job.spool_path)
            return
        attempts = job.attempts + 1
        error = "; ".join(sorted(attempt.errors))
        if attempts >= settings.sender.max_attempts:
            log.error("job=%d dead after %d attempts: %s", job.id, attempts, error)
            self.metrics.dead.inc()
            self.audit.record(
                "job",
                outcome="dead",
                job=job.id,
                attempts=attempts,
                reason=error[:300],
                source_sop_instance_uid=job.sop_instance_uid,
            )
            self.queue.record_attempt(
                job.id, delivered=delivered, error=error, next_attempt_at=0, state=JobState.DEAD, node_id=self.node_id
            )
            return
        delay = backoff(settings.sender, attempts)
        log.warning("job=%d attempt %d failed, next in %.0f s: %s", job.id, attempts, delay, error)
        self.queue.record_attempt(
            job.id,
            delivered=delivered,
            error=error,
            next_attempt_at=time.time() + delay,
            state=JobState.SENDING,
            node_id=self.node_id,
        )


def _now() -> str:
    return datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
