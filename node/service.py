"""`cxrnode serve`: put the stages together and run until SIGTERM / SIGINT; SIGHUP reloads peers and routing.

Start-up order: settings → data dir (partial files removed) → queue (interrupted jobs resumed) → models (fail fast on
bad weights, before anything is acknowledged) → worker and sender → the SCP listens.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from models import Predictor, Thresholds
from node.audit import AuditLog
from node.config import ConfigError, Settings, load_settings, with_command_line_peers
from node.metrics import Metrics
from node.queue import UNFINISHED, JobState
from node.queue.sqlite import SQLiteQueue
from node.scp import Receiver, make_ae, start_server
from node.sender import Sender
from node.spool import Spool
from node.web import StatusSources, start_http
from node.worker import Worker

log = logging.getLogger(__name__)

QUEUE_FILE = "queue.sqlite"


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    for noisy in ("pynetdicom", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def open_queue(settings: Settings) -> SQLiteQueue:
    settings.node.data_dir.mkdir(parents=True, exist_ok=True)
    return SQLiteQueue(settings.node.data_dir / QUEUE_FILE)


def load_predictor(settings: Settings) -> Predictor:
    inference = settings.inference
    predictor = Predictor.load(inference.weights, device=inference.device)
    recorded = predictor.thresholds
    predictor.thresholds = Thresholds(
        score=recorded.score if inference.score_threshold is None else inference.score_threshold,
        mask=recorded.mask if inference.mask_threshold is None else inference.mask_threshold,
        present=recorded.present if inference.present_threshold is None else inference.present_threshold,
    )
    return predictor


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


@dataclass
class Node:
    """The running node. `settings` is replaced as a whole on reload; readers call `current()`."""

    load: Callable[[], Settings]
    settings: Settings
    stopped: threading.Event = field(default_factory=threading.Event)

    def current(self) -> Settings:
        return self.settings

    def reload(self) -> None:
        """Re-read peers, routing, filters and outputs; other changes need a restart and are reported as such."""
        try:
            new = self.load()
        except ConfigError as error:
            log.error("reload refused, keeping the running configuration:\n%s", error)
            return
        for section in ("node", "inference"):
            if getattr(new, section) != getattr(self.settings, section):
                log.warning("reload: changes in [%s] take effect after a restart", section)
        new = new.model_copy(update={"node": self.settings.node, "inference": self.settings.inference})
        self.settings = new
        log.info(
            "reload: %d peer(s), default route %s, %d rule(s)",
            len(new.peers),
            new.routing.default or "results folder",
            len(new.routing.rules),
        )


def serve(
    config_path: Path | None,
    overrides: Mapping[str, object],
    destinations: Sequence[str] = (),
    allowed_calling_aes: Sequence[str] = (),
) -> int:
    def settings_now() -> Settings:
        return with_command_line_peers(
            load_settings(config_path, overrides=overrides), destinations, allowed_calling_aes
        )

    settings = settings_now()
    configure_logging(settings.node.log_level)
    node = Node(settings_now, settings)
    spool = Spool(settings.node.data_dir)
    queue = open_queue(settings)
    reconcile(spool, queue)
    predictor = load_predictor(settings)
    wake_worker, wake_sender = threading.Event(), threading.Event()
    audit = AuditLog(settings.node.data_dir)
    metrics = Metrics(queue)
    worker = Worker(node.current, queue, spool, predictor, wake_worker, wake_sender, metrics)
    sender = Sender(node.current, queue, spool, wake_sender, audit, metrics)

    # Handlers before the port opens: a SIGHUP or SIGTERM that arrives as soon as peers can connect is obeyed.
    def on_hangup(signum: int, frame: FrameType | None) -> None:
        node.reload()  # the association policy reads node.current() for every new association

    def on_stop(signum: int, frame: FrameType | None) -> None:
        log.info("%s: shutting down", signal.Signals(signum).name)
        node.stopped.set()

    signal.signal(signal.SIGHUP, on_hangup)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)

    ae = make_ae(settings)
    receiver = Receiver(node.current, spool, queue, wake_worker, audit, metrics)
    server = start_server(ae, settings, receiver)
    http = start_http(
        StatusSources(
            node.current,
            queue,
            metrics,
            sender,
            lambda: predictor.model_version,
            receiver.low_on_disk,
            settings.node.data_dir,
        )
    )
    worker.start()
    sender.start()
    wake_worker.set()
    wake_sender.set()

    log.info(
        "ready: %s, data in %s, results to %s",
        predictor.model_version,
        settings.node.data_dir,
        ", ".join(p.name for p in settings.destinations_for("")) or f"{spool.results}",
    )
    node.stopped.wait()
    receiver.stopping.set()  # new associations are refused (transient) from now on
    deadline = time.monotonic() + settings.node.dimse_timeout_s
    while [a for a in ae.active_associations if a.is_acceptor] and time.monotonic() < deadline:
        time.sleep(0.1)  # let open associations finish their C-STOREs and release
    server.shutdown()  # anything still open is aborted; an unanswered C-STORE was never acknowledged
    if http is not None:
        http.shutdown()
    worker.stop()
    sender.stop()
    queue.close()
    log.info("stopped")
    return 0
