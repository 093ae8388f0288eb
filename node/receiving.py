"""The receive path that C-STORE (node.scp) and STOW-RS (node.stow_server) share: check an object, write it
durably, record its job, and only then say it is stored.

The object and its job are kept in one step (`node.store.keep_received`): with the file store the object is
written (temporary file, fsync, atomic rename, directory fsync), then its job committed to the queue; with the
PostgreSQL store both are one transaction. Only then is Success returned. Pixel data is not decoded here; the
worker does that. A disk or database failure (StoreFull, StoreUnavailable, QueueError) answers 0xA700 (Out of
Resources) and leaves nothing kept; an object that cannot be parsed, or is not whole, 0xC000 (Cannot Understand).
An object outside the filters is acknowledged and recorded as skipped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO

from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.encaps import generate_fragments
from pydicom.uid import UID

from node.audit import AuditLog
from node.config import Settings
from node.faults import crash_point
from node.filters import reason_to_skip
from node.metrics import Metrics, Recorder
from node.queue import JobState, NewJob, Queue, QueueError, WakeUp
from node.statuses import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS
from node.store import Store, StoreError, keep_received, safe_uid

log = logging.getLogger(__name__)

DEFER_BYTES = 64 * 1024  # values larger than this are not read when a received object is checked
UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass
class Receiver:
    """What the handlers need: the current settings, the store, the queue, a way to wake the worker, the audit."""

    settings: Callable[[], Settings]
    store: Store
    queue: Queue
    wake_worker: WakeUp
    audit: AuditLog
    metrics: Recorder = field(default_factory=Metrics)
    stopping: threading.Event = field(default_factory=threading.Event)

    def low_on_disk(self) -> str | None:
        """Why the store's disk is below its low-water mark, or None (also when the store cannot tell: PostgreSQL)."""
        node = self.settings().node
        space = self.store.space()
        if space is None:
            return None
        (free, total), where = space, self.store.where()
        if free < node.min_free_mb * 1e6:
            return f"only {free / 1e6:.0f} MB free in {where} (low-water mark {node.min_free_mb:g} MB)"
        if total and 100 * free / total < node.min_free_percent:
            return f"only {100 * free / total:.2f} % free in {where} (low-water mark {node.min_free_percent:g} %)"
        return None


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


def integrity_problem(
    ds: Dataset, sop_class: str, sop_instance: str, file_size: int, named_by: str = "the C-STORE request's"
) -> str | None:
    """Why a received data set is not whole and consistent, or None. Checks lengths and identities only; nothing
    is decoded. `ds` is read with deferred large values, so Pixel Data's declared length and file offset are known
    without reading it. (pydicom reads a truncated data set without complaint, so the checks are made here.)"""
    if str(ds.get("SOPInstanceUID", "")) != sop_instance:
        return f"SOP Instance UID in the data set is missing or differs from {named_by}"
    if str(ds.get("SOPClassUID", "")) != sop_class:
        return f"SOP Class UID in the data set is missing or differs from {named_by}"
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


@dataclass(frozen=True)
class Arrival:
    """One object as it arrived, by C-STORE or by STOW-RS (node.stow_server): its PS3.10 bytes, what the request
    says it is, and who sent it."""

    data: bytes
    sop_class_uid: str  # as the C-STORE request names it, or the part's File Meta Information
    sop_instance_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    called_ae: str
    address: str
    peer: str  # for the log and the audit: AE@ADDRESS:PORT, or the HTTP client's ADDRESS:PORT
    service: str = "C-STORE"
    named_by: str = "the C-STORE request's"  # what sop_class_uid and sop_instance_uid were read from


@dataclass(frozen=True)
class Receipt:
    """What became of an arrival: the DIMSE status (Success, or why it was refused), and its job."""

    status: int
    why: str | None = None  # why it was refused, or skipped
    job_id: int | None = None
    outcome: str = "refused"  # received, skipped, duplicate or refused


def refuse(receiver: Receiver, arrival: Arrival, status: int, why: str) -> Receipt:
    """Nothing is kept: log, count and audit the refusal."""
    log.warning(
        "%s from %s sop=%s refused (0x%04X): %s", arrival.service, arrival.peer, arrival.sop_instance_uid, status, why
    )
    receiver.metrics.record("refused", status=f"0x{status:04X}")
    receiver.audit.record(
        "instance",
        outcome="refused",
        status=f"0x{status:04X}",
        peer=arrival.peer,
        service=arrival.service,
        sop_instance_uid=arrival.sop_instance_uid,
        reason=why[:300],
    )
    return Receipt(status, why)


