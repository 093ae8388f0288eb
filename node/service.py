"""`cxrnode serve`: put the stages together and run until SIGTERM / SIGINT; SIGHUP reloads peers and routing.

Two processes. This one receives (the SCP), sends (the sender), serves HTTP and supervises; the worker process
(node.worker_process) decodes, runs the models and writes the results. Start-up acquires every resource before
anything heavy and fails fast: settings → the data folder's lock (one node per folder) → the DICOM and HTTP ports
(bound, not yet answered) → queue and store (partial files removed, interrupted jobs resumed) → the worker process,
waited for until its models are loaded (bad weights fail here, before anything is acknowledged) → associations and
HTTP answered, sender started.

Roles (`[node] roles`, `--role`): a node runs any of "receive" (the SCP and STOW-RS), "infer" (the worker process;
without it no model, no torch) and "send" (the sender); the nodes running the others share its queue. With
`[node] receivers = N`, N receiving processes share the DICOM port (`node.receivers`). Every node records a
heartbeat with its roles in the queue, for the status page and /metrics of all of them.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
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
from node.queue import UNFINISHED, JobState, Queue, QueueError, WakeUp, Work, open_queue, sqlite_path
from node.receivers import ReceiverProcesses
from node.scp import AssociationSlots, Receiver, bind_server, check_port_free, make_ae, serve_associations
from node.sender import Sender
from node.store import OBJECTS, Store, StoreError, open_store
from node.web import StatusSources, bind_http, serve_http
from node.worker_process import Doorbell, WorkerProcess, WorkerStartError

log = logging.getLogger(__name__)

MAIN_PID = "_CXRNODE_MAIN_PID"  # lets node.faults stop the whole node from the worker process
ROLES = ("receive", "infer", "send")


ORPHAN_AGE_S = 3600.0
"""In a shared store, an object with no job is removed only this long after it was written: a younger one may be
another node's, whose job is not committed yet (the file store writes the object first)."""


def reconcile(store: Store, queue: Queue, node_id: str, keep_recent_s: float = 0.0) -> None:
    """Make the store and the job table agree after a crash.

    An object with no job row was never acknowledged (the crash came between the rename and the commit): delete
    it, the sender will send it again. An unfinished job whose object is gone cannot be analysed: mark it failed,
    so that it shows up instead of vanishing. Another node's objects and jobs are left alone: in a shared store
    (PostgreSQL, a shared folder) only orphans older than ORPHAN_AGE_S are removed, and with a shared store or a
    shared queue a missing object is not taken for a lost one here (the job may be another node's, in a store this
    node cannot see; the worker that claims it says so). With a shared queue, an orphan younger than `keep_recent_s`
    is kept too: another receiving process may be committing its job this moment."""
    removed = store.prepare()
    orphans = 0
    for key in list(store.keys(OBJECTS, older_than_s=ORPHAN_AGE_S if store.shared else keep_recent_s)):
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


