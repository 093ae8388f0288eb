"""The node's HTTP side (read-only): Prometheus metrics, health and readiness, and a status page.

    /metrics            Prometheus text format, cxrnode_* series
    /healthz            200 while the process runs
    /readyz             200 when the model is loaded, the queue database takes writes and the disk is above its
                        low-water mark; else 503 with the reasons (JSON)
    /                   the status page (node.status_page): this node, uptime, throughput, free disk, its peers and
                        destinations, the queue, and the jobs with their findings, newest first, a page at a time
    /api/status         the same as JSON
        ?state=S        only the jobs in state S (received, inferring, ..., dead)
        ?before=N       only the jobs older than job N (the next page: `paging.next_before`)
        ?limit=L        jobs per page (1 to 500, default 20)
    /thumbnails/N.png   the overlay picture of job N, small
    /overlays/N.jpg     the same, full size
    POST /dicom-web/studies   DICOMweb STOW-RS: images in, as by C-STORE (node.stow_server)

Everything but /healthz and /readyz needs the token when one is configured. The page shows Accession Number and
Study Date, never a patient's name, ID or birth date; nothing from a job's study is logged.
"""

from __future__ import annotations

import bisect
import datetime
import hmac
import json
import logging
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from node.config import Settings
from node.metrics import Metrics
from node.queue import Job, JobState, Queue
from node.receiving import Receiver
from node.sender import Sender
from node.status_page import status_page
from node.store import OVERLAYS, THUMBNAILS, Store, StoreError, picture_key
from node.stow_server import handle_stow, is_stow_path

log = logging.getLogger(__name__)

PROCESSED = "cxrnode_images_processed_total"
WINDOWS_MIN = (5, 60)
"""Throughput windows on the page, in minutes."""
SAMPLE_EVERY_S = 10.0
MAX_PAGE = 500
PICTURES = {THUMBNAILS: ("png", "image/png"), OVERLAYS: ("jpg", "image/jpeg")}
"""Folder under the data dir (and URL path) → suffix and type of the overlay pictures node.worker saves there."""


class Throughput:
    """Images analysed in the last minutes, from samples of a counter that starts at 0 when the node starts.

    The HTTP side samples the counter every `SAMPLE_EVERY_S`; a window longer than the node's uptime counts since
    the start. Samples older than the longest window are dropped."""

    def __init__(self, started_at: float, keep_s: float = 60.0 * max(WINDOWS_MIN)) -> None:
        self.keep_s = keep_s
        self._samples: deque[tuple[float, float]] = deque([(started_at, 0.0)])
        self._lock = threading.Lock()

    def sample(self, now: float, value: float) -> None:
        with self._lock:
            self._samples.append((now, value))
            while len(self._samples) > 2 and self._samples[1][0] <= now - self.keep_s:
                self._samples.popleft()  # the one kept before the window is the window's baseline

    def in_last(self, seconds: float, now: float, value: float) -> float:
        """How much the counter (now at `value`) grew in the last `seconds`."""
        with self._lock:
            times = [t for t, _ in self._samples]
            index = bisect.bisect_right(times, now - seconds) - 1  # the latest sample at or before the window start
            baseline = self._samples[max(0, index)][1]
        return max(0.0, value - baseline)


@dataclass
class StatusSources:
    """What the status page and the probes read; all of it already exists in the running node."""

    settings: Callable[[], Settings]
    queue: Queue
    metrics: Metrics
    sender: Sender | None
    model_version: Callable[[], str | None]
    low_on_disk: Callable[[], str | None]
    data_dir: Path
    started_at: float = field(default_factory=time.time)
    """When the node started (time.time()), for the uptime."""
    throughput: Throughput = field(init=False)
    receiver: Receiver | None = None
    """Where STOW-RS requests are stored (None: POST is refused)."""
    roles: tuple[str, ...] = ("receive", "infer", "send")
    """What this node runs (`[node] roles`); a node without "infer" loads no model."""
    store: Store | None = None
    """Where the overlay pictures are (None: the receiver's store; with neither, no pictures)."""

    def picture_store(self) -> Store | None:
        return self.store or (self.receiver.store if self.receiver is not None else None)

    def __post_init__(self) -> None:
        self.throughput = Throughput(self.started_at)

    def processed(self) -> float:
        return self.metrics.registry.get_sample_value(PROCESSED) or 0.0


