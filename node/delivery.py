"""Delivering results to one destination: a worker thread per destination with its own inbox, so that a destination
that is down or slow delays only its own results (node.sender hands out the work and records the outcomes).

C-STORE: the association is kept open while work keeps coming and released after `IDLE_RELEASE_S` without any; one
that failed (refused, aborted, timed out) is dropped and made again for the next job. When an association cannot be
made, the jobs that were already waiting for it fail with the same error at once instead of each waiting out its own
timeout; they are tried again after their backoff. Result files go out as they are stored: pynetdicom sends a file
given by its path in chunks, without parsing it, when the destination accepted the file's own transfer syntax (else
the file is read and converted). STOW-RS (a peer with a url) has no association to keep: each job's results go in
one request (node.stow_client).
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import Dataset, dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association

from node.config import Peer, TLSSettings
from node.queue import Job, ResultObject
from node.statuses import DELIVERED
from node.stow_client import store_dicomweb

log = logging.getLogger(__name__)

_config.STORE_SEND_CHUNKED_DATASET = True
"""send_c_store(path) sends the file's encoded data set in chunks, without decoding it (it needs an accepted
presentation context with the file's own transfer syntax); a Dataset is encoded as before."""

IDLE_RELEASE_S = 3.0
"""An association with no new work for this long is released (A-RELEASE)."""
PROPOSED_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
"""Proposed for every SOP class, in one presentation context each (docs/conformance.md); results are written in
Explicit VR Little Endian, so a destination that accepts it gets them as they are stored."""


class DeliveryError(Exception):
    """A destination did not take the results; the message says which object and why."""


class AssociationFailed(DeliveryError):
    """No association could be made with a destination (refused, aborted, or no answer in time)."""


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


@dataclass(frozen=True)
class Parcel:
    """One job's results for one destination, with the settings they go out with."""

    job: Job
    peer: Peer
    results: tuple[ResultObject, ...]
    paths: tuple[Path | BinaryIO, ...]
    calling_ae: str
    timeout: float
    tls: TLSSettings


class Connection:
    """An established association with one C-STORE destination, one presentation context per SOP class."""

    def __init__(
        self, peer: Peer, *, calling_ae: str, timeout: float, sop_classes: Sequence[str], tls: TLSSettings | None
    ) -> None:
        self.peer = peer
        self.calling_ae = calling_ae
        self.timeout = timeout
        self.tls = tls
        self.sop_classes = frozenset(sop_classes)
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        for sop_class in sorted(self.sop_classes):
            ae.add_requested_context(sop_class, list(PROPOSED_TRANSFER_SYNTAXES))
        context = client_tls_context(tls) if peer.tls and tls is not None else None
        started = time.monotonic()
        self.assoc: Association = ae.associate(
            peer.host, peer.port, ae_title=peer.ae_title, tls_args=(context, None) if context is not None else None
        )
        if not self.assoc.is_established:
            if self.assoc.is_rejected:
                reason = "rejected"
            elif time.monotonic() - started >= 0.9 * timeout:  # pynetdicom aborts when its ACSE timeout is reached
                reason = f"no answer within {timeout:g} s, sender.timeout_s"
            else:
                reason = "aborted" if self.assoc.is_aborted else "no answer"
            raise AssociationFailed(f"association with {peer.ae_title}@{peer.host}:{peer.port} failed ({reason})")

    def fits(self, parcel: Parcel) -> bool:
        """Still established, with the same destination and settings, and a context for each of the parcel's SOP
        classes: the parcel can go on this association."""
        return (
            self.assoc.is_established
            and self.peer == parcel.peer
            and self.calling_ae == parcel.calling_ae
            and self.timeout == parcel.timeout
            and (not parcel.peer.tls or self.tls == parcel.tls)
            and {r.sop_class_uid for r in parcel.results} <= self.sop_classes
        )

    def send(self, path: Path | BinaryIO) -> None:
        """C-STORE one file (a file on disk is streamed as stored when its transfer syntax was accepted; an object
        in memory is sent as a data set); DeliveryError unless it was answered with Success or a storage warning."""
        if isinstance(path, Path):
            meta = read_file_meta_info(path)
            sop_class, syntax = UID(meta.MediaStorageSOPClassUID), UID(meta.TransferSyntaxUID)
            as_stored = any(
                cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == syntax
                for cx in self.assoc.accepted_contexts
            )
            data: Path | Dataset = path if as_stored else dcmread(path)
        else:
            path.seek(0)
            data = dcmread(path)
            sop_class = UID(data.file_meta.MediaStorageSOPClassUID)
        try:
            status = self.assoc.send_c_store(data)
        except ValueError as error:  # no accepted presentation context, or not encodable in the accepted one
            raise DeliveryError(
                f"{path.name}: cannot send a {sop_class.name} to {self.peer.ae_title}: {error}"
            ) from None
        if "Status" not in status:
            raise DeliveryError(f"{path.name}: no C-STORE response from {self.peer.ae_title} (timeout or abort)")
        if int(status.Status) not in DELIVERED:
            comment = status.get("ErrorComment", "")
            raise DeliveryError(
                f"{path.name}: {self.peer.ae_title} answered 0x{int(status.Status):04X} {comment}".strip()
            )

    def close(self) -> None:
        """A-RELEASE if still established, else make sure the socket is gone."""
        if self.assoc.is_established:
            self.assoc.release()
        else:
            self.assoc.abort()


