"""`--receivers N`: N receiving processes on the one DICOM port.

One Python process receives with one interpreter lock: over several parallel associations it parses PDUs on one core.
With `[node] receivers = N` the node's own process is receiving process 0 and this module starts N - 1 more, each
with its own AE, its own socket bound with SO_REUSEPORT to the same port (the kernel spreads incoming connections
over them), its own queue connection and the same store: every one of them receives exactly as process 0 does
(`node.receiving.receive`: the object durable, the job committed, then Success). The association limits count across
them through `node.scp.AssociationSlots`, in shared memory.

A receiving process that dies (killed, out of memory) loses only the associations it had open: what it had not
acknowledged, the peer sends again. The node clears its association entries and starts another in its place.
SIGTERM stops them as it stops the node: new associations are refused, open ones may finish for dimse_timeout_s.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from types import FrameType

from node.audit import AuditLog
from node.config import Settings
from node.launch import Launch, configure_logging, reloaded
from node.metrics import Metrics, MetricsRelay
from node.queue import WakeUp, open_queue
from node.receiving import Receiver
from node.scp import AssociationSlots, bind_server, make_ae, serve_associations
from node.store import open_store
from node.worker_process import die_with_parent

log = logging.getLogger(__name__)


def run(
    settings: Settings,
    launch: Launch,
    index: int,
    slots: AssociationSlots,
    wake: WakeUp,
    messages: multiprocessing.Queue,
) -> None:
    """Receiving process `index` (1 .. N-1): bind the shared port, receive until SIGTERM."""
    die_with_parent()
    configure_logging(settings.node.log_level)
    holder = [settings]
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopped.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the node, which stops its receivers in order

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        new = reloaded(launch, holder[0])
        if new is not None:
            holder[0] = new

    signal.signal(signal.SIGHUP, on_hangup)
    try:
        ae = make_ae(settings)
        server = bind_server(ae, settings, shared=True)
        queue = open_queue(settings)
        store = open_store(settings)
    except Exception as error:  # the port, the TLS files, the queue: say why, and stop
        messages.put(("error", index, f"{type(error).__name__}: {error}"))
        return
    receiver = Receiver(lambda: holder[0], store, queue, wake, AuditLog(settings.node.data_dir))
    receiver.metrics = MetricsRelay(messages, index)  # counted in the node's process, which serves /metrics
    serve_associations(ae, server, settings, receiver, slots)
    messages.put(("ready", index, ""))
    while not stopped.wait(1.0):
        pass
    receiver.stopping.set()
    deadline = time.monotonic() + settings.node.dimse_timeout_s
    while [a for a in ae.active_associations if a.is_acceptor] and time.monotonic() < deadline:
        time.sleep(0.1)
    server.shutdown()
    for association in ae.active_associations:
        association.abort()
    queue.close()
    store.close()


class ReceiverProcesses:
    """Receiving processes 1 .. N-1 of a node whose own process is number 0: started, replaced when one dies,
    told of a SIGHUP, stopped."""

    def __init__(
        self, settings: Settings, launch: Launch, slots: AssociationSlots, wake: WakeUp, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.launch = launch
        self.slots = slots
        self.wake = wake
        self.context = multiprocessing.get_context("spawn")  # no torch here, and no threads copied by a fork
        self.messages: multiprocessing.Queue = self.context.Queue()
        self.processes: dict[int, multiprocessing.process.BaseProcess] = {}
        self.stopping = threading.Event()
        self.restarts = 0

    def start(self, timeout: float = 120.0) -> None:
        """Start them all and wait until each answers on the port; RuntimeError naming the first that could not."""
        for index in range(1, self.settings.node.receivers):
            self._spawn(index)
        waiting = set(self.processes)
        deadline = time.monotonic() + timeout
        while waiting:
            kind, index, detail = self.messages.get(timeout=max(0.1, deadline - time.monotonic()))
            if kind == "metric":  # an association came in before its process's "ready" was read
                self.metrics.record(*detail)
            elif kind == "error":
                raise RuntimeError(f"receiving process {index} could not start: {detail}")
            else:
                waiting.discard(index)
        threading.Thread(target=self._supervise, name="receivers", daemon=True).start()
        log.info("%d receiving processes share port %d", self.settings.node.receivers, self.settings.node.port)

    def _spawn(self, index: int) -> None:
        process = self.context.Process(
            target=run,
            args=(self.settings, self.launch, index, self.slots.for_process(index), self.wake, self.messages),
            name=f"cxrnode-receiver-{index}",
            daemon=True,
        )
        process.start()
        self.processes[index] = process

    def _supervise(self) -> None:
        while not self.stopping.wait(1.0):
            for index, process in list(self.processes.items()):
                if process.is_alive() or self.stopping.is_set():
                    continue
                log.error("receiving process %d died (exit code %s); starting another", index, process.exitcode)
                self.slots.clear(index)
                self.restarts += 1
                self._spawn(index)
            while not self.messages.empty():  # counts, and the replacements' ready / error messages (not waited for)
                kind, index, detail = self.messages.get_nowait()
                if kind == "metric":
                    self.metrics.record(*detail)
                elif kind == "error":
                    log.error("receiving process %d could not start: %s", index, detail)

    def reload(self) -> None:
        for process in self.processes.values():
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGHUP)

    def stop(self, timeout: float = 60.0) -> None:
        self.stopping.set()
        for process in self.processes.values():
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5)
