"""The Storage SCP: association policy, and the C-ECHO and C-STORE handlers.

The C-STORE handler only checks, writes, records and answers: the object goes to the spool (temporary file, fsync,
atomic rename, directory fsync), its job is committed to the queue, and only then is Success returned. Pixel data is
not decoded here; the worker does that. A disk or database failure answers 0xA700 (Out of Resources) and leaves no
file.

Association policy (`admission_refusal`, run when an A-ASSOCIATE-RQ arrives): the called AE title must be ours; when
peers with may_send are declared, the calling AE title must be one of them, calling from one of its addresses when
it lists some; each peer holds at most its share of associations; and while the disk is below its low-water mark,
or the node is stopping, new associations are refused as transient (the sender should retry later).
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from io import BytesIO

from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.encaps import generate_fragments
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from node.audit import AuditLog
from node.config import Settings, TLSSettings
from node.faults import crash_point
from node.filters import reason_to_skip
from node.metrics import Metrics
from node.queue import JobState, NewJob, Queue, QueueError, WakeUp
from node.spool import Spool, SpoolError, safe_uid
from node.statuses import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, status_dataset

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Lossy (Near-Lossless)
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Image Compression (Lossless Only)
    "1.2.840.10008.1.2.4.91",  # JPEG 2000 Image Compression
    "1.2.840.10008.1.2.5",  # RLE Lossless
]
"""Every transfer syntax the SCP accepts; each one decodes with pydicom and its pixel-data plugins."""

VERIFICATION_TRANSFER_SYNTAXES = TRANSFER_SYNTAXES[:4]
DEFER_BYTES = 64 * 1024  # values larger than this are not read when a received object is checked
UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class Refusal:
    """An A-ASSOCIATE-RJ: result (1 permanent, 2 transient), source, reason (PS3.8 9.3.4) and why, for the log."""

    result: int
    source: int
    diagnostic: int
    why: str


CALLED_AE_NOT_RECOGNISED = (0x01, 0x01, 0x07)
CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)
TEMPORARY_CONGESTION = (0x02, 0x03, 0x01)
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)


@dataclass
class Receiver:
    """What the handlers need: the current settings, the spool, the queue, a way to wake the worker, the audit."""

    settings: Callable[[], Settings]
    spool: Spool
    queue: Queue
    wake_worker: WakeUp
    audit: AuditLog
    metrics: Metrics = field(default_factory=Metrics)
    stopping: threading.Event = field(default_factory=threading.Event)

    def low_on_disk(self) -> str | None:
        """Why the data dir is below its low-water mark, or None."""
        node = self.settings().node
        free, total = self.spool.free_bytes(), self.spool.total_bytes()
        if free < node.min_free_mb * 1e6:
            return f"only {free / 1e6:.0f} MB free in {self.spool.data_dir} (low-water mark {node.min_free_mb:g} MB)"
        if total and 100 * free / total < node.min_free_percent:
            return f"only {100 * free / total:.2f} % free in {self.spool.data_dir} (low-water mark {node.min_free_percent:g} %)"
        return None


# -- association policy -----------------------------------------------------------------------------------------------


def admission_refusal(
    settings: Settings,
    calling_ae: str,
    called_ae: str,
    address: str,
    active_from_caller: int,
    low_on_disk: str | None,
    stopping: bool,
    active_total: int = 0,
) -> Refusal | None:
    """None to go on with the association, else the A-ASSOCIATE-RJ to send and why."""
    if called_ae.strip() != settings.node.ae_title:
        return Refusal(*CALLED_AE_NOT_RECOGNISED, f"called AE title {called_ae.strip()!r} is not ours")
    allowed = settings.allowed_calling_aes()
    peer = settings.peer_by_ae(calling_ae)
    if allowed is not None:
        if calling_ae.strip() not in allowed or peer is None:
            return Refusal(
                *CALLING_AE_NOT_RECOGNISED, f"calling AE title {calling_ae.strip()!r} is not an allowed peer"
            )
        if peer.addresses and not any(
            ipaddress.ip_address(address) in ipaddress.ip_network(network) for network in peer.addresses
        ):
            return Refusal(
                *CALLING_AE_NOT_RECOGNISED, f"peer {peer.name} ({calling_ae.strip()}) may not call from {address}"
            )
    if stopping:
        return Refusal(*TEMPORARY_CONGESTION, "the node is shutting down")
    if active_total >= settings.node.max_associations:
        return Refusal(
            *LOCAL_LIMIT_EXCEEDED, f"{active_total} associations open, the limit is {settings.node.max_associations}"
        )
    limit = (
        peer.max_associations if peer and peer.max_associations else None
    ) or settings.node.max_associations_per_peer
    if active_from_caller >= limit:
        return Refusal(
            *LOCAL_LIMIT_EXCEEDED,
            f"{calling_ae.strip()} already holds {active_from_caller} association(s), its limit is {limit}",
        )
    if low_on_disk:
        return Refusal(*TEMPORARY_CONGESTION, low_on_disk)
    return None


def handle_requested(event: Event, receiver: Receiver) -> None:
    """EVT_REQUESTED: apply `admission_refusal`; a refusal is sent as A-ASSOCIATE-RJ before any negotiation."""
    assoc = event.assoc
    request = assoc.requestor.primitive
    calling = assoc.requestor.ae_title or (request.calling_ae_title if request else "")
    called = request.called_ae_title if request is not None else ""
    # Only established associations count: a connection that has not asked for one yet (half-open, idle,
    # or garbage) holds no slot, and is closed by the ACSE timeout.
    established = [a for a in assoc.ae.active_associations if a is not assoc and a.is_acceptor and a.is_established]
    from_caller = sum(1 for other in established if other.requestor.ae_title == calling)
    refusal = admission_refusal(
        receiver.settings(),
        calling,
        called,
        assoc.requestor.address,
        from_caller,
        receiver.low_on_disk(),
        receiver.stopping.is_set(),
        active_total=len(established),
    )
    if refusal is None:
        return
    log.warning(
        "association rejected from %s@%s:%s: %s", calling, assoc.requestor.address, assoc.requestor.port, refusal.why
    )
    receiver.audit.record(
        "association",
        outcome="rejected",
        reason=refusal.why,
        calling_ae=calling,
        called_ae=called,
        address=assoc.requestor.address,
        rejection=f"{refusal.result}/{refusal.source}/{refusal.diagnostic}",
    )
    assoc.acse.send_reject(refusal.result, refusal.source, refusal.diagnostic)
    assoc.kill()  # as pynetdicom does after its own rejections: the A-ASSOCIATE-RJ goes out before the socket closes


def _log_accepted(event: Event, receiver: Receiver) -> None:
    log.info("association accepted from %s", _peer(event))
    receiver.audit.record(
        "association",
        outcome="accepted",
        calling_ae=event.assoc.requestor.ae_title,
        called_ae=event.assoc.acceptor.ae_title,
        address=event.assoc.requestor.address,
    )


def _log_rejected(event: Event, receiver: Receiver) -> None:
    """Rejections pynetdicom makes itself after our admission (e.g. the node-wide association limit)."""
    requestor = event.assoc.requestor
    log.warning(
        "association rejected from %s@%s:%s by the DICOM stack (e.g. max_associations reached)",
        requestor.ae_title,
        requestor.address,
        requestor.port,
    )
    receiver.audit.record(
        "association",
        outcome="rejected",
        reason="node-wide association limit or negotiation",
        calling_ae=requestor.ae_title,
        address=requestor.address,
    )


# -- C-ECHO and C-STORE -----------------------------------------------------------------------------------------------


def handle_echo(event: Event) -> int:
    log.info("C-ECHO from %s", _peer(event))
    return SUCCESS


def decoded_size(header: Dataset) -> int:
    """Bytes the pixel data would take decoded (one byte per 1-bit sample), from the header alone."""

    def number(keyword: str, default: int) -> int:
        try:
            return max(0, int(header.get(keyword, default) or default))
        except (TypeError, ValueError):
            return default

    bits = number("BitsAllocated", 16)
    return (
        number("Rows", 0)
        * number("Columns", 0)
        * number("NumberOfFrames", 1)
        * number("SamplesPerPixel", 1)
        * max(1, bits // 8)
    )


def integrity_problem(ds: Dataset, sop_class: str, sop_instance: str, file_size: int) -> str | None:
    """Why a received data set is not whole and consistent, or None. Checks lengths and identities only; nothing
    is decoded. `ds` is read with deferred large values, so Pixel Data's declared length and file offset are known
    without reading it. (pydicom reads a truncated data set without complaint, so the checks are made here.)"""
    if str(ds.get("SOPInstanceUID", "")) != sop_instance:
        return "SOP Instance UID in the data set is missing or differs from the C-STORE request's"
    if str(ds.get("SOPClassUID", "")) != sop_class:
        return "SOP Class UID in the data set is missing or differs from the C-STORE request's"
    if "PixelData" not in ds:
        return None  # not every storage object has pixels; the worker says so if it needed them
    raw = ds.get_item("PixelData")
    if isinstance(raw, RawDataElement):  # still as read: its declared length and where its value starts
        undefined = raw.length == UNDEFINED_LENGTH
        arrived = min(raw.length, max(0, file_size - raw.value_tell)) if raw.value is None else len(raw.value)
    else:  # already converted by pydicom
        undefined = raw.is_undefined_length
        arrived = len(raw.value or b"")
    if undefined:  # encapsulated (read in full, it cannot be deferred): every fragment must be whole
        try:
            fragments = sum(1 for _ in generate_fragments(ds.PixelData))
        except Exception as error:
            return f"encapsulated Pixel Data is truncated or malformed ({error})"
        return None if fragments else "encapsulated Pixel Data has no fragments"
    expected = decoded_size(ds)
    if int(ds.get("BitsAllocated", 16) or 16) == 1:  # 1-bit data packs eight pixels in a byte
        expected = (expected + 7) // 8
    if arrived < expected:
        return f"Pixel Data is truncated: {arrived} of {expected} bytes"
    return None


def _refuse(receiver: Receiver, peer: str, sop_instance: str, status: int, why: str) -> Dataset:
    log.warning("C-STORE from %s sop=%s refused (0x%04X): %s", peer, sop_instance, status, why)
    receiver.metrics.refused.labels(status=f"0x{status:04X}").inc()
    receiver.audit.record(
        "instance",
        outcome="refused",
        status=f"0x{status:04X}",
        peer=peer,
        sop_instance_uid=sop_instance,
        reason=why[:300],
    )
    return status_dataset(status, why)


def handle_store(event: Event, receiver: Receiver) -> int | Dataset:
    """Check, store durably, record the job, then answer. Every failure becomes a status; nothing is half-kept."""
    peer = _peer(event)
    request = event.request
    sop_class = str(request.AffectedSOPClassUID)
    sop_instance = str(request.AffectedSOPInstanceUID)
    settings = receiver.settings()
    try:
        safe_uid(sop_instance)
        data = event.encoded_dataset(include_meta=True)
        size = len(data)
        header = dcmread(BytesIO(data), defer_size=DEFER_BYTES)  # large values are not even copied; nothing decoded
    except Exception as error:  # a data set pydicom cannot parse
        return _refuse(receiver, peer, sop_instance, CANNOT_UNDERSTAND, f"cannot parse data set: {error}")
    crash_point("received")
    if size > settings.node.max_object_mb * 1e6:
        return _refuse(
            receiver,
            peer,
            sop_instance,
            OUT_OF_RESOURCES,
            f"object is {size / 1e6:.0f} MB, above max_object_mb {settings.node.max_object_mb:g}",
        )
    if decoded_size(header) > settings.node.max_decoded_mb * 1e6:
        return _refuse(
            receiver,
            peer,
            sop_instance,
            OUT_OF_RESOURCES,
            f"image would decode to {decoded_size(header) / 1e6:.0f} MB, above max_decoded_mb "
            f"{settings.node.max_decoded_mb:g}",
        )
    problem = integrity_problem(header, sop_class, sop_instance, size)
    if problem:
        return _refuse(receiver, peer, sop_instance, CANNOT_UNDERSTAND, problem)
    low = receiver.low_on_disk()
    if low:
        return _refuse(receiver, peer, sop_instance, OUT_OF_RESOURCES, low)
    transfer_syntax = str(event.context.transfer_syntax)
    reason = reason_to_skip(header, sop_class, settings.filters)
    new_job = NewJob(
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        study_instance_uid=str(header.get("StudyInstanceUID", "")),
        series_instance_uid=str(header.get("SeriesInstanceUID", "")),
        transfer_syntax_uid=transfer_syntax,
        calling_ae=event.assoc.requestor.ae_title,
        called_ae=event.assoc.acceptor.ae_title,
        peer_address=event.assoc.requestor.address,
        spool_path=None,
        state=JobState.SKIPPED if reason else JobState.RECEIVED,
        error=reason,
        accession_number=str(header.get("AccessionNumber", "") or ""),
        study_date=str(header.get("StudyDate", "") or ""),
    )
    stored = None
    try:
        existing = receiver.queue.find(sop_instance)
        if existing is not None:
            log.info(
                "C-STORE from %s sop=%s: already job=%d (%s), acknowledged again",
                peer,
                sop_instance,
                existing.id,
                existing.state,
            )
            receiver.audit.record(
                "instance",
                outcome="duplicate",
                peer=peer,
                job=existing.id,
                sop_instance_uid=sop_instance,
                study_instance_uid=new_job.study_instance_uid,
            )
            return SUCCESS
        if reason is None:
            stored = receiver.spool.store_object(sop_instance, data)
            new_job = replace(new_job, spool_path=receiver.spool.relative(stored))
            crash_point("spooled")
        job_id, created = receiver.queue.add(new_job)
    except (SpoolError, QueueError, OSError) as error:
        if stored is not None:
            stored.unlink(missing_ok=True)
        return _refuse(receiver, peer, sop_instance, OUT_OF_RESOURCES, f"cannot store: {error}")
    if not created and stored is not None:  # another association recorded it first; its file is the same object
        log.info("C-STORE from %s sop=%s: duplicate of job=%d", peer, sop_instance, job_id)
        return SUCCESS
    receiver.audit.record(
        "instance",
        outcome="skipped" if reason else "received",
        peer=peer,
        job=job_id,
        reason=reason,
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        study_instance_uid=new_job.study_instance_uid,
        series_instance_uid=new_job.series_instance_uid,
        transfer_syntax_uid=transfer_syntax,
    )
    if reason:
        receiver.metrics.skipped.inc()
        log.info("C-STORE from %s sop=%s job=%d skipped: %s", peer, sop_instance, job_id, reason)
    else:
        receiver.metrics.received.inc()
        log.info(
            "C-STORE from %s sop=%s job=%d received (%s, %s)",
            peer,
            sop_instance,
            job_id,
            UID(sop_class).name,
            UID(transfer_syntax).name,
        )
        receiver.wake_worker.set()
    return SUCCESS


def _peer(event: Event) -> str:
    requestor = event.assoc.requestor
    return f"{requestor.ae_title}@{requestor.address}:{requestor.port}"


# -- the server -------------------------------------------------------------------------------------------------------


def server_tls_context(tls: TLSSettings) -> ssl.SSLContext:
    """TLS 1.2+ server context; with require_client_certificate, clients must present a certificate we trust."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    assert tls.certificate is not None and tls.private_key is not None  # checked by TLSSettings
    context.load_cert_chain(tls.certificate, tls.private_key)
    if tls.ca_certificates is not None:
        context.load_verify_locations(tls.ca_certificates)
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return context