def store(
    peer: Peer,
    paths: Sequence[Path | BinaryIO],
    *,
    calling_ae: str,
    timeout: float,
    sop_classes: Sequence[str],
    tls: TLSSettings | None = None,
) -> None:
    """Send `paths` to `peer` in one association of their own; DeliveryError unless every object is delivered."""
    connection = Connection(peer, calling_ae=calling_ae, timeout=timeout, sop_classes=sop_classes, tls=tls)
    try:
        for path in paths:
            connection.send(path)
    finally:
        connection.close()


Report = Callable[[Parcel, Exception | None, float], None]
"""Called by a destination's worker after each parcel: the parcel, the error (None: delivered), seconds taken."""


class DestinationWorker:
    """One destination's thread: takes parcels from its inbox in order and reports each one's outcome."""

    def __init__(self, name: str, report: Report, stopping: threading.Event) -> None:
        self.name = name
        self.report = report
        self.stopping = stopping
        self.inbox: queue.SimpleQueue[Parcel] = queue.SimpleQueue()
        self.connection: Connection | None = None
        self.sop_classes: set[str] = set()  # every SOP class sent here so far: proposed on each new association
        self.last_used = time.monotonic()
        self.thread = threading.Thread(target=self._run, name=f"sender-{name}", daemon=True)

    def start(self) -> DestinationWorker:
        self.thread.start()
        return self

    def put(self, parcel: Parcel) -> None:
        self.inbox.put(parcel)

    def join(self, timeout: float) -> None:
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    first = self.inbox.get(timeout=0.5)
                except queue.Empty:
                    if self.connection is not None and time.monotonic() - self.last_used >= IDLE_RELEASE_S:
                        self._drop()
                    continue
                batch = [first]
                while True:
                    try:
                        batch.append(self.inbox.get_nowait())
                    except queue.Empty:
                        break
                self._deliver(batch)
                self.last_used = time.monotonic()
        finally:
            self._drop()

    def _deliver(self, batch: list[Parcel]) -> None:
        refused: AssociationFailed | None = None
        refused_peer: Peer | None = None
        for parcel in batch:
            if self.stopping.is_set():
                return  # the rest stay held until the lease ends; the next start sends them
            started = time.perf_counter()
            error: Exception | None = None
            if refused is not None and parcel.peer == refused_peer:
                error = refused  # it failed a moment ago for the parcels before this one: no second wait
            else:
                try:
                    self._send(parcel)
                except AssociationFailed as failed:
                    error, refused, refused_peer = failed, failed, parcel.peer
                except Exception as failed:  # DeliveryError, STOWError, or a network error pynetdicom raised
                    error = failed
            try:
                self.report(parcel, error, time.perf_counter() - started)
            except Exception:
                log.exception("sender: recording job=%d for %s failed", parcel.job.id, self.name)

    def _send(self, parcel: Parcel) -> None:
        if parcel.peer.url:
            store_dicomweb(parcel.peer, list(parcel.paths), timeout=parcel.timeout, tls=parcel.tls)
            return
        reused = self.connection is not None and self.connection.fits(parcel)
        connection = self._connection_for(parcel)
        try:
            self._send_on(connection, parcel)
        except Exception:
            if connection.assoc.is_established:
                raise  # the destination answered (a failure status): the association itself is fine
            self._drop()
            if not reused:
                raise
            # The association we kept open was closed or aborted under us: once more on a new one.
            self._send_on(self._connection_for(parcel), parcel)

    def _send_on(self, connection: Connection, parcel: Parcel) -> None:
        for path in parcel.paths:
            connection.send(path)

    def _connection_for(self, parcel: Parcel) -> Connection:
        if self.connection is not None and not self.connection.fits(parcel):
            self._drop()
        if self.connection is None:
            self.sop_classes |= {r.sop_class_uid for r in parcel.results}
            self.connection = Connection(
                parcel.peer,
                calling_ae=parcel.calling_ae,
                timeout=parcel.timeout,
                sop_classes=sorted(self.sop_classes),
                tls=parcel.tls,
            )
        return self.connection

    def _drop(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception as error:  # the peer went away meanwhile: nothing left to release
                log.debug("closing the association with %s: %s", self.name, error)
