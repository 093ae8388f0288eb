"""Keeping the leases of the jobs a stage holds: a thread renews them every third of the lease, so a live holder
never loses a job to another node, and a dead one loses them all within one lease.

The holder only says what it took (`hold`); jobs it finished drop out by themselves, because `Queue.renew` renews
only jobs still held in a leased state (recording results or a delivery lets go of the lease)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from node.queue import Queue, QueueError

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, queue: Queue, node_id: str, lease_s: float) -> None:
        self.queue = queue
        self.node_id = node_id
        self.lease_s = lease_s
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def hold(self, job_ids: Iterable[int]) -> None:
        """Renew these jobs' leases from now on, until they move on."""
        with self._lock:
            self._held.update(job_ids)

    def let_go(self, job_ids: Iterable[int]) -> None:
        """Stop renewing these jobs (the holder failed with them, e.g. the database went away mid-batch): their
        leases run out and any node, this one included, takes them again."""
        with self._lock:
            self._held.difference_update(job_ids)

    def held(self) -> set[int]:
        with self._lock:
            return set(self._held)

    def renew_now(self) -> None:
        held = self.held()
        if not held:
            return
        renewed = set(self.queue.renew(sorted(held), self.node_id, self.lease_s))
        with self._lock:
            self._held -= held - renewed  # moved on, or taken over: no longer ours
        lost = held - renewed
        if lost:
            log.debug("%d job(s) no longer held by %s: %s", len(lost), self.node_id, sorted(lost)[:20])

    def _run(self) -> None:
        while not self._stopping.wait(self.lease_s / 3):
            try:
                self.renew_now()
            except QueueError as error:  # the database is away: keep trying; the lease may still be running
                log.warning("cannot renew the leases of %s: %s", self.node_id, error)
