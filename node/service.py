"""`cxrnode serve`: put the stages together and run until SIGTERM / SIGINT; SIGHUP reloads peers and routing.

Two processes. This one receives (the SCP), sends (the sender), serves HTTP and supervises; the worker process
(node.worker_process) decodes, runs the models and writes the results. Start-up acquires every resource before
anything heavy and fails fast: settings → the data folder's lock (one node per folder) → the DICOM and HTTP ports
(bound, not yet answered) → queue and store (partial files removed, interrupted jobs resumed) → the worker process,
waited for until its models are loaded (bad weights fail here, before anything is acknowledged) → associations and
HTTP answered, sender started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import FrameType

from node.audit import AuditLog
from node.config import Settings
from node.launch import Launch, configure_logging, reloaded
from node.lock import DataDirInUse, DataDirLock
from node.metrics import Metrics
from node.queue import UNFINISHED, JobState, Queue, QueueError, Work, open_queue
from node.scp import Receiver, bind_server, make_ae, serve_associations
from node.sender import Sender
from node.store import OBJECTS, Store, StoreError, open_store
from node.web import StatusSources, bind_http, serve_http
from node.worker_process import WorkerProcess, WorkerStartError

log = logging.getLogger(__name__)

MAIN_PID = "_CXRNODE_MAIN_PID"  # lets node.faults stop the whole node from the worker process


ORPHAN_AGE_S = 3600.0
"""In a shared store, an object with no job is removed only this long after it was written: a younger one may be
another node's, whose job is not committed yet (the file store writes the object first)."""


def reconcile(store: Store, queue: Queue, node_id: str) -> None:
    """Make the store and the job table agree after a crash.

    An object with no job row was never acknowledged (the crash came between the rename and the commit): delete
    it, the sender will send it again. An unfinished job whose object is gone cannot be analysed: mark it failed,
    so that it shows up instead of vanishing. Another node's objects and jobs are left alone: in a shared store
    (PostgreSQL, a shared folder) only orphans older than ORPHAN_AGE_S are removed, and with a shared store or a
    shared queue a missing object is not taken for a lost one here (the job may be another node's, in a store this
    node cannot see; the worker that claims it says so)."""
    removed = store.prepare()
    orphans = 0
    for key in list(store.keys(OBJECTS, older_than_s=ORPHAN_AGE_S if store.shared else 0.0)):
        uid = key.rsplit("/", 1)[-1].removesuffix(".dcm")
        if queue.find(uid) is None:
            store.delete(key)
            orphans += 1
    lost = 0
    if not (store.shared or queue.shared):
        for state in (JobState.RECEIVED, JobState.INFERRING, JobState.WRITING):
            for job in queue.jobs(state, limit=1_000_000):
                if job.spool_path and not store.exists(job.spool_path):
                    queue.set_state(job.id, JobState.FAILED, error="spooled object missing after restart")
                    lost += 1
    resumed = queue.recover(node_id)
    unfinished = sum(queue.counts()[s] for s in UNFINISHED)
    log.info(
        "start-up: %d partial file(s) and %d unacknowledged object(s) removed, %d job(s) resumed, %d unfinished, "
        "%d failed for a missing file",
        removed,
        orphans,
        resumed,
        unfinished,
        lost,
    )


class StartupError(RuntimeError):
    """The node could not start; the message names what and what to do. `cxrnode serve` prints it and exits 2."""


