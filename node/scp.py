"""The Storage SCP: association policy, and the C-ECHO and C-STORE handlers.

The C-STORE handler only writes, records and answers: the object goes to the spool (temporary file, fsync, atomic
rename, directory fsync), its job is committed to the queue, and only then is Success returned. Pixel data is not
decoded here; the worker does that. A disk or database failure answers 0xA700 (Out of Resources) and leaves no file.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO

from pydicom import Dataset, dcmread
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from node.audit import AuditLog
from node.config import Settings
from node.filters import reason_to_skip
from node.queue import JobState, NewJob, Queue
from node.queue.sqlite import QueueError
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


@dataclass
class Receiver:
    """What the C-STORE handler needs: the current settings, the spool, the queue, and a way to wake the worker."""

    settings: Callable[[], Settings]
    spool: Spool
    queue: Queue
    wake_worker: threading.Event
    audit: AuditLog


def handle_echo(event: Event) -> int:
    log.info("C-ECHO from %s", _peer(event))
    return SUCCESS


def handle_store(event: Event, receiver: Receiver) -> int | Dataset:
    """Store durably, record the job, then answer. Every failure becomes a status; nothing is half-kept."""
    peer = _peer(event)
    request = event.request
    sop_class = str(request.AffectedSOPClassUID)
    sop_instance = str(request.AffectedSOPInstanceUID)
    try:
        safe_uid(sop_instance)
        data = event.encoded_dataset(include_meta=True)
        header = dcmread(BytesIO(data), stop_before_pixels=True)
    except Exception as error:  # a dataset pydicom cannot parse
        log.warning("C-STORE from %s sop=%s refused: cannot parse the data set (%s)", peer, sop_instance, error)
        receiver.audit.record("instance", outcome="refused", status=f"0x{CANNOT_UNDERSTAND:04X}", peer=peer,
                              sop_instance_uid=sop_instance, sop_class_uid=sop_class, reason=str(error)[:200])
        return status_dataset(CANNOT_UNDERSTAND, f"cannot parse data set: {error}")
    settings = receiver.settings()
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
        peer_address=peer.split(" ", 1)[-1],
        spool_path=None,
        state=JobState.SKIPPED if reason else JobState.RECEIVED,
        error=reason,
    )
    stored = None
    try:
        existing = receiver.queue.find(sop_instance)
        if existing is not None:
            log.info("C-STORE from %s sop=%s: already job=%d (%s), acknowledged again",
                     peer, sop_instance, existing.id, existing.state)
            receiver.audit.record("instance", outcome="duplicate", peer=peer, job=existing.id,
                                  sop_instance_uid=sop_instance, study_instance_uid=new_job.study_instance_uid)
            return SUCCESS
        if reason is None:
            stored = receiver.spool.store_object(sop_instance, data)
            new_job = _with_spool_path(new_job, receiver.spool.relative(stored))
        job_id, created = receiver.queue.add(new_job)
    except (SpoolError, QueueError, OSError) as error:
        if stored is not None:
            stored.unlink(missing_ok=True)
        log.error("C-STORE from %s sop=%s refused: out of resources (%s)", peer, sop_instance, error)
        receiver.audit.record("instance", outcome="refused", status=f"0x{OUT_OF_RESOURCES:04X}", peer=peer,
                              sop_instance_uid=sop_instance, reason=str(error)[:200])
        return status_dataset(OUT_OF_RESOURCES, f"cannot store: {error}")
    if not created and stored is not None:  # another association recorded it first; its file is the same object
        log.info("C-STORE from %s sop=%s: duplicate of job=%d", peer, sop_instance, job_id)
        return SUCCESS
    receiver.audit.record(
        "instance", outcome="skipped" if reason else "received", peer=peer, job=job_id, reason=reason,
        sop_instance_uid=sop_instance, sop_class_uid=sop_class, study_instance_uid=new_job.study_instance_uid,
        series_instance_uid=new_job.series_instance_uid, transfer_syntax_uid=transfer_syntax,
    )
    if reason:
        log.info("C-STORE from %s sop=%s job=%d skipped: %s", peer, sop_instance, job_id, reason)
    else:
        log.info("C-STORE from %s sop=%s job=%d received (%s, %s)", peer, sop_instance, job_id,
                 UID(sop_class).name, UID(transfer_syntax).name)
        receiver.wake_worker.set()
    return SUCCESS


def _with_spool_path(job: NewJob, path: str) -> NewJob:
    from dataclasses import replace

    return replace(job, spool_path=path)


def _peer(event: Event) -> str:
    requestor = event.assoc.requestor
    return f"{requestor.ae_title}@{requestor.address}:{requestor.port}"


def _log_accepted(event: Event, receiver: Receiver) -> None:
    log.info("association accepted from %s", _peer(event))
    receiver.audit.record("association", outcome="accepted", calling_ae=event.assoc.requestor.ae_title,
                          called_ae=event.assoc.acceptor.ae_title, address=event.assoc.requestor.address)


def _log_rejected(event: Event, receiver: Receiver) -> None:
    requestor, acceptor = event.assoc.requestor, event.assoc.acceptor
    settings = receiver.settings()
    allowed = settings.allowed_calling_aes()
    if requestor.primitive is not None and requestor.primitive.called_ae_title != settings.node.ae_title:
        reason = f"called AE title {requestor.primitive.called_ae_title!r} is not ours"
    elif allowed is not None and requestor.ae_title not in allowed:
        reason = f"calling AE title {requestor.ae_title!r} is not an allowed peer"
    else:
        reason = "no acceptable presentation context or too many associations"
    log.warning("association rejected from %s@%s:%s: %s", requestor.ae_title, requestor.address, requestor.port,
                reason)
    receiver.audit.record("association", outcome="rejected", reason=reason, calling_ae=requestor.ae_title,
                          called_ae=acceptor.ae_title, address=requestor.address)


def make_ae(settings: Settings) -> AE:
    """An AE with the node's title, timeouts and supported presentation contexts: Verification, and every storage
    SOP class in every transfer syntax of TRANSFER_SYNTAXES (objects outside the filters are acknowledged and
    skipped, so an auto-routing rule that sends us a CT does not fail)."""
    ae = AE(ae_title=settings.node.ae_title)
    ae.require_called_aet = True
    apply_peer_policy(ae, settings)
    ae.network_timeout = settings.node.network_timeout_s
    ae.acse_timeout = settings.node.acse_timeout_s
    ae.dimse_timeout = settings.node.dimse_timeout_s
    ae.maximum_associations = settings.node.max_associations
    ae.maximum_pdu_size = settings.node.max_pdu
    ae.add_supported_context(Verification, TRANSFER_SYNTAXES[:4])
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    return ae


def apply_peer_policy(ae: AE, settings: Settings) -> None:
    """Calling AE titles allowed to associate: the peers with may_send, or anyone when none is declared.
    Called again after a SIGHUP reload; pynetdicom reads the list at each association request."""
    allowed = settings.allowed_calling_aes()
    ae.require_calling_aet = sorted(allowed) if allowed else []


def start_server(ae: AE, settings: Settings, receiver: Receiver) -> ThreadedAssociationServer:
    handlers = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [receiver]),
        (evt.EVT_ACCEPTED, _log_accepted, [receiver]),
        (evt.EVT_REJECTED, _log_rejected, [receiver]),
    ]
    server = ae.start_server((settings.node.host, settings.node.port), block=False, evt_handlers=handlers)
    log.info("listening as %s on %s:%d", settings.node.ae_title, settings.node.host, settings.node.port)
    return server
