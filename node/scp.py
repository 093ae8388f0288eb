"""The Storage SCP: association policy, and the C-ECHO and C-STORE handlers.

The C-STORE handler only checks, writes, records and answers, by `node.receiving.receive` (shared with STOW-RS): the
object goes to the spool (temporary file, fsync, atomic rename, directory fsync), its job is committed to the queue,
and only then is Success returned. Pixel data is not decoded here; the worker does that. A disk or database failure
answers 0xA700 (Out of Resources) and leaves no file.

Association policy (`admission_refusal`, run when an A-ASSOCIATE-RQ arrives): the called AE title must be ours; when
peers with may_send are declared, the calling AE title must be one of them, calling from one of its addresses when
it lists some; each peer holds at most its share of associations; and while the disk is below its low-water mark,
or the node is stopping, new associations are refused as transient (the sender should retry later).
"""

from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import logging
import multiprocessing.sharedctypes
import socket
import ssl
import threading
from dataclasses import dataclass, replace
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from node.config import Settings, TLSSettings
from node.receiving import Arrival, Receiver, receive, refuse
from node.statuses import CANNOT_UNDERSTAND, SUCCESS, status_dataset

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


class AssociationSlots:
    """The associations open in every receiving process of the node (`--receivers N`), so that max_associations and
    the per-peer limits hold across them: a table in shared memory with one row per process, one entry per
    association (a hash of the calling AE title; 0 = free). A process writes only its own row, one aligned 64-bit
    word at a time, and takes no lock another process could wait on: a receiving process that is killed leaves
    nothing held but its row, which the node clears (`clear`) before it starts a new one in its place. An entry is
    taken when the A-ASSOCIATE-RQ arrives, before the limits are checked (two processes admitting at once may both
    refuse, never both admit past a limit), and freed when the connection closes."""

    def __init__(self, table: Any, per_process: int, index: int = 0) -> None:
        self.table = table
        self.per_process = per_process
        self.index = index
        self._held: dict[int, tuple[int, Any]] = {}  # entry -> (its hash, the association holding it)
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:  # handed to a new receiving process: the table, not this one's entries
        return (AssociationSlots, (self.table, self.per_process, self.index))

    @classmethod
    def create(cls, processes: int, per_process: int) -> AssociationSlots:
        return cls(multiprocessing.sharedctypes.RawArray(ctypes.c_int64, processes * per_process), per_process)

    def for_process(self, index: int) -> AssociationSlots:
        """The same table as seen by receiving process `index` (what a new process is handed, pickled)."""
        return AssociationSlots(self.table, self.per_process, index)

    @staticmethod
    def key(calling_ae: str) -> int:
        digest = hashlib.blake2b(calling_ae.strip().encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little", signed=True) or 1

    def take(self, assoc: Any, calling_ae: str) -> tuple[int, int] | None:
        """Hold an entry for `assoc`; (associations open in all processes, of them from `calling_ae`), not counting
        this one. None when this process's row is full."""
        key = self.key(calling_ae)
        first = self.index * self.per_process
        with self._lock:
            self._sweep()
            free = next((i for i in range(first, first + self.per_process) if i not in self._held), None)
            if free is None:
                return None
            self.table[free] = key
            self._held[free] = (key, assoc)
        total = from_caller = 0
        for i, value in enumerate(self.table[:]):
            if value and i != free:
                total += 1
                from_caller += value == key
        return total, from_caller

    def free(self, assoc: Any) -> None:
        with self._lock:
            for entry, (_, holder) in list(self._held.items()):
                if holder is assoc:
                    self.table[entry] = 0
                    del self._held[entry]

    def _sweep(self) -> None:
        """Free the entries of associations whose thread ended without a close event (caller holds the lock)."""
        for entry, (_, holder) in list(self._held.items()):
            if not holder.is_alive():
                self.table[entry] = 0
                del self._held[entry]

    def sweep(self) -> None:
        with self._lock:
            self._sweep()

    def clear(self, index: int) -> None:
        """Free every entry of receiving process `index` (it died; its associations died with it)."""
        first = index * self.per_process
        for i in range(first, first + self.per_process):
            self.table[i] = 0

    def open_associations(self) -> int:
        return sum(1 for value in self.table[:] if value)


def handle_requested(event: Event, receiver: Receiver, slots: AssociationSlots | None = None) -> None:
    """EVT_REQUESTED: apply `admission_refusal`; a refusal is sent as A-ASSOCIATE-RJ before any negotiation. With
    `slots`, the associations of every receiving process count; without, this process's established ones."""
    assoc = event.assoc
    request = assoc.requestor.primitive
    calling = assoc.requestor.ae_title or (request.calling_ae_title if request else "")
    called = request.called_ae_title if request is not None else ""
    if slots is not None:
        counted = slots.take(assoc, calling)
        total, from_caller = counted if counted is not None else (2**31, 2**31)
    else:
        # Only established associations count: a connection that has not asked for one yet (half-open, idle,
        # or garbage) holds no slot, and is closed by the ACSE timeout.
        established = [a for a in assoc.ae.active_associations if a is not assoc and a.is_acceptor and a.is_established]
        total, from_caller = len(established), sum(1 for a in established if a.requestor.ae_title == calling)
    refusal = admission_refusal(
        receiver.settings(),
        calling,
        called,
        assoc.requestor.address,
        from_caller,
        receiver.low_on_disk(),
        receiver.stopping.is_set(),
        active_total=total,
    )
    if refusal is None:
        return
    if slots is not None:
        slots.free(assoc)
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


def handle_store(event: Event, receiver: Receiver) -> int | Dataset:
    """EVT_C_STORE: `receive` the data set, then answer with its status."""
    request, requestor = event.request, event.assoc.requestor
    arrival = Arrival(
        data=b"",
        sop_class_uid=str(request.AffectedSOPClassUID),
        sop_instance_uid=str(request.AffectedSOPInstanceUID),
        transfer_syntax_uid=str(event.context.transfer_syntax),
        calling_ae=requestor.ae_title,
        called_ae=event.assoc.acceptor.ae_title,
        address=requestor.address,
        peer=_peer(event),
    )
    try:
        arrival = replace(arrival, data=event.encoded_dataset(include_meta=True))
    except Exception as error:  # a data set pynetdicom cannot even hand over
        receipt = refuse(receiver, arrival, CANNOT_UNDERSTAND, f"cannot parse data set: {error}")
    else:
        receipt = receive(receiver, arrival)
    return SUCCESS if receipt.status == SUCCESS else status_dataset(receipt.status, receipt.why or "")


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
    once the node is ready, so that a peer calling during start-up is refused at once rather than left waiting.
    With `reuse_port` (SO_REUSEPORT, set before the bind) several receiving processes share the port and the kernel
    spreads the incoming connections over them."""

    reuse_port = False

    def server_bind(self) -> None:
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def server_activate(self) -> None:
        pass

    def listen(self) -> None:
        ThreadedAssociationServer.server_activate(self)


class _SharedPortServer(_BoundServer):
    reuse_port = True


def bind_server(ae: AE, settings: Settings, *, shared: bool = False) -> ThreadedAssociationServer:
    """Take the DICOM port (bound, not yet listening): start-up fails here, before anything heavy, when the port is
    taken or the TLS files are unusable. `shared`: bound with SO_REUSEPORT, for the node's receiving processes; the
    first of them checks first that nothing else holds the port (`check_port_free`)."""
    context = server_tls_context(settings.tls) if settings.tls.enabled else None
    address = (settings.node.host, settings.node.port)
    try:
        return ae.make_server(address, ssl_context=context, server_class=_SharedPortServer if shared else _BoundServer)
    except OSError as error:
        raise OSError(error.errno, f"DICOM port {settings.node.host}:{settings.node.port}: {error.strerror}") from None


def check_port_free(settings: Settings) -> None:
    """OSError when anything (another node, even one sharing its port with SO_REUSEPORT) holds the DICOM port: a
    plain bind, without SO_REUSEPORT, fails then. Done once before the receiving processes bind it together."""
    family = socket.AF_INET6 if ":" in settings.node.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((settings.node.host, settings.node.port))
        except OSError as error:
            raise OSError(
                error.errno, f"DICOM port {settings.node.host}:{settings.node.port}: {error.strerror}"
            ) from None


def serve_associations(
    ae: AE,
    server: ThreadedAssociationServer,
    settings: Settings,
    receiver: Receiver,
    slots: AssociationSlots | None = None,
) -> ThreadedAssociationServer:
    """Answer associations on a server from `bind_server`. Each data set is received whole in memory, then stored
    by the C-STORE handler. (pynetdicom's STORE_RECV_CHUNKED_DATASET would stream it to a file as it arrives, but a
    full disk then aborts the association inside pynetdicom instead of letting the handler answer 0xA700 and clean
    up: not used.)"""
    handlers: list[Any] = [
        (evt.EVT_REQUESTED, handle_requested, [receiver, slots]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [receiver]),
        (evt.EVT_ACCEPTED, _log_accepted, [receiver]),
        (evt.EVT_REJECTED, _log_rejected, [receiver]),
    ]
    if slots is not None:
        handlers.append((evt.EVT_CONN_CLOSE, lambda event: slots.free(event.assoc)))
    for handler in handlers:
        server.bind(*handler)
    if isinstance(server, _BoundServer):
        server.listen()
    threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True).start()
    if slots is not None:
        threading.Thread(target=_sweep_forever, args=(slots,), name="association-slots", daemon=True).start()
    ae._servers.append(server)  # so that AE.shutdown() stops it too, as with AE.start_server
    log.info(
        "listening as %s on %s:%d%s",
        settings.node.ae_title,
        settings.node.host,
        settings.node.port,
        " (DICOM TLS)" if server.ssl_context else "",
    )
    return server


def _sweep_forever(slots: AssociationSlots) -> None:
    stop = threading.Event()
    while not stop.wait(1.0):
        slots.sweep()


def start_server(ae: AE, settings: Settings, receiver: Receiver) -> ThreadedAssociationServer:
    """Bind and serve at once (tests, tools)."""
    return serve_associations(ae, bind_server(ae, settings), settings, receiver)