def receive(receiver: Receiver, arrival: Arrival) -> Receipt:
    """Check, store durably, record the job: the receive path C-STORE and STOW-RS share. Success comes back only
    once the job is committed to the queue; every failure is a status with its reason, and nothing is half-kept."""
    settings = receiver.settings()
    data, peer, sop_instance, sop_class = arrival.data, arrival.peer, arrival.sop_instance_uid, arrival.sop_class_uid
    try:
        safe_uid(sop_instance)
        size = len(data)
        header = dcmread(BytesIO(data), defer_size=DEFER_BYTES)  # large values are not even copied; nothing decoded
    except Exception as error:  # a data set pydicom cannot parse
        return refuse(receiver, arrival, CANNOT_UNDERSTAND, f"cannot parse data set: {error}")
    crash_point("received")
    if size > settings.node.max_object_mb * 1e6:
        return refuse(
            receiver,
            arrival,
            OUT_OF_RESOURCES,
            f"object is {size / 1e6:.0f} MB, above max_object_mb {settings.node.max_object_mb:g}",
        )
    if decoded_size(header) > settings.node.max_decoded_mb * 1e6:
        return refuse(
            receiver,
            arrival,
            OUT_OF_RESOURCES,
            f"image would decode to {decoded_size(header) / 1e6:.0f} MB, above max_decoded_mb "
            f"{settings.node.max_decoded_mb:g}",
        )
    problem = integrity_problem(header, sop_class, sop_instance, size, arrival.named_by)
    if problem:
        return refuse(receiver, arrival, CANNOT_UNDERSTAND, problem)
    low = receiver.low_on_disk()
    if low:
        return refuse(receiver, arrival, OUT_OF_RESOURCES, low)
    transfer_syntax = arrival.transfer_syntax_uid
    reason = reason_to_skip(header, sop_class, settings.filters)
    new_job = NewJob(
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        study_instance_uid=str(header.get("StudyInstanceUID", "")),
        series_instance_uid=str(header.get("SeriesInstanceUID", "")),
        transfer_syntax_uid=transfer_syntax,
        calling_ae=arrival.calling_ae,
        called_ae=arrival.called_ae,
        peer_address=arrival.address,
        spool_path=None,
        state=JobState.SKIPPED if reason else JobState.RECEIVED,
        error=reason,
        accession_number=str(header.get("AccessionNumber", "") or ""),
        study_date=str(header.get("StudyDate", "") or ""),
    )
    try:
        existing = receiver.queue.find(sop_instance)
        if existing is not None:
            log.info(
                "%s from %s sop=%s: already job=%d (%s), acknowledged again",
                arrival.service,
                peer,
                sop_instance,
                existing.id,
                existing.state,
            )
            receiver.audit.record(
                "instance",
                outcome="duplicate",
                peer=peer,
                service=arrival.service,
                job=existing.id,
                sop_instance_uid=sop_instance,
                study_instance_uid=new_job.study_instance_uid,
            )
            return Receipt(SUCCESS, job_id=existing.id, outcome="duplicate")
        job_id, created = keep_received(receiver.store, receiver.queue, new_job, None if reason else data)
    except (StoreError, QueueError, OSError) as error:  # nothing was kept (StoreFull: no space)
        return refuse(receiver, arrival, OUT_OF_RESOURCES, f"cannot store: {error}")
    if not created and reason is None:  # another association recorded it first; what it kept is the same object
        log.info("%s from %s sop=%s: duplicate of job=%d", arrival.service, peer, sop_instance, job_id)
        return Receipt(SUCCESS, job_id=job_id, outcome="duplicate")
    receiver.audit.record(
        "instance",
        outcome="skipped" if reason else "received",
        peer=peer,
        service=arrival.service,
        job=job_id,
        reason=reason,
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        study_instance_uid=new_job.study_instance_uid,
        series_instance_uid=new_job.series_instance_uid,
        transfer_syntax_uid=transfer_syntax,
    )
    if reason:
        receiver.metrics.record("skipped")
        log.info("%s from %s sop=%s job=%d skipped: %s", arrival.service, peer, sop_instance, job_id, reason)
        return Receipt(SUCCESS, why=reason, job_id=job_id, outcome="skipped")
    receiver.metrics.record("received")
    log.info(
        "%s from %s sop=%s job=%d received (%s, %s)",
        arrival.service,
        peer,
        sop_instance,
        job_id,
        UID(sop_class).name,
        UID(transfer_syntax).name,
    )
    receiver.wake_worker.set()
    return Receipt(SUCCESS, job_id=job_id, outcome="received")
