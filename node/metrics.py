"""Prometheus metrics, all prefixed `cxrnode_`, in one registry the node passes to whoever records or serves them.

Counters and histograms are updated where things happen (scp, worker, sender); the queue depth and the age of the
oldest unfinished job are read from the queue at each scrape, so they are never stale.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from node.queue import JobState, Queue


class QueueCollector(Collector):
    """cxrnode_queue_depth{state}, cxrnode_oldest_job_age_seconds and cxrnode_node_heartbeat_age_seconds{node_id,
    roles, host}, read from the queue (the whole cluster's, when it is shared) when scraped."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("cxrnode_queue_depth", "Jobs per state", labels=["state"])
        counts = self.queue.counts()
        for state in JobState:
            depth.add_metric([state.value], counts.get(state, 0))
        yield depth
        oldest = self.queue.oldest_unfinished()
        age = GaugeMetricFamily(
            "cxrnode_oldest_job_age_seconds",
            "Age of the oldest job not yet done, skipped, failed or dead (0 when none)",
        )
        age.add_metric([], max(0.0, time.time() - oldest) if oldest is not None else 0.0)
        yield age
        heartbeat = GaugeMetricFamily(
            "cxrnode_node_heartbeat_age_seconds",
            "Seconds since each node sharing the queue last recorded a heartbeat, with its roles",
            labels=["node_id", "roles", "host"],
        )
        for node in self.queue.nodes():
            heartbeat.add_metric(
                [node.node_id, ",".join(node.roles), node.host], max(0.0, time.time() - node.last_seen)
            )
        yield heartbeat


class Metrics:
    def __init__(self, queue: Queue | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("cxrnode_images_received", "Objects acknowledged for analysis", registry=r)
        self.skipped = Counter("cxrnode_images_skipped", "Objects acknowledged but outside the filters", registry=r)
        self.refused = Counter(
            "cxrnode_images_refused", "C-STOREs answered with a failure status", ["status"], registry=r
        )
        self.processed = Counter("cxrnode_images_processed", "Images analysed and their results written", registry=r)
        self.failed = Counter("cxrnode_images_failed", "Images that could not be analysed", registry=r)
        self.dead = Counter("cxrnode_jobs_dead", "Jobs whose delivery gave up after max_attempts", registry=r)
        self.inference_seconds = Histogram(
            "cxrnode_inference_seconds",
            "Time per Predictor call (a whole batch)",
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
        )
        self.batch_size = Histogram(
            "cxrnode_inference_batch_size", "Images per Predictor call", registry=r, buckets=(1, 2, 4, 8, 16, 32, 64)
        )
        self.send_seconds = Histogram(
            "cxrnode_send_seconds",
            "Time to deliver one job's results to a destination",
            ["destination"],
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
        )
        self.send_failures = Counter("cxrnode_send_failures", "Failed delivery attempts", ["destination"], registry=r)
        if queue is not None:
            r.register(QueueCollector(queue))

    def record(self, name: str, value: float = 1.0, status: str | None = None) -> None:
        """Apply one observation, made here or reported by another process of the node (the worker's, see
        node.worker.Report; a receiving process's, through a `MetricsRelay`)."""
        if name == "received":
            self.received.inc(value)
        elif name == "skipped":
            self.skipped.inc(value)
        elif name == "refused":
            self.refused.labels(status=status or "unknown").inc(value)
        elif name == "inference_seconds":
            self.inference_seconds.observe(value)
        elif name == "batch_size":
            self.batch_size.observe(value)
        elif name == "processed":
            self.processed.inc(value)
        elif name == "failed":
            self.failed.inc(value)
        else:
            raise ValueError(f"unknown metric {name!r}")


class Recorder(Protocol):
    """Where the receiving path counts what it received, skipped and refused: the node's `Metrics`, or a
    `MetricsRelay` in another receiving process."""

    def record(self, name: str, value: float = 1.0, status: str | None = None) -> None: ...


class SupportsPut(Protocol):
    """A multiprocessing queue, as far as a `MetricsRelay` needs one."""

    def put(self, item: object) -> None: ...


class MetricsRelay:
    """A receiving process's counts, sent to the node's process (which serves /metrics) as ("metric", index,
    (name, value, status)) messages: `--receivers N` counts every process's images, not only process 0's."""

    def __init__(self, messages: SupportsPut, index: int) -> None:
        self.messages, self.index = messages, index

    def record(self, name: str, value: float = 1.0, status: str | None = None) -> None:
        self.messages.put(("metric", self.index, (name, value, status)))