@dataclass(frozen=True)
class JobsPage:
    """Which jobs to show: the query of / and /api/status, checked once here."""

    state: JobState | None = None
    before: int | None = None
    limit: int = 20

    @classmethod
    def from_query(cls, query: dict[str, list[str]]) -> JobsPage:
        """Raise ValueError naming the parameter, the value and what is allowed."""

        def whole(name: str, high: int, what: str) -> int | None:
            text = query.get(name, [""])[0]
            if not text:
                return None
            if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= high:
                raise ValueError(f"{name}={text!r}: give {what}")
            return int(text)

        state = query.get("state", [""])[0]
        if state and state not in {s.value for s in JobState}:
            raise ValueError(f"state={state!r}: choose one of {', '.join(s.value for s in JobState)}")
        return cls(
            state=JobState(state) if state else None,
            before=whole("before", 2**63 - 1, "a job id (a whole number, 1 or more)"),
            limit=whole("limit", MAX_PAGE, f"a whole number from 1 to {MAX_PAGE}") or cls.limit,
        )


def readiness(sources: StatusSources) -> list[str]:
    """Reasons the node is not ready; empty when it is."""
    problems = []
    if "infer" in sources.roles and not sources.model_version():
        problems.append("model not loaded")
    try:
        sources.queue.check_writable()
    except Exception as error:
        problems.append(f"queue database not writable: {error}")
    low = sources.low_on_disk()
    if low:
        problems.append(low)
    return problems


