"""The status page: node.web's status dict as one HTML page (no scripts; it refreshes itself every 10 s).

What an admin asks first, top to bottom: is the node ready, since when, how much disk is left, how many images it
analysed lately; its peers and destinations; then the jobs, newest first, each with what was found (opacity present,
probability, severity per lung, extent), which study (Accession Number, Study Date), how long each stage took and an
overlay picture that opens at full size. The job table pages back in time and filters by state.
"""

from __future__ import annotations

import html
from typing import Any
from urllib.parse import urlencode

from node.queue import JobState

STATE_COLOURS = {
    JobState.DONE.value: "#1b7f3b",
    JobState.SKIPPED.value: "#777",
    JobState.FAILED.value: "#b00020",
    JobState.DEAD.value: "#b00020",
    JobState.SENDING.value: "#b26a00",
}
STAGES = (("queue_wait", "queue wait"), ("inference", "inference"), ("writing", "writing"), ("sending", "sending"))
"""job.timings keys, in the order the stages run, and their names on the page."""

e = html.escape


def href(path: str, token: str | None, **params: object) -> str:
    """A link on the page, escaped for an attribute; it carries the token on when the page was opened with one."""
    query = {name: value for name, value in params.items() if value is not None}
    if token:
        query["token"] = token
    return e(f"{path}?{urlencode(query)}" if query else path)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    days, hours, minutes = seconds // 86400, seconds // 3600 % 24, seconds // 60 % 60
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {seconds % 60:02d} s"


def study_date(value: str) -> str:
    """DICOM DA (YYYYMMDD) as YYYY-MM-DD; anything else as it came."""
    return f"{value[:4]}-{value[4:6]}-{value[6:]}" if len(value) == 8 and value.isdigit() else value


def finding_cells(finding: dict[str, Any] | None) -> str:
    """Three cells: opacity present and its probability, severity % per lung, extent score per lung."""
    if not finding:
        return "<td class=none>—</td><td class=none>—</td><td class=none>—</td>"
    present = finding["opacity_present"]
    severity, extent = finding["severity_percent"], finding["extent_score"]
    boxes = finding.get("boxes", 0)
    return (
        f"<td class=finding><b class={'present' if present else 'absent'}>opacity {'present' if present else 'absent'}"
        f"</b><br>p = {finding['opacity_probability']:.2f}<br><small>{boxes} box{'' if boxes == 1 else 'es'}</small></td>"
        f"<td class=n><b>{severity['total']:.1f} %</b><br><small>R {severity['right']:.1f} % · "
        f"L {severity['left']:.1f} %</small></td>"
        f"<td class=n><b>{extent['total']}/8</b><br><small>R {extent['right']} · L {extent['left']}</small></td>"
    )


def timing_cell(timings: dict[str, float]) -> str:
    lines = [f"{name} {timings[key]:.2f} s" for key, name in STAGES if key in timings]
    if not lines:
        return "<td class=none>—</td>"
    return f"<td class=timings>{'<br>'.join(lines)}<br><b>total {sum(timings.values()):.2f} s</b></td>"


def job_row(j: dict[str, Any], token: str | None) -> str:
    study = "<br>".join(
        part
        for part in (
            f"acc. {e(j['accession_number'])}" if j["accession_number"] else "",
            e(study_date(j["study_date"])),
            f"from {e(j['calling_ae'])}",
            f"<span class=uid>{e(j['sop_instance_uid'])}</span>",
        )
        if part
    )
    picture = ""
    if j["thumbnail"]:
        picture = (
            f"<a href='{href(j['overlay'] or j['thumbnail'], token)}'><img alt='overlay of job {j['id']}' "
            f"src='{href(j['thumbnail'], token)}'></a>"
        )
    delivered = f"<br>→ {e(', '.join(j['delivered']))}" if j["delivered"] else ""
    return (
        f"<tr id=job-{j['id']}><td class=n>{j['id']}</td>"
        f"<td style='color:{STATE_COLOURS.get(j['state'], '#000')}'>{e(j['state'])}</td>"
        f"<td>{e(j['received'])}</td><td class=study>{study}</td>{finding_cells(j['finding'])}"
        f"{timing_cell(j['timings'])}<td>{e(j['model_version'] or '')}</td>"
        f"<td>{e(', '.join(j['results']))}{delivered}</td><td class=err>{e(j['error'] or '')}</td>"
        f"<td>{picture}</td></tr>"
    )


