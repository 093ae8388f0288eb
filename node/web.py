"""The node's HTTP side (read-only): Prometheus metrics, health and readiness, and a status page.

    /metrics        Prometheus text format, cxrnode_* series
    /healthz        200 while the process runs
    /readyz         200 when the model is loaded, the queue database takes writes and the disk is above its
                    low-water mark; else 503 with the reasons (JSON)
    /               the status page: this node, its peers and destinations, the queue, recent jobs with overlays
    /api/status     the same as JSON
    /thumbnails/N.png   the overlay picture of job N
    POST /dicom-web/studies   DICOMweb STOW-RS: images in, as by C-STORE (node.stow_server)

Everything but /healthz and /readyz needs the token when one is configured.
"""

from __future__ import annotations

import datetime
import hmac
import html
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from node.config import Settings
from node.metrics import Metrics
from node.queue import JobState, Queue
from node.receiving import Receiver
from node.sender import Sender
from node.spool import THUMBNAILS
from node.stow_server import handle_stow, is_stow_path

log = logging.getLogger(__name__)


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
    receiver: Receiver | None = None
    """Where STOW-RS requests are stored (None: POST is refused)."""


def readiness(sources: StatusSources) -> list[str]:
    """Reasons the node is not ready; empty when it is."""
    problems = []
    if not sources.model_version():
        problems.append("model not loaded")
    try:
        sources.queue.check_writable()
    except Exception as error:
        problems.append(f"queue database not writable: {error}")
    low = sources.low_on_disk()
    if low:
        problems.append(low)
    return problems


def status(sources: StatusSources, limit: int = 20) -> dict[str, Any]:
    settings = sources.settings()
    jobs = sources.queue.jobs(limit=limit)
    destinations = {p.name for p in settings.destinations_for("")} | {
        n for r in settings.routing.rules for n in r.destinations
    }
    sender_state = sources.sender.destination_state() if sources.sender else {}
    return {
        "node": {
            "ae_title": settings.node.ae_title,
            "host": settings.node.host,
            "port": settings.node.port,
            "tls": settings.tls.enabled,
            "model_version": sources.model_version(),
        },
        "ready": readiness(sources),
        "queue": {state.value: n for state, n in sources.queue.counts().items()},
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
        "jobs": [
            {
                "id": j.id,
                "state": j.state.value,
                "calling_ae": j.calling_ae,
                "sop_instance_uid": j.sop_instance_uid,
                "received": datetime.datetime.fromtimestamp(j.received_at).isoformat(sep=" ", timespec="seconds"),
                "error": j.error,
                "delivered": list(j.delivered),
                "results": [r.kind for r in j.results],
                "thumbnail": f"/{THUMBNAILS}/{j.id}.png"
                if (sources.data_dir / THUMBNAILS / f"{j.id}.png").is_file()
                else None,
            }
            for j in jobs
        ],
    }


STATE_COLOURS = {
    JobState.DONE.value: "#1b7f3b",
    JobState.SKIPPED.value: "#777",
    JobState.FAILED.value: "#b00020",
    JobState.DEAD.value: "#b00020",
    JobState.SENDING.value: "#b26a00",
}