class PortUnavailable(OSError):
    """The DICOM or HTTP port cannot be bound (in use, or not ours to take)."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM during start-up: stop starting. A BaseException, so that no `except Exception` on the
    way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def serve(
    config_path: Path | None,
    overrides: Mapping[str, object],
    destinations: Sequence[str] = (),
    allowed_calling_aes: Sequence[str] = (),
) -> int:
    """Start, run until SIGTERM / SIGINT, stop. Start-up takes every resource before anything heavy: the data
    folder's lock, the DICOM and HTTP ports (bound, not yet answered), the queue and the store; only then are the
    models loaded (in the worker process) and associations answered. Any failure raises StartupError with one line
    that names it; nothing is left running. A signal during start-up stops it; a second one during shutdown stops
    at once."""
    started_at = time.time()
    launch = Launch(config_path, dict(overrides), tuple(destinations), tuple(allowed_calling_aes))
    settings = launch.settings()
    # One node id for both processes (by default hostname:pid of this one): the worker's leases are the node's.
    launch = replace(launch, overrides={**launch.overrides, "queue.node_id": settings.queue.node_id})
    configure_logging(settings.node.log_level)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nothing to reload yet
    with contextlib.ExitStack() as cleanup:
        try:
            return _run(launch, settings, cleanup, started_at)
        except Interrupted as interrupted:
            log.info("%s during start-up: stopped", interrupted)
            return 128 + interrupted.signum
        except (DataDirInUse, QueueError, StoreError, WorkerStartError) as error:
            raise StartupError(str(error)) from None
        except PortUnavailable as error:
            raise StartupError(f"{error}; stop whatever holds it, or choose another port") from None
        except OSError as error:  # e.g. a data folder that cannot be created
            raise StartupError(f"cannot start: {error}") from None


def _run(launch: Launch, settings: Settings, cleanup: contextlib.ExitStack, started_at: float) -> int:
    holder = [settings]  # replaced as a whole on SIGHUP; everyone reads holder[0]

    def current() -> Settings:
        return holder[0]

    cleanup.enter_context(DataDirLock(settings.node.data_dir))
    ae = make_ae(settings)
    try:
        server = bind_server(ae, settings)
        cleanup.callback(server.server_close)
        http = bind_http(settings)
        if http is not None:
            cleanup.callback(http.server_close)
    except OSError as error:
        raise PortUnavailable(str(error.strerror or error)) from None
    queue = open_queue(settings)
    cleanup.callback(queue.close)
    store = open_store(settings)
    cleanup.callback(store.close)
    reconcile(store, queue, settings.queue.node_id)
    audit = AuditLog(settings.node.data_dir)
    metrics = Metrics(queue)
    os.environ[MAIN_PID] = str(os.getpid())
    worker = WorkerProcess(launch, current, queue, metrics)
    cleanup.callback(lambda: worker.pump.ident is not None and worker.stop())
    model_version = worker.start()  # the models load here; a signal meanwhile stops the start-up
    sender = Sender(current, queue, store, worker.wake_sender, audit, metrics)
    queue.listen(Work.SEND, worker.wake_sender)  # PostgreSQL: results recorded by other nodes' workers too
    stopped = threading.Event()
    hurry = threading.Event()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        new = reloaded(launch, holder[0])
        if new is not None:
            holder[0] = new  # the association policy reads current() for every new association
        worker.reload()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stopped.is_set():  # a second signal: stop now, without waiting for associations or the batch in hand
            log.warning("%s again: stopping now", name)
            hurry.set()
            process = worker.process
            if process is not None and process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGKILL)  # what it had claimed is resumed at the next start
            return
        log.info("%s: shutting down (again to stop at once)", name)
        stopped.set()

    signal.signal(signal.SIGHUP, on_hangup)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)

    receiver = Receiver(current, store, queue, worker.wake, audit, metrics)
    sources = StatusSources(
        current,
        queue,
        metrics,
        sender,
        lambda: worker.model_version,
        receiver.low_on_disk,
        settings.node.data_dir,
        started_at=started_at,
        receiver=receiver,
    )
    try:  # listen; two nodes that bound the same port at the same moment (SO_REUSEADDR) part here
        serve_associations(ae, server, settings, receiver)
        serve_http(http, sources)
    except OSError as error:
        raise PortUnavailable(f"cannot listen on a port bound at start-up: {error.strerror or error}") from None
    sender.start()
    cleanup.callback(sender.stop)
    worker.wake_sender.set()
    log.info(
        "ready: %s, data in %s, results to %s",
        model_version,
        settings.node.data_dir,
        ", ".join(p.name for p in settings.destinations_for("")) or store.where("results"),
    )
    # Wake every second rather than wait for ever: Python runs signal handlers only in this thread, and a SIGHUP
    # the kernel hands to another thread would otherwise wait until something else woke this one.
    while not stopped.wait(1.0):
        pass
    receiver.stopping.set()  # new associations are refused (transient) from now on
    deadline = time.monotonic() + settings.node.dimse_timeout_s
    while [a for a in ae.active_associations if a.is_acceptor] and time.monotonic() < deadline and not hurry.is_set():
        time.sleep(0.1)  # let open associations finish their C-STOREs and release
    server.shutdown()
    for association in ae.active_associations:  # still open: aborted; an unanswered C-STORE was never acknowledged
        association.abort()
    if http is not None:
        http.shutdown()
    worker.stop(timeout=5.0 if hurry.is_set() else 60.0)  # finishes the batch in hand; the rest resumes next start
    log.info("stopped")
    return 0