def status_page(data: dict[str, Any], token: str | None) -> str:
    node, paging, rate = data["node"], data["paging"], data["throughput"]
    ready = "ready" if not data["ready"] else "not ready: " + "; ".join(data["ready"])
    free, total = node["disk_free_bytes"], node["disk_total_bytes"]
    disk = f"{free / 1e9:.1f} GB free of {total / 1e9:.1f} GB ({100 * free / max(total, 1):.0f} %)"
    counts = "".join(
        f"<td><a href='{href('/', token, state=state, limit=paging['limit'])}'>{e(state)}</a></td><td class=n>{n}</td>"
        for state, n in data["queue"].items()
    )
    windows = " · ".join(
        f"last {key.removeprefix('analysed_last_').removesuffix('_min')} min: <b>{n}</b>"
        for key, n in rate.items()
        if key.startswith("analysed_last_")
    )
    peers = (
        "".join(
            f"<tr><td>{e(p['name'])}</td><td>{e(p['ae_title'])}</td><td>{e(p['address'])}</td>"
            f"<td>{'yes' if p['may_send'] else 'no'}</td>"
            f"<td>{e(', '.join(p['objects'])) if p['destination'] else ''}</td>"
            f"<td>{e(p.get('last_delivered') or '')}</td><td class=err>{e(p.get('last_error') or '')}</td></tr>"
            for p in data["peers"]
        )
        or "<tr><td colspan=7>no peers: any calling AE is accepted; results are written under the data dir</td></tr>"
    )
    nodes = "".join(
        f"<tr{' class=err' if n['silent'] else ''}><td>{e(n['node_id'])}{' (this node)' if n['this_node'] else ''}"
        f"</td><td>{e(', '.join(n['roles']))}</td><td>{e(n['host'])}</td><td>{e(n['started'])}</td>"
        f"<td class=n>{n['last_heartbeat_s']:.0f} s ago{' — silent' if n['silent'] else ''}</td></tr>"
        for n in data.get("nodes", [])
    )
    jobs = "".join(job_row(j, token) for j in data["jobs"]) or "<tr><td colspan=12>no jobs here</td></tr>"
    shown = f"state {e(paging['state'])}" if paging["state"] else "all states"
    if paging["before"]:
        shown += f", older than job {paging['before']}"
    navigation = [f"<a id=newest href='{href('/', token, state=paging['state'], limit=paging['limit'])}'>newest</a>"]
    if paging["state"]:
        navigation.append(f"<a id=all-states href='{href('/', token, limit=paging['limit'])}'>all states</a>")
    if paging["next_before"]:
        older = href("/", token, state=paging["state"], before=paging["next_before"], limit=paging["limit"])
        navigation.append(f"<a id=older href='{older}'>older →</a>")
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><meta http-equiv=refresh content=10>
<title>cxrnode {e(node["ae_title"])}</title>
<style>
body{{font:14px system-ui,sans-serif;margin:1.5em;color:#222}} h1{{font-size:1.4em;margin:0 0 .2em}}
h2{{font-size:1.15em;margin:1em 0 .2em}} a{{color:#0b57d0}}
table{{border-collapse:collapse;margin:.5em 0 1em}} td,th{{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;
vertical-align:top}} .n{{text-align:right}} .err{{color:#b00020;max-width:16em}} .none{{color:#999}}
.uid{{font-family:monospace;font-size:11px;color:#555;word-break:break-all}} .study{{max-width:15em}}
.present{{color:#b00020}} .absent{{color:#1b7f3b}} small{{color:#555}} .timings,.finding,.n{{white-space:nowrap}}
img{{height:96px}} .banner{{background:#fff3cd;padding:6px 10px;display:inline-block}}
</style></head><body>
<h1>cxrnode — {e(node["ae_title"])} on {e(node["host"])}:{node["port"]}{" (TLS)" if node["tls"] else ""}</h1>
<p id=ready>{e(ready)} · model {e(node["model_version"] or "not loaded")}
· node {e(node.get("node_id", ""))}, role {e(", ".join(node.get("roles", [])))}</p>
<p id=node>up {duration(node["uptime_s"])} (since {e(node["started"])}) · data folder {e(node["data_dir"])}: {disk}
· <a id=metrics href='{href(data["links"]["metrics"], token)}'>metrics</a>
· <a id=api href='{href(data["links"]["api"], token, state=paging["state"], before=paging["before"])}'>JSON</a></p>
<p class=banner>AI results for lung opacity — not for diagnostic use.</p>
<h2>Totals</h2>
<table id=queue><tr>{counts}<td><a href='{href("/", token, limit=paging["limit"])}'>all</a></td>
<td class=n>{data["total"]}</td></tr></table>
<p id=throughput>images analysed: {windows} · since start: <b>{rate["analysed_since_start"]}</b></p>
<h2>Nodes sharing the queue</h2>
<table id=nodes><tr><th>node</th><th>roles</th><th>host</th><th>started</th><th>last heartbeat</th></tr>{nodes}</table>
<h2>Peers and destinations</h2>
<table id=peers><tr><th>name</th><th>AE title</th><th>address</th><th>may send</th><th>receives</th>
<th>last delivery</th><th>last error</th></tr>{peers}</table>
<h2 id=shown>Jobs <small>({shown}; newest first)</small></h2>
<p id=paging>{" · ".join(navigation)}</p>
<table id=jobs><tr><th>job</th><th>state</th><th>received</th><th>study</th><th>finding</th><th>severity</th>
<th>extent</th><th>timings</th><th>model</th><th>results</th><th>error</th><th>overlay</th></tr>{jobs}</table>
</body></html>"""
