"""The sender: delivers each job's result objects to its destinations, with retries: by C-STORE, or by DICOMweb
STOW-RS (node.stow_client) to a destination with a url.

A C-STORE destination has a job's results when every object was answered with Success or one of the storage
warnings 0xB000 / 0xB006 / 0xB007; a STOW-RS destination when it lists every one as stored. Otherwise the job is tried again after base × factor^(attempt-1) seconds (at most
max_delay), and after max_attempts it is `dead` with the last error; `cxrnode resend` revives it.
"""

from __future__ import annotations

import datetime
import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from node.audit import AuditLog
from node.config import Peer, SenderSettings, Settings, TLSSettings
from node.faults import crash_point
from node.metrics import Metrics
from node.queue import Job, JobState, Queue, WakeUp
from node.queue.leases import LeaseKeeper
from node.statuses import DELIVERED
from node.store import Store, readable
from node.stow_client import store_dicomweb

log = logging.getLogger(__name__)


class DeliveryError(Exception):
    """A destination did not take the results; the message says which object and why."""


def backoff(settings: SenderSettings, attempts: int) -> float:
    """Seconds to wait after the `attempts`-th failed attempt (1-based)."""
    return float(min(settings.retry_max_delay_s, settings.retry_base_s * settings.retry_factor ** (attempts - 1)))


def client_tls_context(tls: TLSSettings) -> ssl.SSLContext:
    """TLS 1.2+ client context: our certificate for destinations that ask, theirs checked against our CAs."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # DICOM peers are configured by address; trust comes from the CA
    if tls.certificate is not None and tls.private_key is not None:
        context.load_cert_chain(tls.certificate, tls.private_key)
    if tls.verify_destinations:
        context.verify_mode = ssl.CERT_REQUIRED
        if tls.ca_certificates is not None:
            context.load_verify_locations(tls.ca_certificates)
        else:
            context.load_default_certs()
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def store(
    peer: Peer,
    paths: Sequence[Path],
    *,
    calling_ae: str,
    timeout: float,
    sop_classes: Sequence[str],
    tls: ssl.SSLContext | None = None,
) -> None:
    """Send `paths` to `peer` in one association, proposing exactly their SOP classes in Explicit and Implicit VR
    Little Endian. Raises DeliveryError unless every object is delivered."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class in sorted(set(sop_classes)):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(
        peer.host, peer.port, ae_title=peer.ae_title, tls_args=(tls, None) if tls is not None else None
    )
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise DeliveryError(f"association with {peer.ae_title}@{peer.host}:{peer.port} failed ({reason})")
    try:
        for path in paths:
            ds = dcmread(path)
            status = assoc.send_c_store(ds)
            if "Status" not in status:
                raise DeliveryError(f"{path.name}: no C-STORE response from {peer.ae_title} (timeout or abort)")
            if int(status.Status) not in DELIVERED:
                comment = status.get("ErrorComment", "")
                raise DeliveryError(
                    f"{path.name}: {peer.ae_title} answered 0x{int(status.Status):04X} {comment}".strip()
                )
    finally:
        if assoc.is_established:
            assoc.release()