def make_ae(settings: Settings) -> AE:
    """An AE with the node's title, timeouts and supported presentation contexts: Verification, and every storage
    SOP class in every transfer syntax of TRANSFER_SYNTAXES (objects outside the filters are acknowledged and
    skipped, so an auto-routing rule that sends us a CT does not fail)."""
    ae = AE(ae_title=settings.node.ae_title)
    ae.require_called_aet = False  # handle_requested checks it, with the rest of the policy, and audits why
    ae.require_calling_aet = []
    ae.network_timeout = settings.node.network_timeout_s
    ae.acse_timeout = settings.node.acse_timeout_s
    ae.dimse_timeout = settings.node.dimse_timeout_s
    # pynetdicom's own cap counts every connection, even one that has sent nothing yet; it is kept well above
    # max_associations (which handle_requested applies to established associations) as a last defence.
    ae.maximum_associations = max(100, 10 * settings.node.max_associations)
    ae.maximum_pdu_size = settings.node.max_pdu
    ae.add_supported_context(Verification, VERIFICATION_TRANSFER_SYNTAXES)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    return ae


class _BoundServer(ThreadedAssociationServer):
    """pynetdicom's server binds and listens as it is made; this one only binds, and `serve_associations` listens
    once the node is ready, so that a peer calling during start-up is refused at once rather than left waiting."""

    def server_activate(self) -> None:
        pass

    def listen(self) -> None:
        ThreadedAssociationServer.server_activate(self)


