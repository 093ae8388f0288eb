"""PostgreSQL LISTEN/NOTIFY as wake-ups: a thread with a connection of its own listens on the queue's channels and
rings the registered `WakeUp`s of the work announced. The backend sends the NOTIFY in the transaction that made the
work, so it arrives only once that work is committed.

A lost connection (server restart, network) is reopened once a second; every wake-up is rung on each loss and
reconnection, because notifications sent meanwhile are gone and the stages should look at the queue again."""

from __future__ import annotations

import logging
import threading

import psycopg

from node.queue import QueueUnavailable, WakeUp, Work, redacted

log = logging.getLogger(__name__)

CHANNELS = {Work.INFER: "cxrnode_infer", Work.SEND: "cxrnode_send"}


class Listener:
    def __init__(self, url: str) -> None:
        self.url = url
        self._wakes: dict[str, list[WakeUp]] = {channel: [] for channel in CHANNELS.values()}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-listener", daemon=True)

    def add(self, work: Work, wake: WakeUp, timeout: float = 10.0) -> None:
        """Ring `wake` for `work` from now on: returns once the LISTEN is in place (or QueueUnavailable)."""
        with self._lock:
            self._wakes[CHANNELS[work]].append(wake)
            if not self._thread.is_alive():
                self._thread.start()
        if not self._listening.wait(timeout):
            raise QueueUnavailable(f"{redacted(self.url)}: cannot LISTEN for wake-ups within {timeout:.0f} s")

    def close(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _ring(self, channel: str | None) -> None:
        with self._lock:
            wakes = [w for c, ws in self._wakes.items() if channel in (None, c) for w in ws]
        for wake in wakes:
            wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as db:
                    for channel in CHANNELS.values():
                        db.execute(f"LISTEN {channel}")
                    if self._listening.is_set():
                        self._ring(None)  # back after a loss: look again
                    self._listening.set()
                    while not self._stopping.is_set():
                        for notify in db.notifies(timeout=1.0):
                            self._ring(notify.channel)
            except psycopg.Error as error:
                if self._stopping.is_set():
                    return
                log.warning("queue wake-ups from %s lost (%s); reconnecting", redacted(self.url), error)
                self._ring(None)
                self._stopping.wait(1.0)