def local_time(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


def picture(sources: StatusSources, folder: str, job_id: int) -> str | None:
    """The URL of a job's overlay picture in `folder`, if the worker saved one."""
    store = sources.picture_store()
    try:
        return (
            f"/{picture_key(folder, job_id)}"
            if store is not None and store.exists(picture_key(folder, job_id))
            else None
        )
    except StoreError:
        return None


def job_status(sources: StatusSources, job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "state": job.state.value,
        "calling_ae": job.calling_ae,
        "sop_instance_uid": job.sop_instance_uid,
        "accession_number": job.accession_number,
        "study_date": job.study_date,
        "received": local_time(job.received_at),
        "error": job.error,
        "finding": job.finding,
        "timings": job.timings,
        "model_version": job.model_version,
        "delivered": list(job.delivered),
        "results": [r.kind for r in job.results],
        "thumbnail": picture(sources, THUMBNAILS, job.id),
        "overlay": picture(sources, OVERLAYS, job.id),
    }


def status(sources: StatusSources, page: JobsPage | None = None) -> dict[str, Any]:
    page = page or JobsPage()
    settings = sources.settings()
    jobs = sources.queue.jobs(page.state, limit=page.limit + 1, before=page.before)  # one more: is there a next page?
    destinations = {p.name for p in settings.destinations_for("")} | {
        n for r in settings.routing.rules for n in r.destinations
    }
    sender_state = sources.sender.destination_state() if sources.sender else {}
    now, processed = time.time(), sources.processed()
    disk = shutil.disk_usage(sources.data_dir)
    counts = {state.value: n for state, n in sources.queue.counts().items()}
    return {
        "node": {
            "node_id": settings.queue.node_id,
            "roles": list(sources.roles),
            "ae_title": settings.node.ae_title,
            "host": settings.node.host,
            "port": settings.node.port,
            "tls": settings.tls.enabled,
            "model_version": sources.model_version(),
            "started": local_time(sources.started_at),
            "uptime_s": round(now - sources.started_at),
            "data_dir": str(sources.data_dir),
            "disk_free_bytes": disk.free,
            "disk_total_bytes": disk.total,
        },
        "ready": readiness(sources),
        "queue": counts,
        "total": sum(counts.values()),
        "throughput": {
            "analysed_since_start": int(processed),
            **{
                f"analysed_last_{minutes}_min": int(sources.throughput.in_last(60 * minutes, now, processed))
                for minutes in WINDOWS_MIN
            },
        },
        "nodes": cluster(sources, now),
        "links": {"metrics": "/metrics", "api": "/api/status"},
        "peers": [
            {
                "name": p.name,
                "ae_title": p.ae_title,
                "address": f"{p.host}:{p.port}",
                "may_send": p.may_send,
                "destination": p.name in destinations,
                "objects": settings.objects_for(p) if p.name in destinations else [],
                **sender_state.get(p.name, {}),
            }
            for p in settings.peers
        ],
        "jobs": [job_status(sources, j) for j in jobs[: page.limit]],
        "paging": {
            "state": page.state.value if page.state else None,
            "before": page.before,
            "limit": page.limit,
            "next_before": jobs[page.limit - 1].id if len(jobs) > page.limit else None,
        },
    }


def cluster(sources: StatusSources, now: float) -> list[dict[str, Any]]:
    """Every node sharing the queue (this one included), from their heartbeats: a node silent for longer than
    SILENT_AFTER_S heartbeats is marked so (stopped, or cut off from the database)."""
    return [
        {
            "node_id": n.node_id,
            "roles": list(n.roles),
            "host": n.host,
            "started": local_time(n.started_at),
            "last_heartbeat_s": round(max(0.0, now - n.last_seen), 1),
            "silent": now - n.last_seen > SILENT_AFTER_S,
            "this_node": n.node_id == sources.settings().queue.node_id,
        }
        for n in sources.queue.nodes()
    ]


SILENT_AFTER_S = 30.0
"""A node heartbeats every 5 s at most (node.service); three missed beats and more make it silent."""
PICTURE = re.compile(rf"/({THUMBNAILS}|{OVERLAYS})/(\d+)\.(png|jpg)")
TOKEN_IN_QUERY = re.compile(r"(token=)[^&\s]*")


def make_handler(sources: StatusSources) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "cxrnode"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
            log.debug("http %s", TOKEN_IN_QUERY.sub(r"\1...", format % args))

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _authorised(self, query: dict[str, list[str]]) -> bool:
            token = sources.settings().http.token
            if not token:
                return True
            given = query.get("token", [""])[0]
            header = self.headers.get("Authorization", "")
            if header.startswith("Bearer "):
                given = header.removeprefix("Bearer ").strip()
            return hmac.compare_digest(given.encode(), token.encode())

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            url = urlparse(self.path)
            query = parse_qs(url.query)
            if url.path == "/healthz":
                return self._send(200, b"ok\n", "text/plain; charset=utf-8")
            if url.path == "/readyz":
                problems = readiness(sources)
                return self._send(
                    200 if not problems else 503,
                    json.dumps(
                        {"ready": not problems, "problems": problems, "model": sources.model_version()}
                    ).encode(),
                    "application/json",
                )
            if not self._authorised(query):
                return self._send(401, b"token required\n", "text/plain; charset=utf-8")
            if url.path == "/metrics":
                return self._send(200, generate_latest(sources.metrics.registry), CONTENT_TYPE_LATEST)
            if url.path in ("/", "/index.html", "/api/status"):
                try:
                    page = JobsPage.from_query(query)
                except ValueError as error:
                    return self._send(400, f"{error}\n".encode(), "text/plain; charset=utf-8")
                data = status(sources, page)
                if url.path == "/api/status":
                    return self._send(200, json.dumps(data).encode(), "application/json")
                token = sources.settings().http.token if "token" in query else None  # links carry it on
                return self._send(200, status_page(data, token).encode(), "text/html; charset=utf-8")
            match = PICTURE.fullmatch(url.path)
            if match and PICTURES[match.group(1)][0] == match.group(3):
                folder, number, _ = match.groups()
                store = sources.picture_store()
                try:
                    if store is not None:
                        return self._send(200, store.get(picture_key(folder, int(number))), PICTURES[folder][1])
                except StoreError:  # StoreMissing: never made (or the store is away): 404
                    pass
            return self._send(404, b"not found\n", "text/plain; charset=utf-8")

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            url = urlparse(self.path)
            if sources.receiver is None or not is_stow_path(url.path):
                return self._send(404, b"not found\n", "text/plain; charset=utf-8")
            handle_stow(self, sources.receiver, url.path, authorised=self._authorised(parse_qs(url.query)))

    return Handler


class StatusServer(ThreadingHTTPServer):
    """The HTTP server, and beside it the thread that samples the throughput counter; shutdown() stops both. Made
    bound but not listening (`bind_http`), so that start-up takes the port before anything heavy; `start` listens."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, BaseHTTPRequestHandler, bind_and_activate=False)
        self.sources: StatusSources | None = None
        self.stopped = threading.Event()

    def start(self, sources: StatusSources) -> None:
        self.sources = sources
        self.RequestHandlerClass = make_handler(sources)
        self.server_activate()  # listen
        threading.Thread(target=self.serve_forever, name="http", daemon=True).start()
        threading.Thread(target=self._sample, name="throughput", daemon=True).start()

    def _sample(self) -> None:
        while not self.stopped.wait(SAMPLE_EVERY_S):
            if self.sources is not None:
                self.sources.throughput.sample(time.time(), self.sources.processed())

    def shutdown(self) -> None:
        self.stopped.set()
        super().shutdown()


def bind_http(settings: Settings) -> StatusServer | None:
    """Take the HTTP port (bound, not yet listening); None when `[http] port` is 0. Raises OSError naming the port
    when it is taken."""
    http = settings.http
    if not http.port:
        return None
    server = StatusServer((http.host, http.port))
    try:
        server.server_bind()
    except OSError as error:
        server.server_close()
        raise OSError(error.errno, f"HTTP port {http.host}:{http.port}: {error.strerror}") from None
    return server


def serve_http(server: StatusServer | None, sources: StatusSources) -> StatusServer | None:
    """Answer requests on a server from `bind_http`."""
    if server is None:
        return None
    server.start(sources)
    http = sources.settings().http
    log.info(
        "HTTP on %s:%d: /metrics /healthz /readyz and the status page%s",
        http.host,
        http.port,
        " (token required)" if http.token else "",
    )
    return server


def start_http(sources: StatusSources) -> StatusServer | None:
    """Bind and serve at once (tests, tools)."""
    return serve_http(bind_http(sources.settings()), sources)