def bind_server(ae: AE, settings: Settings) -> ThreadedAssociationServer:
    """Take the DICOM port (bound, not yet listening): start-up fails here, before anything heavy, when the port is
    taken or the TLS files are unusable."""
    context = server_tls_context(settings.tls) if settings.tls.enabled else None
    address = (settings.node.host, settings.node.port)
    try:
        return ae.make_server(address, ssl_context=context, server_class=_BoundServer)
    except OSError as error:
        raise OSError(error.errno, f"DICOM port {settings.node.host}:{settings.node.port}: {error.strerror}") from None


def serve_associations(
    ae: AE, server: ThreadedAssociationServer, settings: Settings, receiver: Receiver
) -> ThreadedAssociationServer:
    """Answer associations on a server from `bind_server`. Each data set is received whole in memory, then stored
    by the C-STORE handler. (pynetdicom's STORE_RECV_CHUNKED_DATASET would stream it to a file as it arrives, but a
    full disk then aborts the association inside pynetdicom instead of letting the handler answer 0xA700 and clean
    up: not used.)"""
    handlers = [
        (evt.EVT_REQUESTED, handle_requested, [receiver]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [receiver]),
        (evt.EVT_ACCEPTED, _log_accepted, [receiver]),
        (evt.EVT_REJECTED, _log_rejected, [receiver]),
    ]
    for handler in handlers:
        server.bind(*handler)
    if isinstance(server, _BoundServer):
        server.listen()
    threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True).start()
    ae._servers.append(server)  # so that AE.shutdown() stops it too, as with AE.start_server
    log.info(
        "listening as %s on %s:%d%s",
        settings.node.ae_title,
        settings.node.host,
        settings.node.port,
        " (DICOM TLS)" if server.ssl_context else "",
    )
    return server


def start_server(ae: AE, settings: Settings, receiver: Receiver) -> ThreadedAssociationServer:
    """Bind and serve at once (tests, tools)."""
    return serve_associations(ae, bind_server(ae, settings), settings, receiver)
