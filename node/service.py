"""`cxrnode serve`: put the stages together and run until SIGTERM / SIGINT; SIGHUP reloads peers and routing.

Two processes. This one receives (the SCP), sends (the sender), serves HTTP and supervises; the worker process
(node.worker_process) decodes, runs the models and writes the results. Start-up order: settings → data dir (partial
files removed) → queue (interrupted jobs resumed) → the worker process, waited for until its models are loaded (fail
fast on bad weights, before anything is acknowledged) → sender → the SCP listens.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

from node.audit import AuditLog
from node.config import Settings
from node.launch import Launch, configure_logging, reloaded
from node.metrics import Metrics
from node.queue import UNFINISHED, JobState
from node.queue.sqlite import SQLiteQueue
from node.scp import Receiver, make_ae, start_server
from node.sender import Sender
from node.spool import Spool
from node.web import StatusSources, start_http
from node.worker_process import QUEUE_FILE, WorkerProcess, WorkerStartError

log = logging.getLogger(__name__)

MAIN_PID = "_CXRNODE_MAIN_PID"  # lets node.faults stop the whole node from the worker process


def open_queue(settings: Settings) -> SQLiteQueue:
    settings.node.data_dir.mkdir(parents=True, exist_ok=True)
    return SQLiteQueue(settings.node.data_dir / QUEUE_FILE)


def reconcile(spool: Spool, queue: SQLiteQueue) -> None:
    """Make the spool and the job table agree after a crash.

    A spooled file with no job row was never acknowledged (the crash came between the rename and the commit):
    delete it, the sender will send it again. An unfinished job whose spooled file is gone cannot be analysed:
    mark it failed, so that it shows up instead of vanishing."""
    removed = spool.prepare()
    orphans = 0
    for path in list(spool.objects()):
        if queue.find(path.stem) is None:
            path.unlink(missing_ok=True)
            orphans += 1
    lost = 0
    for state in (JobState.RECEIVED, JobState.INFERRING, JobState.WRITING):
        for job in queue.jobs(state, limit=1_000_000):
            if job.spool_path and not spool.absolute(job.spool_path).is_file():
                queue.set_state(job.id, JobState.FAILED, error="spooled object missing after restart")
                lost += 1
    resumed = queue.recover()
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


def serve(
    config_path: Path | None,
    overrides: Mapping[str, object],
    destinations: Sequence[str] = (),
    allowed_calling_aes: Sequence[str] = (),
) -> int:
    launch = Launch(config_path, dict(overrides), tuple(destinations), tuple(allowed_calling_aes))
    settings = launch.settings()
    configure_logging(settings.node.log_level)
    holder = [settings]  # replaced as a whole on SIGHUP; everyone reads holder[0]

    def current() -> Settings:
        return holder[0]

    spool = Spool(settings.node.data_dir)
    queue = open_queue(settings)
    reconcile(spool, queue)
    audit = AuditLog(settings.node.data_dir)
    metrics = Metrics(queue)
    os.environ[MAIN_PID] = str(os.getpid())
    worker = WorkerProcess(launch, queue, metrics)
    try:
        model_version = worker.start()
    except WorkerStartError as error:
        log.error("%s", error)
        worker.stop()
        return 2
    sender = Sender(current, queue, spool, worker.wake_sender, audit, metrics)
    stopped = threading.Event()

    # Handlers before the port opens: a SIGHUP or SIGTERM that arrives as soon as peers can connect is obeyed.
    def on_hangup(signum: int, frame: FrameType | None) -> None:
        new = reloaded(launch, holder[0])
        if new is not None:
            holder[0] = new  # the association policy reads current() for every new association
        worker.reload()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        log.info("%s: shutting down", signal.Signals(signum).name)
        stopped.set()

    signal.signal(signal.SIGHUP, on_hangup)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)

    ae = make_ae(settings)
    receiver = Receiver(current, spool, queue, worker.wake, audit, metrics)
    server = start_server(ae, settings, receiver)
    http = start_http(
        StatusSources(
            current,
            queue,
            metrics,
            sender,
            lambda: worker.model_version,
            receiver.low_on_disk,
            settings.node.data_dir,
            receiver=receiver,
        )
    )
    sender.start()
    worker.wake_sender.set()
    log.info(
        "ready: %s, data in %s, results to %s",
        model_version,
        settings.node.data_dir,
        ", ".join(p.name for p in settings.destinations_for("")) or f"{spool.results}",
    )
    # Wake every second rather than wait for ever: Python runs signal handlers only in this thread, and a SIGHUP
    # the kernel hands to another thread would otherwise wait until something else woke this one.
    while not stopped.wait(1.0):
        pass
    receiver.stopping.set()  # new associations are refused (transient) from now on
    deadline = time.monotonic() + settings.node.dimse_timeout_s
    while [a for a in ae.active_associations if a.is_acceptor] and time.monotonic() < deadline:
        time.sleep(0.1)  # let open associations finish their C-STOREs and release
    server.shutdown()  # anything still open is aborted; an unanswered C-STORE was never acknowledged
    if http is not None:
        http.shutdown()
    worker.stop()  # finishes the batch in hand; what it had claimed is resumed at the next start
    sender.stop()
    queue.close()
    log.info("stopped")
    return 0
