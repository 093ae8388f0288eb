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

import ipaddress
import logging
import ssl
import threading
from dataclasses import dataclass, replace

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
