"""What the settings mean, in a few lines a person reads: ``cxrnode config check FILE`` prints it."""

from __future__ import annotations

import pydicom.uid

from node.config.schema import Settings


def describe(settings: Settings) -> str:
    """A short human summary for ``cxrnode config check``."""
    node = settings.node
    allowed = settings.allowed_calling_aes()
    lines = [
        f"node       {node.ae_title} listening on {node.host}:{node.port}, data in {node.data_dir}",
        "accepts    "
        + (
            "any calling AE (no peer has may_send = true)"
            if allowed is None
            else "calling AEs " + (", ".join(sorted(allowed)) or "none (the peers that may send have no AE title)")
        ),
    ]
    routed = set(settings.routing.default).union(*(r.destinations for r in settings.routing.rules))
    for peer in settings.peers:
        roles = (["may send to us"] if peer.may_send else []) + (["receives results"] if peer.name in routed else [])
        role = ", ".join(roles) or "unused"
        if peer.name in routed:
            role += f": {', '.join(settings.objects_for(peer))}"
        if peer.url:
            auth = (
                ", bearer token" if peer.token or peer.token_env else f", user {peer.username}" if peer.username else ""
            )
            text = f"peer       {peer.name}: {peer.url} (DICOMweb; {role}{auth})"
        else:
            text = f"peer       {peer.name}: {peer.address} ({role}{', TLS' if peer.tls else ''})"
        lines.append(text + (f" - {peer.description}" if peer.description else ""))

    def route(names: list[str]) -> str:
        return ", ".join(names) if names else f"files in {settings.results_dir}"

    lines.append(f"route      default -> {route(settings.routing.default)}")
    for rule in settings.routing.rules:
        lines.append(f"route      from {rule.calling_ae} -> {route(rule.destinations)}")

    def values(items: list[str]) -> str:
        return ", ".join(v or "(empty)" for v in items)

    f = settings.filters
    sop_names = [pydicom.uid.UID(u).keyword or u for u in f.sop_classes]
    lines.append(
        f"filters    modalities {values(f.modalities)}; body parts {values(f.body_parts)}; "
        f"views {values(f.view_positions)}; SOP classes {', '.join(sop_names)}"
    )
    inf = settings.inference
    lines.append(
        f"inference  device {inf.device}, batch {inf.batch_size}, wait {inf.max_wait_ms} ms, "
        f"{inf.max_tries} tries, weights {inf.weights or 'demo (shipped)'}"
    )
    lines.append(f"outputs    {', '.join(settings.outputs.objects)}")
    s = settings.sender
    lines.append(
        f"sender     as {s.calling_ae_title}, {s.max_attempts} attempts, retry {s.retry_base_s:g} s x{s.retry_factor:g} "
        f"up to {s.retry_max_delay_s:g} s, timeout {s.timeout_s:g} s"
    )
    from node.queue import queue_url, redacted

    lines.append(
        f"queue      {redacted(queue_url(settings))}, node id {settings.queue.node_id}, lease {settings.queue.lease_s:g} s"
    )
    return "\n".join(lines)