def check_roles(settings: Settings) -> None:
    """A node that runs only some of the roles needs the others' nodes to see its jobs: a queue they share. Its
    default queue (data_dir/queue.sqlite) is not one: the data folder is locked to this node, so no other node could
    ever take its jobs (a receive-only node would acknowledge images nobody analyses). Refused with StartupError."""
    roles = settings.node.roles
    if set(roles) == set(ROLES):
        return
    path = sqlite_path(settings.queue.url) if settings.queue.url else settings.node.data_dir / "queue.sqlite"
    if path is not None and path.resolve().is_relative_to(settings.node.data_dir.resolve()):
        raise StartupError(
            f"role {','.join(roles)} runs only part of a node, and its queue ({path}) is in its own data folder, "
            "which no other node may use: the jobs would never move on. Give every node the same [queue] url "
            "(--queue): postgresql://USER@HOST:PORT/DATABASE, or for nodes on this one host only "
            "sqlite:///PATH outside every node's data folder"
        )


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

    roles = settings.node.roles
    receiving, inferring, sending = (role in roles for role in ROLES)
    receivers = settings.node.receivers if receiving else 0
    check_roles(settings)
    cleanup.enter_context(DataDirLock(settings.node.data_dir))
    ae = make_ae(settings)
    server = None
    try:
        if receiving:
            if receivers > 1:
                check_port_free(settings)  # SO_REUSEPORT would otherwise share the port with any other node too
            server = bind_server(ae, settings, shared=receivers > 1)
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
    if receiving:
        reconcile(store, queue, settings.queue.node_id, keep_recent_s=600.0 if settings.queue.url else 0.0)
    else:  # the store's objects are the receiving node's to clean up; the jobs this node's id held are taken back
        log.info("start-up: %d job(s) resumed", queue.recover(settings.queue.node_id))
    audit = AuditLog(settings.node.data_dir)
    metrics = Metrics(queue)
    os.environ[MAIN_PID] = str(os.getpid())
    worker: WorkerProcess | None = None
    wake: WakeUp = Doorbell(multiprocessing.get_context("spawn"))  # rung by the receivers, heard by a local worker
    wake_sender: WakeUp = threading.Event()
    model_version = "no models (role " + ",".join(roles) + ")"
    if inferring:
        worker = WorkerProcess(launch, current, queue, metrics)
        cleanup.callback(lambda: worker is not None and worker.pump.ident is not None and worker.stop())
        model_version = worker.start()  # the models load here; a signal meanwhile stops the start-up
        wake, wake_sender = worker.wake, worker.wake_sender
    sender = Sender(current, queue, store, wake_sender, audit, metrics) if sending else None
    if sender is not None:
        queue.listen(Work.SEND, wake_sender)  # PostgreSQL: results recorded by other nodes' workers too
    stopped = threading.Event()
    others: ReceiverProcesses | None = None
    hurry = threading.Event()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        new = reloaded(launch, holder[0])
        if new is not None:
            holder[0] = new  # the association policy reads current() for every new association
        if worker is not None:
            worker.reload()
        if others is not None:
            others.reload()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stopped.is_set():  # a second signal: stop now, without waiting for associations or the batch in hand
            log.warning("%s again: stopping now", name)
            hurry.set()
            process = worker.process if worker is not None else None
            if process is not None and process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGKILL)  # what it had claimed is resumed at the next start
            return
        log.info("%s: shutting down (again to stop at once)", name)
        stopped.set()

    signal.signal(signal.SIGHUP, on_hangup)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)

    receiver = Receiver(current, store, queue, wake, audit, metrics)
    sources = StatusSources(
        current,
        queue,
        metrics,
        sender,
        (lambda: worker.model_version) if worker is not None else (lambda: None),
        receiver.low_on_disk,
        settings.node.data_dir,
        started_at=started_at,
        receiver=receiver if receiving else None,
        roles=tuple(roles),
    )
    slots = AssociationSlots.create(receivers, ae.maximum_associations) if receivers > 1 else None
    if slots is not None:
        others = ReceiverProcesses(settings, launch, slots, wake, metrics)
        cleanup.callback(lambda: others is not None and others.stop(timeout=5.0))
        try:
            others.start()
        except RuntimeError as error:
            raise StartupError(str(error)) from None
    try:  # listen; two nodes that bound the same port at the same moment (SO_REUSEADDR) part here
        if server is not None:
            serve_associations(ae, server, settings, receiver, slots.for_process(0) if slots else None)
        serve_http(http, sources)
    except OSError as error:
        raise PortUnavailable(f"cannot listen on a port bound at start-up: {error.strerror or error}") from None
    if sender is not None:
        sender.start()
        cleanup.callback(sender.stop)
    wake_sender.set()
    threading.Thread(
        target=_heartbeats, args=(queue, settings, started_at, stopped), name="heartbeat", daemon=True
    ).start()
    log.info(
        "ready: role %s%s, %s, data in %s, results to %s",
        ",".join(roles),
        f" ({receivers} receiving processes)" if receivers > 1 else "",
        model_version,
        settings.node.data_dir,
        ", ".join(p.name for p in settings.destinations_for("")) or store.where("results"),
    )
    # Wake every second rather than wait for ever: Python runs signal handlers only in this thread, and a SIGHUP
    # the kernel hands to another thread would otherwise wait until something else woke this one.
    while not stopped.wait(1.0):
        pass
    receiver.stopping.set()  # new associations are refused (transient) from now on
    if others is not None:
        others.stop(timeout=settings.node.dimse_timeout_s + 5.0)  # they refuse new ones and finish theirs alike
    deadline = time.monotonic() + settings.node.dimse_timeout_s
    while [a for a in ae.active_associations if a.is_acceptor] and time.monotonic() < deadline and not hurry.is_set():
        time.sleep(0.1)  # let open associations finish their C-STOREs and release
    if server is not None:
        server.shutdown()
    for association in ae.active_associations:  # still open: aborted; an unanswered C-STORE was never acknowledged
        association.abort()
    if http is not None:
        http.shutdown()
    if worker is not None:
        worker.stop(timeout=5.0 if hurry.is_set() else 60.0)  # finishes the batch in hand; the rest resumes later
    log.info("stopped")
    return 0


def _heartbeats(queue: Queue, settings: Settings, started_at: float, stopped: threading.Event) -> None:
    """Tell the queue every few seconds that this node lives, with its roles (the status pages and /metrics of
    every node show them). A missed beat (the database away) is only logged; leases, not heartbeats, move jobs."""
    every = min(5.0, settings.queue.lease_s / 3)
    host, roles = socket.gethostname(), settings.node.roles
    while True:
        try:
            queue.heartbeat(settings.queue.node_id, roles, host, started_at)
        except QueueError as error:
            log.warning("heartbeat not recorded: %s", error)
        if stopped.wait(every):
            return