def status_page(data: dict[str, Any], token_query: str) -> str:
    e = html.escape
    node = data["node"]
    ready = "ready" if not data["ready"] else "not ready: " + "; ".join(data["ready"])
    queue = "".join(f"<td>{e(state)}</td><td class=n>{n}</td>" for state, n in data["queue"].items())
    peers = (
        "".join(
            f"<tr><td>{e(p['name'])}</td><td>{e(p['ae_title'])}</td><td>{e(p['address'])}</td>"
            f"<td>{'yes' if p['may_send'] else ''}</td><td>{e(', '.join(p['objects'])) if p['destination'] else ''}</td>"
            f"<td>{e(p.get('last_delivered') or '')}</td><td class=err>{e(p.get('last_error') or '')}</td></tr>"
            for p in data["peers"]
        )
        or "<tr><td colspan=7>no peers: any calling AE is accepted; results are written under the data dir</td></tr>"
    )
    jobs = (
        "".join(
            f"<tr><td class=n>{j['id']}</td><td style='color:{STATE_COLOURS.get(j['state'], '#000')}'>{e(j['state'])}"
            f"</td><td>{e(j['received'])}</td><td>{e(j['calling_ae'])}</td><td class=uid>{e(j['sop_instance_uid'])}</td>"
            f"<td>{e(', '.join(j['results']))}</td><td>{e(', '.join(j['delivered']))}</td>"
            f"<td class=err>{e(j['error'] or '')}</td><td>"
            + (
                f"<a href='{j['thumbnail']}{token_query}'><img alt='overlay of job {j['id']}' "
                f"src='{j['thumbnail']}{token_query}'></a>"
                if j["thumbnail"]
                else ""
            )
            + "</td></tr>"
            for j in data["jobs"]
        )
        or "<tr><td colspan=9>no jobs yet</td></tr>"
    )
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><meta http-equiv=refresh content=10>
<title>cxrnode {e(node["ae_title"])}</title>
<style>
body{{font:14px system-ui,sans-serif;margin:1.5em;color:#222}} h1{{font-size:1.4em;margin:0 0 .2em}}
table{{border-collapse:collapse;margin:.5em 0 1.5em}} td,th{{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;
vertical-align:top}} .n{{text-align:right}} .uid{{font-family:monospace;font-size:12px}} .err{{color:#b00020}}
img{{height:96px}} .banner{{background:#fff3cd;padding:6px 10px;display:inline-block}}
</style></head><body>
<h1>cxrnode — {e(node["ae_title"])} on {e(node["host"])}:{node["port"]}{" (TLS)" if node["tls"] else ""}</h1>
<p id=ready>{e(ready)} · model {e(node["model_version"] or "not loaded")}</p>
<p class=banner>AI results for lung opacity — not for diagnostic use.</p>
<h2>Queue</h2><table id=queue><tr>{queue}</tr></table>
<h2>Peers and destinations</h2>
<table id=peers><tr><th>name</th><th>AE title</th><th>address</th><th>may send</th><th>receives</th>
<th>last delivery</th><th>last error</th></tr>{peers}</table>
<h2>Recent jobs</h2>
<table id=jobs><tr><th>job</th><th>state</th><th>received</th><th>from</th><th>SOP Instance UID</th><th>results</th>
<th>delivered to</th><th>error</th><th>overlay</th></tr>{jobs}</table>
</body></html>"""


def make_handler(sources: StatusSources) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "cxrnode"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
            log.debug("http %s", format % args)

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
                    json.dumps({"ready": not problems, "problems": problems}).encode(),
                    "application/json",
                )
            if not self._authorised(query):
                return self._send(401, b"token required\n", "text/plain; charset=utf-8")
            token = sources.settings().http.token
            token_query = f"?token={token}" if token and "token" in query else ""
            if url.path == "/metrics":
                return self._send(200, generate_latest(sources.metrics.registry), CONTENT_TYPE_LATEST)
            if url.path == "/api/status":
                return self._send(200, json.dumps(status(sources)).encode(), "application/json")
            if url.path in ("/", "/index.html"):
                return self._send(200, status_page(status(sources), token_query).encode(), "text/html; charset=utf-8")
            match = re.fullmatch(rf"/{THUMBNAILS}/(\d+)\.png", url.path)
            if match:
                path = sources.data_dir / THUMBNAILS / f"{int(match.group(1))}.png"
                if path.is_file():
                    return self._send(200, path.read_bytes(), "image/png")
            return self._send(404, b"not found\n", "text/plain; charset=utf-8")

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            url = urlparse(self.path)
            if sources.receiver is None or not is_stow_path(url.path):
                return self._send(404, b"not found\n", "text/plain; charset=utf-8")
            handle_stow(self, sources.receiver, url.path, authorised=self._authorised(parse_qs(url.query)))

    return Handler


def start_http(sources: StatusSources) -> ThreadingHTTPServer | None:
    http = sources.settings().http
    if not http.port:
        return None
    server = ThreadingHTTPServer((http.host, http.port), make_handler(sources))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log.info(
        "HTTP on %s:%d: /metrics /healthz /readyz and the status page%s",
        http.host,
        http.port,
        " (token required)" if http.token else "",
    )
    return server
