"""The worker runs in a process of its own, beside the one that receives and sends.

Why: decoding pixels, running the models and building result objects is CPU work in Python, and within one process
it would take the interpreter lock from the threads that receive images — a modality waiting on a C-STORE response
does not care that the GPU is busy. In its own process the worker can use its own cores, and a model that crashes
or runs out of memory takes only the worker down: the receiving process notices, puts the interrupted jobs back to
`received`, and starts a new worker — with the settings the node runs with (those it started with, and what a
SIGHUP has reloaded since), not the configuration file as it is now: [node] and [inference] change only at a restart
of the node, whatever happens to the worker.

The two processes share only the store and the queue database (SQLite in WAL mode takes writers from both), plus
two wake-up events and a message queue on which the worker reports that it is ready (with its model version), that
it could not start (with the reason), and its metrics.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from types import FrameType
from typing import TYPE_CHECKING

from node.config import Settings
from node.launch import Launch, configure_logging, load_predictor, reloaded
from node.metrics import Metrics
from node.queue import Queue, Work, open_queue
from node.store import open_store

if TYPE_CHECKING:  # torch and the models: in the worker process only
    from node.worker import Worker

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


class Doorbell:
    """A wake-up call between processes that survives either side being killed.

    `multiprocessing.Event` is a condition variable behind a lock: a process SIGKILLed while it holds that lock
    (every `wait(timeout)` takes it briefly) leaves it held for ever, and the next `set()` in the other process
    blocks — the receiving thread with it. A counting semaphore (sem_post / sem_timedwait) has no owner to die:
    `set` rings, `wait` waits for a ring, `clear` forgets the rings not yet heard. Same methods as threading.Event,
    so the worker and the sender take either."""

    MAX_RINGS = 8  # rings beyond this add nothing: one wake-up drains the queue

    def __init__(self, context: multiprocessing.context.BaseContext) -> None:
        self._rings = context.Semaphore(0)

    def set(self) -> None:
        if self._rings.get_value() < self.MAX_RINGS:
            self._rings.release()

    def wait(self, timeout: float | None = None) -> bool:
        rang = self._rings.acquire(timeout=timeout)
        if rang:
            self._rings.release()  # like Event.wait, waiting does not clear
        return rang

    def clear(self) -> None:
        while self._rings.acquire(False):
            pass


class WorkerStartError(RuntimeError):
    """The worker process could not start (bad weights, no GPU, unreadable database...)."""


def die_with_parent() -> None:
    """Linux: the kernel kills this process when the process that started it dies, so that a SIGKILLed node never
    leaves a worker behind to compete with the next one."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        log.warning("cannot ask to die with the parent process (not Linux?)")


def run(
    settings: Settings, launch: Launch, wake: Doorbell, wake_sender: Doorbell, messages: multiprocessing.Queue
) -> None:
    """The worker process's main function: `settings` are the node's, `launch` only rebuilds them on a SIGHUP."""
    from node.worker import Worker  # the models, torch and highdicom: loaded in this process only

    die_with_parent()
    configure_logging(settings.node.log_level)
    holder = [settings]
    try:
        queue = open_queue(settings)
        queue.listen(Work.INFER, wake)  # PostgreSQL: jobs received (or handed back) by any node
        store = open_store(settings)
        predictor = load_predictor(settings)
    except Exception as error:  # bad weights, no GPU, unreadable database: say why, and stop
        messages.put(("error", f"{type(error).__name__}: {error}"))
        return

    def report(name: str, value: float) -> None:
        messages.put(("metric", name, value))

    worker = Worker(lambda: holder[0], queue, store, predictor, wake, wake_sender, report)
    stopped = threading.Event()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stopped.set()

    swap_asked = threading.Event()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        new = reloaded(launch, holder[0])
        if new is not None:
            holder[0] = new
        swap_asked.set()  # and look at the weights folder again

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the node, which stops the worker in order
    signal.signal(signal.SIGHUP, on_hangup)
    worker.start()
    messages.put(("ready", predictor.model_version))
    stamp = weights_stamp(settings)
    while not stopped.wait(1.0):
        if swap_asked.is_set() or weights_stamp(settings) != stamp:
            swap_asked.clear()
            stamp = weights_stamp(settings)
            swap_models(worker, holder[0], messages)
    worker.stop()
    queue.close()


def weights_folder(settings: Settings) -> Path:
    from models.weights import DEMO_WEIGHTS  # the worker process has torch loaded already

    return settings.inference.weights or DEMO_WEIGHTS


def weights_stamp(settings: Settings) -> tuple[tuple[str, int, int], ...]:
    """What changes when weights are copied into the folder: each file's name, size and modification time."""
    folder = weights_folder(settings)
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))
    except OSError:
        return ()


