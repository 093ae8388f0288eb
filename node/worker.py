"""The inference worker: takes batches of received jobs, runs the Predictor, writes the result objects.

It owns the Predictor (loaded once, when the worker starts). A batch is up to `inference.batch_size` jobs, from any
association; when fewer are waiting, it waits at most `inference.max_wait_ms` for more. Receiving never waits for it.

Three stages overlap, so that the Predictor (the GPU, when there is one) is never idle waiting for the CPU:

    feed thread     claim a batch, decode and prepare its pixels (a thread pool: the decoders release the GIL)
       │  at most one prepared batch waits here
    infer thread    Predictor.predict on the batch
       │  at most 2 x batch_size findings wait here
    write pool      SEG / SR / GSPS / SC written durably, job moves on to sending (or done)

An image that kills the worker process (a crash in a native library, the out-of-memory killer) must not kill it for
ever, nor take the rest of its batch with it each time. The queue counts the claims of each job (`Job.claims`):

- a job claimed before (claims > 1) was held by a worker that never finished it, and may be what killed it. Such a
  suspect is analysed alone: the rest of its claim is handed back untried, what is in hand is finished first, and
  nothing else is claimed until it is done, so whatever happens to the worker then is charged to it alone;
- a job claimed more than `inference.max_tries` times is failed without running the models (`cxrnode resend`
  tries it again once the cause is fixed).
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from queue import Empty, Full
from queue import Queue as Handoff

import numpy as np
from pydicom import Dataset, dcmread

from models import Finding, Predictor
from models.errors import ModelsError
from node.config import Settings
from node.faults import crash_point, worker_dies_on
from node.orientation import Orientation, display_orientation, finding_to_stored, to_display
from node.outputs import finding_summary, write_results
from node.overlay import render_overlay
from node.pixels import prepare
from node.queue import Job, JobState, Queue, WakeUp
from node.queue.leases import LeaseKeeper
from node.store import OVERLAYS, THUMBNAILS, Store, StoreError, StoreMissing, picture_key

log = logging.getLogger(__name__)


Report = Callable[[str, float], None]
"""How the worker reports what it did (metric name, value); node.metrics.Metrics.record applies it."""


def lower_priority(nice: int) -> None:
    """Give the calling thread (on Linux the nice value is per thread) a lower CPU priority; best effort."""
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except (OSError, AttributeError):
            log.debug("cannot lower the priority of thread %s", threading.current_thread().name)


def suspect(job: Job) -> bool:
    """Claimed before by a worker that never finished it (it died or lost its lease): maybe what killed it."""
    return job.claims > 1


@dataclass
class Prepared:
    job: Job
    source: Dataset
    pixels: np.ndarray
    """Presentation pixels on the stored grid (what the SC and thumbnail draw on)."""
    orientation: Orientation
    display: np.ndarray
    """The same pixels in the standard display (node.orientation): what the Predictor sees."""


class Worker:
    def __init__(
        self,
        settings: Callable[[], Settings],
        queue: Queue,
        store: Store,
        predictor: Predictor,
        wake: WakeUp,
        wake_sender: WakeUp,
        report: Report,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.store = store
        self.predictor = predictor
        self.wake = wake
        self.wake_sender = wake_sender
        self.report = report
        self.node_id = settings().queue.node_id
        self.leases = LeaseKeeper(queue, self.node_id, settings().queue.lease_s)  # renewed while the jobs are here
        self.stopping = threading.Event()
        batch = settings().inference.batch_size
        nice = settings().inference.nice
        self.prepare_pool = ThreadPoolExecutor(
            max_workers=min(8, batch), thread_name_prefix="prepare", initializer=lower_priority, initargs=(nice,)
        )
        self.write_pool = ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="write", initializer=lower_priority, initargs=(nice,)
        )
        self.writes_in_flight = threading.BoundedSemaphore(2 * batch)
        self.batches: Handoff[list[Prepared]] = Handoff(maxsize=1)
        self.busy = 0
        """Batches handed to the inference thread and result objects being written, not yet finished."""
        self.busy_changed = threading.Condition()
        self.feeder = threading.Thread(target=self._feed, name="worker-feed", daemon=True)
        self.thread = threading.Thread(target=self._run, name="worker-infer", daemon=True)

    def start(self) -> None:
        self.leases.start()
        self.feeder.start()
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batches in hand and their writes, then return. Claimed jobs not yet handed to the inference
        thread go back to `received`, their claim not counted."""
        self.stopping.set()
        self.wake.set()
        self.feeder.join(timeout)
        self.thread.join(timeout)
        self.write_pool.shutdown(wait=True)
        self.prepare_pool.shutdown(wait=True)
        self.leases.stop()

    # -- the stages -------------------------------------------------------------------------------------------------

    def _feed(self) -> None:
        lower_priority(self.settings().inference.nice)
        while not self.stopping.is_set():
            jobs = []
            try:
                jobs = self._take_batch()
                if not jobs:
                    self.wake.wait(timeout=1.0)
                    self.wake.clear()
                    continue
                now = time.time()
                for job in jobs:
                    self.queue.add_timing(job.id, "queue_wait", now - job.received_at)
                prepared = [p for p in self.prepare_pool.map(self._prepare, jobs) if p is not None]
                while prepared and not self.stopping.is_set():
                    self._count_busy(+1)
                    try:
                        self.batches.put(prepared, timeout=1.0)
                        break
                    except Full:
                        self._count_busy(-1)
                        continue
                else:  # stopping with a batch never handed over: back untried, its claim not counted
                    untried = [item.job.id for item in prepared]
                    self.leases.let_go(untried)
                    self.queue.hand_back(untried, self.node_id)
                if any(suspect(job) for job in jobs):
                    self._wait_until_analysed()  # a suspect runs alone: nothing else is claimed meanwhile
            except Exception:  # the worker must survive anything one batch does; the jobs stay recoverable
                log.exception("worker: unexpected error while preparing; retrying in 5 s")
                self.leases.let_go(job.id for job in jobs)  # taken again (by any node) when their leases run out
                self.stopping.wait(5.0)

    def _run(self) -> None:
        # Before the first model call: the math library's worker threads are started by this thread and inherit it.
        lower_priority(self.settings().inference.nice)
        while not (self.stopping.is_set() and self.batches.empty()):
            try:
                prepared = self.batches.get(timeout=1.0)
            except Empty:
                continue
            try:
                self.infer(prepared)
            except Exception:
                log.exception("worker: unexpected error in inference; the batch is taken again when its leases end")
                self.leases.let_go(item.job.id for item in prepared)
            finally:
                self._count_busy(-1)  # its writes, if any, were counted in `infer`

    def _claim(self, limit: int) -> list[Job]:
        """Claim up to `limit` jobs; those whose tries are used up are failed, the others returned."""
        max_tries = self.settings().inference.max_tries
        jobs = []
        for job in self.queue.claim(limit, self.node_id, self.settings().queue.lease_s):
            if job.claims > max_tries:
                self._give_up(job, max_tries)
            else:
                jobs.append(job)
        self.leases.hold(job.id for job in jobs)
        return jobs

    def _take_batch(self) -> list[Job]:
        inference = self.settings().inference
        jobs = self._claim(inference.batch_size)
        if any(suspect(job) for job in jobs):
            return self._isolate(jobs)
        if not jobs or len(jobs) >= inference.batch_size:
            return jobs
        deadline = time.monotonic() + inference.max_wait_ms / 1000
        while len(jobs) < inference.batch_size and not self.stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.wake.wait(timeout=remaining)
            self.wake.clear()
            jobs += self._claim(inference.batch_size - len(jobs))
            if any(suspect(job) for job in jobs):
                return self._isolate(jobs)
        return jobs

    def _isolate(self, jobs: list[Job]) -> list[Job]:
        """The first suspect of a claim, alone; the other jobs go back untried (their claim not counted). If a batch
        is still being analysed, everything goes back and the worker waits for it to end first: should that batch
        kill the worker, the suspect must not be charged for it."""
        first = next(job for job in jobs if suspect(job))
        with self.busy_changed:
            busy = self.busy > 0
        back = jobs if busy else [job for job in jobs if job is not first]
        self.leases.let_go(job.id for job in back)
        self.queue.hand_back([job.id for job in back], self.node_id)
        if busy:
            self._wait_until_analysed()
            return []
        log.info(
            "job=%d sop=%s: claim %d (a worker held it before and never finished it): analysed alone",
            first.id,
            first.sop_instance_uid,
            first.claims,
        )
        return [first]

    def _count_busy(self, change: int) -> None:
        with self.busy_changed:
            self.busy += change
            self.busy_changed.notify_all()

    def _wait_until_analysed(self) -> None:
        """Until every batch handed to the inference thread has been analysed and its results written (or the
        worker stops)."""
        with self.busy_changed:
            while self.busy and not self.stopping.is_set():
                self.busy_changed.wait(1.0)

    # -- one batch --------------------------------------------------------------------------------------------------

    def infer(self, prepared: list[Prepared]) -> None:
        started = time.perf_counter()
        crash_point("inferring")
        worker_dies_on(item.job.sop_instance_uid for item in prepared)
        findings = self._predict(prepared)
        elapsed = time.perf_counter() - started
        self.report("inference_seconds", elapsed)
        self.report("batch_size", len(prepared))
        seconds = elapsed / max(1, len(prepared))
        for item, finding in zip(prepared, findings, strict=True):
            if finding is None:
                continue
            self.queue.add_timing(item.job.id, "inference", seconds)
            self.writes_in_flight.acquire()
            self._count_busy(+1)
            self.write_pool.submit(self._write_then_release, item, finding)

    def _write_then_release(self, item: Prepared, finding: Finding) -> None:
        try:
            self._write(item, finding)
        except Exception:
            log.exception("job=%d: unexpected error while writing; taken again when its lease ends", item.job.id)
            self.leases.let_go([item.job.id])
        finally:
            self.writes_in_flight.release()
            self._count_busy(-1)

    def _prepare(self, job: Job) -> Prepared | None:
        if job.spool_path is None:
            self.queue.set_state(job.id, JobState.FAILED, node_id=self.node_id, error="no spooled object for this job")
            return None
        try:
            data = self.store.get(job.spool_path)
        except StoreMissing:
            self._fail(job, f"spooled object {job.spool_path} is missing")
            return None
        except StoreError as error:  # unreachable for now: the job waits for the next claim
            log.warning("job=%d: cannot read its object (%s); analysed later", job.id, error)
            self.queue.hand_back([job.id], self.node_id, error=f"cannot read: {error}")  # not counted as a try
            return None
        try:
            source = dcmread(BytesIO(data))
            pixels = prepare(source)
            orientation = display_orientation(source)
            display = to_display(pixels, orientation.transform)
        except ModelsError as error:
            self._fail(job, str(error))
            return None
        except Exception as error:  # a broken file: pydicom and the decoders raise many kinds
            self._fail(job, f"cannot read the object: {type(error).__name__}: {error}")
            return None
        if orientation.note:
            log.info("job=%d sop=%s: %s", job.id, job.sop_instance_uid, orientation.note)
        return Prepared(job, source, pixels, orientation, display)

    def _predict(self, prepared: list[Prepared]) -> list[Finding | None]:
        try:
            return list(self.predictor.predict([p.display for p in prepared]))
        except Exception as error:
            if len(prepared) == 1:
                self._fail(prepared[0].job, f"inference failed: {type(error).__name__}: {error}")
                return [None]
            log.warning("batch of %d failed (%s); retrying one by one", len(prepared), error)
            return [self._predict([p])[0] for p in prepared]

    def _write(self, item: Prepared, finding: Finding) -> None:
        job, settings = item.job, self.settings()
        if not self.queue.set_state(job.id, JobState.WRITING, expect=JobState.INFERRING, node_id=self.node_id):
            log.warning(
                "job=%d: no longer held by %s (its lease expired and another node took it)", job.id, self.node_id
            )
            return
        started = time.perf_counter()
        try:
            finding = finding_to_stored(finding, item.orientation.transform)  # the models saw the standard display
            results = write_results(
                item.source,
                finding,
                settings.objects_to_write(job.calling_ae),
                self.store,
                content_datetime=datetime.datetime.fromtimestamp(job.received_at),
                pixels=item.pixels,
                orientation_note=item.orientation.note,
            )
        except (StoreError, OSError) as error:  # store full or unreachable: the job stays recoverable, try later
            log.error("job=%d sop=%s: cannot write results (%s); will retry", job.id, job.sop_instance_uid, error)
            # Not the image's fault: the claim is not counted against its tries.
            self.queue.hand_back([job.id], self.node_id, error=f"cannot write results: {error}")
            self.stopping.wait(5.0)
            return
        except Exception as error:
            self._fail(job, f"cannot write results: {type(error).__name__}: {error}")
            return
        self.queue.add_timing(job.id, "writing", time.perf_counter() - started)
        destinations = settings.destinations_for(job.calling_ae)
        state = JobState.SENDING if destinations else JobState.DONE
        if not self.queue.set_results(
            job.id,
            results,
            state,
            finding=finding_summary(finding),
            model_version=finding.model_version,
            expect=JobState.WRITING,
            node_id=self.node_id,
        ):
            log.warning("job=%d: results not recorded, another node took the job over (lease expired)", job.id)
            return
        self.report("processed", 1)
        self._thumbnail(job, item.pixels, finding)
        log.info(
            "job=%d sop=%s inferred: %d opacity box(es), present=%s p=%.3f severity=%.1f%% extent=%d; %s",
            job.id,
            job.sop_instance_uid,
            len(finding.opacities),
            finding.opacity_present,
            finding.opacity_probability,
            finding.severity.total,
            finding.extent.total,
            " ".join(f"{r.kind}={r.sop_instance_uid}" for r in results),
        )
        if state is JobState.DONE:
            self._remove_object(job)
            log.info("job=%d done: results in %s (no destination configured)", job.id, self.store.where("results"))
        else:
            self.wake_sender.set()

    def _thumbnail(self, job: Job, pixels: np.ndarray, finding: Finding) -> None:
        """Overlay pictures for the status page, small and full size; best effort, they are not results."""
        try:
            for folder, max_side, kind in ((THUMBNAILS, 320, "PNG"), (OVERLAYS, 1600, "JPEG")):
                picture = BytesIO()  # JPEG 4:4:4 keeps the outlines sharp at a quarter of the PNG's size
                render_overlay(pixels, finding, max_side=max_side).save(picture, format=kind, quality=90, subsampling=0)
                self.store.put(picture_key(folder, job.id), picture.getbuffer(), durable=False)
        except Exception as error:
            log.warning("job=%d: no overlay picture (%s)", job.id, error)

    def _remove_object(self, job: Job) -> None:
        """The received object is no longer needed once the results are recorded (best effort)."""
        if job.spool_path:
            try:
                self.store.delete(job.spool_path)
            except StoreError as error:
                log.warning("job=%d: its object stays in the store (%s)", job.id, error)

    def _give_up(self, job: Job, max_tries: int) -> None:
        """A job whose every try ended with no result: failed without running the models."""
        self._fail(
            job,
            f"analysis did not finish in {max_tries} tries (the worker process died or lost its lease each time);"
            f" not tried again: `cxrnode resend {job.id}` once the cause is fixed",
        )

    def _fail(self, job: Job, reason: str) -> None:
        log.warning("job=%d sop=%s failed: %s", job.id, job.sop_instance_uid, reason)
        self.report("failed", 1)
        self.queue.set_state(job.id, JobState.FAILED, node_id=self.node_id, error=reason)