class Sender:
    def __init__(
        self,
        settings: Callable[[], Settings],
        queue: Queue,
        store: Store,
        wake: WakeUp,
        audit: AuditLog,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.store = store
        self.wake = wake
        self.audit = audit
        self.metrics = metrics
        self.node_id = settings().queue.node_id
        self.leases = LeaseKeeper(queue, self.node_id, settings().queue.lease_s)  # no other sender takes ours
        self._state: dict[str, dict[str, str]] = {}
        self._state_lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sender", daemon=True)

    def start(self) -> None:
        self.leases.start()
        self.thread.start()

    def destination_state(self) -> dict[str, dict[str, str]]:
        """Per destination: when it last took results, and the last error (for the status page)."""
        with self._state_lock:
            return {name: dict(state) for name, state in self._state.items()}

    def _note(self, destination: str, **fields: str) -> None:
        with self._state_lock:
            self._state.setdefault(destination, {}).update(fields)

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout)
        self.leases.stop()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                jobs = self.queue.claim_due(time.time(), 32, self.node_id, self.settings().queue.lease_s)
                self.leases.hold(job.id for job in jobs)
                for job in jobs:
                    if self.stopping.is_set():
                        return
                    self.deliver(job)
                if not jobs:
                    # Poll at least every second: `cxrnode resend` (another process) changes the queue directly.
                    self.wake.wait(timeout=1.0)
                    self.wake.clear()
            except Exception:
                log.exception("sender: unexpected error; retrying in 5 s")
                self.stopping.wait(5.0)

    def deliver(self, job: Job) -> None:
        settings = self.settings()
        destinations = settings.destinations_for(job.calling_ae)
        delivered = set(job.delivered)
        errors = []
        started = time.perf_counter()
        missing = [r.path for r in job.results if not self.store.exists(r.path)]
        written = {r.kind for r in job.results}
        wanted = {kind for peer in destinations for kind in settings.objects_for(peer)}
        if missing or not wanted <= written:
            why = f"result file {missing[0]} missing" if missing else f"{sorted(wanted - written)} not written yet"
            log.warning("job=%d: %s (routing or output profiles changed?); analysing again", job.id, why)
            self.queue.set_state(job.id, JobState.RECEIVED, node_id=self.node_id, error=why)
            return
        for peer in destinations:
            if peer.name in delivered:
                continue
            profile = settings.objects_for(peer)
            results = [r for r in job.results if r.kind in profile]
            paths = [readable(self.store, r.path) for r in results]  # in-memory files, named like the key
            attempt_started = time.perf_counter()
            try:
                if peer.url:
                    store_dicomweb(peer, paths, timeout=settings.sender.timeout_s, tls=settings.tls)
                else:
                    store(
                        peer,
                        paths,
                        calling_ae=settings.sender.calling_ae_title or settings.node.ae_title,
                        timeout=settings.sender.timeout_s,
                        sop_classes=[r.sop_class_uid for r in results],
                        tls=client_tls_context(settings.tls) if peer.tls else None,
                    )
                crash_point("sending")
            except Exception as error:  # DeliveryError, STOWError, or a network error pynetdicom raised
                errors.append(f"{peer.name}: {error}")
                self.metrics.send_failures.labels(destination=peer.name).inc()
                self._note(peer.name, last_error=f"{_now()} {error}"[:300])
                self.audit.record(
                    "delivery",
                    outcome="failed",
                    job=job.id,
                    destination=peer.name,
                    ae_title=peer.ae_title,
                    address=peer.url or f"{peer.host}:{peer.port}",
                    reason=str(error)[:300],
                    source_sop_instance_uid=job.sop_instance_uid,
                    study_instance_uid=job.study_instance_uid,
                    results={r.kind: r.sop_instance_uid for r in results},
                )
                continue
            delivered.add(peer.name)
            self.metrics.send_seconds.labels(destination=peer.name).observe(time.perf_counter() - attempt_started)
            self._note(peer.name, last_delivered=_now(), last_error="")
            log.info(
                "job=%d delivered to %s (%s): %s",
                job.id,
                peer.name,
                peer.where,
                " ".join(f"{r.kind}={r.sop_instance_uid}" for r in results),
            )
            self.audit.record(
                "delivery",
                outcome="delivered",
                job=job.id,
                destination=peer.name,
                ae_title=peer.ae_title,
                address=peer.url or f"{peer.host}:{peer.port}",
                source_sop_instance_uid=job.sop_instance_uid,
                study_instance_uid=job.study_instance_uid,
                results={r.kind: r.sop_instance_uid for r in results},
            )
        self.queue.add_timing(job.id, "sending", time.perf_counter() - started)
        if not errors:
            self.queue.record_attempt(
                job.id,
                delivered=sorted(delivered),
                error=None,
                next_attempt_at=0,
                state=JobState.DONE,
                node_id=self.node_id,
            )
            if job.spool_path:
                self.store.delete(job.spool_path)
            return
        attempts = job.attempts + 1
        error = "; ".join(errors)
        if attempts >= settings.sender.max_attempts:
            log.error("job=%d dead after %d attempts: %s", job.id, attempts, error)
            self.metrics.dead.inc()
            self.audit.record(
                "job",
                outcome="dead",
                job=job.id,
                attempts=attempts,
                reason=error[:300],
                source_sop_instance_uid=job.sop_instance_uid,
            )
            self.queue.record_attempt(
                job.id,
                delivered=sorted(delivered),
                error=error,
                next_attempt_at=0,
                state=JobState.DEAD,
                node_id=self.node_id,
            )
            return
        delay = backoff(settings.sender, attempts)
        log.warning("job=%d attempt %d failed, next in %.0f s: %s", job.id, attempts, delay, error)
        self.queue.record_attempt(
            job.id,
            delivered=sorted(delivered),
            error=error,
            next_attempt_at=time.time() + delay,
            state=JobState.SENDING,
            node_id=self.node_id,
        )


def _now() -> str:
    return datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