def swap_models(worker: Worker, settings: Settings, messages: multiprocessing.Queue) -> None:
    """Load the weights folder again and, when it holds other weights that load, serve them from the next batch on
    (the batch in hand finishes on the model it started with; each Finding names its model, and result UIDs follow
    it). Weights that do not load are refused with one log line, and the running model keeps serving."""
    running = worker.predictor.model_version
    try:
        predictor = load_predictor(settings)
    except Exception as error:  # a half-copied, broken or mismatched folder
        log.error(
            "new weights in %s refused, %s keeps serving: %s: %s",
            weights_folder(settings),
            running,
            type(error).__name__,
            error,
        )
        return
    if predictor.model_version == running:
        log.info("weights in %s unchanged: %s keeps serving", weights_folder(settings), running)
        return
    worker.predictor = predictor  # read once per batch by the inference thread
    messages.put(("model", predictor.model_version))
    log.info("models swapped: %s -> %s", running, predictor.model_version)


class WorkerProcess:
    """The receiving process's handle on the worker process: start it, hear from it, restart it, stop it."""

    def __init__(self, launch: Launch, settings: Callable[[], Settings], queue: Queue, metrics: Metrics):
        """`settings` gives the node's settings now (as started, plus what SIGHUP reloaded): every worker, the
        first and each restarted one, is handed those rather than reading the configuration file itself."""
        self.node_id = settings().queue.node_id  # the worker process holds its jobs under this node's id
        self.context = multiprocessing.get_context("spawn")
        self.launch = launch
        self.settings = settings
        self.queue = queue
        self.metrics = metrics
        self.wake = Doorbell(self.context)
        self.wake_sender = Doorbell(self.context)
        # A new message queue for every worker: a worker killed while writing leaves the old one's lock held
        # and half a message in its pipe.
        self.messages: multiprocessing.Queue = self.context.Queue()
        self.process: multiprocessing.process.BaseProcess | None = None
        self.model_version: str | None = None
        self.stopping = threading.Event()
        self._started = threading.Event()
        self._error: str | None = None
        self.pump = threading.Thread(target=self._pump, name="worker-messages", daemon=True)
        self.supervisor = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)

    def start(self, timeout: float = 600.0) -> str:
        """Start the worker and wait until its models are loaded; its model version, or WorkerStartError."""
        self.pump.start()
        self._spawn(timeout)
        self.supervisor.start()
        assert self.model_version is not None
        return self.model_version

    def _spawn(self, timeout: float) -> None:
        self._started.clear()
        self._error = None
        self.model_version = None
        if self.process is not None:
            self.messages = self.context.Queue()
        self.process = self.context.Process(
            target=run,
            args=(self.settings(), self.launch, self.wake, self.wake_sender, self.messages),
            name="worker",
            daemon=False,
        )
        self.process.start()
        deadline = time.monotonic() + timeout
        while not self._started.wait(0.2):
            if self._error:
                why = self._error
            elif not self.process.is_alive():
                why = f"it exited with code {self.process.exitcode}"
            elif time.monotonic() > deadline:
                why = f"not ready after {timeout:.0f} s"
            else:
                continue
            if self.process.is_alive():
                self.process.kill()
            self.process.join(5)
            raise WorkerStartError(f"the worker process could not start: {why}")
        self.wake.set()

    def _pump(self) -> None:
        while True:
            try:
                message = self.messages.get(timeout=1.0)  # re-read each time: a restarted worker has a new queue
            except Empty:
                if self.stopping.is_set() and not (self.process and self.process.is_alive()):
                    return
                continue
            except Exception:  # a worker killed mid-message leaves half of it in the pipe
                if self.stopping.is_set():
                    return
                log.warning("unreadable message from the worker process (it was killed while writing?)")
                time.sleep(1.0)
                continue
            kind = message[0]
            if kind == "metric":
                self.metrics.record(message[1], message[2])
            elif kind == "model":  # new weights swapped in while running
                self.model_version = message[1]
            elif kind == "ready":
                self.model_version = message[1]
                self._started.set()
            elif kind == "error":
                self._error = message[1]

    def _supervise(self) -> None:
        """A worker that dies on its own (out of memory, a crash in a native library) is started again; the jobs
        it had claimed go back to `received` first."""
        while not self.stopping.wait(1.0):
            process = self.process
            if process is None or process.is_alive():
                continue
            log.error("worker process exited with code %s; restarting it in 5 s", process.exitcode)
            if self.stopping.wait(5.0):
                return
            resumed = self.queue.recover(self.node_id)
            log.info("%d job(s) the worker had in hand are queued again", resumed)
            try:
                self._spawn(600.0)
            except WorkerStartError as error:
                log.error("%s; trying again", error)
            else:
                log.info("worker process restarted: %s", self.model_version)

    def reload(self) -> None:
        if self.process is not None and self.process.is_alive() and self.process.pid is not None:
            os.kill(self.process.pid, signal.SIGHUP)

    def stop(self, timeout: float = 60.0) -> None:
        """Ask the worker to finish what it has in hand and stop (SIGTERM); SIGKILL if it does not in time."""
        self.stopping.set()
        process = self.process
        if process is not None and process.is_alive():
            process.terminate()
            process.join(timeout)
            if process.is_alive():
                log.warning("worker did not stop in %.0f s; killing it", timeout)
                process.kill()
                process.join(5)
        self.pump.join(5)
