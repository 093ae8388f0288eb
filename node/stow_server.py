"""DICOMweb in: STOW-RS Store Instances (PS3.18 10.5) on the node's HTTP port.

    POST /dicom-web/studies                      multipart/related; type="application/dicom", one PS3.10 file a part
    POST /dicom-web/studies/{StudyInstanceUID}   the same; an instance of another study fails (0xA900)

The same policy as C-STORE: the [http] token (401, nothing stored); when peers with may_send are declared, the client
must call from an address listed in the `addresses` of one of them (403) — HTTP has no calling AE title, so that
peer's AE title stands for it and routes the results; while the node stops or its disk is below the low-water mark,
503 with Retry-After. Each part goes through `node.receiving.receive`, the C-STORE handler's own path: an instance
is listed as stored (Referenced SOP Sequence) only once its job is committed to the queue. A part that fails is
listed in the Failed SOP Sequence with its Failure Reason, and a `Warning: 299` header says why in words.

The answer (application/dicom+json): 200 every instance stored (an object outside the filters is stored and
skipped, as with C-STORE, with a Warning header saying so); 202 some failed; 409 none stored; 400 a body that is not
a multipart/related message; 415 another media type; 413 a request larger than node.max_object_mb; 411 no length.
There is no WADO-RS here, so stored instances carry no Retrieve URL.
"""

from __future__ import annotations

import email.message
import ipaddress
import json
import logging
import re
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler
from io import BytesIO
from typing import BinaryIO

from pydicom import Dataset, dcmread
from pynetdicom.presentation import AllStoragePresentationContexts

from node.config import Peer, Settings
from node.receiving import DEFER_BYTES, Arrival, Receipt, Receiver, receive, refuse
from node.scp import TRANSFER_SYNTAXES
from node.statuses import CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH_SOP_CLASS, SUCCESS

log = logging.getLogger(__name__)

STOW_PATH = re.compile(r"^/dicom-web/studies(?:/([0-9][0-9.]*))?/?$")
DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
"""Failure Reason: Referenced Transfer Syntax not supported (PS3.18 Table 10.5.3-2)."""
SOP_CLASS_NOT_SUPPORTED = 0x0122
"""Failure Reason: Referenced SOP Class not supported."""
STORAGE_SOP_CLASSES = frozenset(str(context.abstract_syntax) for context in AllStoragePresentationContexts)
SLACK_BYTES = 1 << 20  # multipart boundaries and part headers, on top of the largest object


class RequestError(Exception):
    """The request as a whole is refused: an HTTP status and why."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


@dataclass(frozen=True)
class Part:
    """One body part of a multipart/related message: its headers (names lower-case) and content."""

    headers: dict[str, str]
    content: bytes


@dataclass
class Outcome:
    """One part's fate: the identifiers known for it, and its receipt."""

    sop_class_uid: str
    sop_instance_uid: str
    receipt: Receipt
    notes: list[str] = field(default_factory=list)


def is_stow_path(path: str) -> bool:
    return STOW_PATH.match(path) is not None


# -- the request body -------------------------------------------------------------------------------------------------


def read_body(headers: email.message.Message, rfile: BinaryIO, limit: int) -> bytes:
    """The request body, by Content-Length or chunked transfer coding (dicomweb-client chunks large requests)."""
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        return _read_chunked(rfile, limit)
    length_text = headers.get("Content-Length")
    if length_text is None:
        raise RequestError(411, "Content-Length or Transfer-Encoding: chunked is required")
    try:
        length = int(length_text)
    except ValueError:
        raise RequestError(400, f"Content-Length {length_text!r} is not a number") from None
    if length > limit:
        raise RequestError(413, f"the request is {length / 1e6:.0f} MB, above node.max_object_mb; send fewer at once")
    body = rfile.read(length)
    if len(body) < length:
        raise RequestError(400, f"the body ended after {len(body)} of {length} bytes")
    return body


def _read_chunked(rfile: BinaryIO, limit: int) -> bytes:
    body = bytearray()
    while True:
        line = rfile.readline(1024)
        try:
            size = int(line.split(b";")[0].strip(), 16)
        except ValueError:
            raise RequestError(400, f"chunked body: bad chunk-size line {line[:40]!r}") from None
        if size == 0:
            break
        if len(body) + size > limit:
            raise RequestError(413, "the request is above node.max_object_mb; send fewer instances at once")
        chunk = rfile.read(size)
        if len(chunk) < size or rfile.read(2) != b"\r\n":
            raise RequestError(400, "chunked body: a chunk is truncated")
        body += chunk
    while rfile.readline(8192) not in (b"\r\n", b"\n", b""):
        pass  # trailer fields: none we use
    return bytes(body)


def media_type(value: str) -> email.message.Message:
    """A Content-Type header parsed (type lower-case, parameters unquoted), with the email package's parser."""
    message = email.message.Message()
    message["Content-Type"] = value
    return message


def split_multipart(body: bytes, boundary: str) -> list[Part]:
    """The body parts of a multipart message (RFC 2046 5.1.1): between `--boundary` delimiter lines, each part's
    header fields, an empty line, its content; the close delimiter `--boundary--` ends it."""
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    pieces = (b"\r\n" + body).split(delimiter)
    if len(pieces) < 2:
        raise RequestError(400, f"the body has no part delimited by boundary {boundary!r}")
    parts = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            return parts
        line_end = piece.find(b"\r\n")
        if line_end < 0 or piece[:line_end].strip(b" \t"):
            raise RequestError(400, "a boundary delimiter line has text after the boundary")
        rest = piece[line_end + 2 :]
        if rest.startswith(b"\r\n"):
            head, content = b"", rest[2:]
        else:
            head, separator, content = rest.partition(b"\r\n\r\n")
            if not separator:
                raise RequestError(400, f"body part {len(parts) + 1} has no empty line after its header fields")
        headers = {}
        for line in head.split(b"\r\n"):
            name, colon, value = line.decode("latin-1").partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        parts.append(Part(headers, content))
    raise RequestError(400, f"the body has no close delimiter --{boundary}--")


# -- policy -----------------------------------------------------------------------------------------------------------


def client_peer(settings: Settings, address: str) -> tuple[Peer | None, str | None]:
    """The may_send peer a STOW-RS client is, by its address, and None; or None and why it may not send. With no
    may_send peer declared, any client may send (as any calling AE may), as no peer."""
    senders = [p for p in settings.peers if p.may_send]
    if not senders:
        return None, None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None, f"client address {address!r} is not an IP address"
    for peer in senders:
        if any(ip in ipaddress.ip_network(network) for network in peer.addresses):
            return peer, None
    return None, f"no peer with may_send = true lists {address} in its addresses"


# -- storing the parts ------------------------------------------------------------------------------------------------


def store_part(receiver: Receiver, part: Part, number: int, study_uid: str | None, template: Arrival) -> Outcome:
    """Check one part as a C-STORE's presentation context would be checked, then `receive` it."""

    def failed(status: int, why: str, sop_class: str = "", sop_instance: str = "") -> Outcome:
        arrival = replace(template, sop_class_uid=sop_class, sop_instance_uid=sop_instance)
        return Outcome(sop_class, sop_instance, refuse(receiver, arrival, status, f"part {number}: {why}"))

    part_type = media_type(part.headers.get("content-type", DICOM)).get_content_type()
    if part_type != DICOM:
        return failed(CANNOT_UNDERSTAND, f"is {part_type}, not {DICOM}")
    try:
        header = dcmread(BytesIO(part.content), stop_before_pixels=True, defer_size=DEFER_BYTES)
    except Exception as error:  # not a PS3.10 file: no preamble and DICM prefix, or unreadable
        return failed(CANNOT_UNDERSTAND, f"not a DICOM PS3.10 file ({error})")
    meta = header.file_meta
    sop_class = str(meta.get("MediaStorageSOPClassUID", "") or header.get("SOPClassUID", ""))
    sop_instance = str(meta.get("MediaStorageSOPInstanceUID", "") or header.get("SOPInstanceUID", ""))
    syntax = str(meta.get("TransferSyntaxUID", ""))
    if syntax not in TRANSFER_SYNTAXES:
        why = f"transfer syntax {syntax or '(none)'} is not supported"
        return failed(TRANSFER_SYNTAX_NOT_SUPPORTED, why, sop_class, sop_instance)
    if sop_class not in STORAGE_SOP_CLASSES:
        why = f"SOP class {sop_class or '(none)'} is not a storage SOP class"
        return failed(SOP_CLASS_NOT_SUPPORTED, why, sop_class, sop_instance)
    if study_uid is not None and str(header.get("StudyInstanceUID", "")) != study_uid:
        why = f"belongs to another study than {study_uid}"
        return failed(DATA_SET_DOES_NOT_MATCH_SOP_CLASS, why, sop_class, sop_instance)
    arrival = replace(
        template, data=part.content, sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax_uid=syntax
    )
    return Outcome(sop_class, sop_instance, receive(receiver, arrival))


def response_dataset(outcomes: list[Outcome]) -> Dataset:
    """The Store Instances response module (PS3.18 10.5.3): Referenced SOP Sequence for the stored instances,
    Failed SOP Sequence with Failure Reason for the others."""
    stored, failed = [], []
    for outcome in outcomes:
        item = Dataset()
        item.ReferencedSOPClassUID = outcome.sop_class_uid
        item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
        if outcome.receipt.status == SUCCESS:
            stored.append(item)
        else:
            item.FailureReason = outcome.receipt.status
            failed.append(item)
    result = Dataset()
    if failed:
        result.FailedSOPSequence = failed
    if stored:
        result.ReferencedSOPSequence = stored
    return result


# -- the HTTP exchange ------------------------------------------------------------------------------------------------


def admission(request: BaseHTTPRequestHandler, receiver: Receiver, authorised: bool) -> tuple[Peer | None, str]:
    """Whether to read this request at all: (the peer it comes from, the multipart boundary), or RequestError. The
    checks C-STORE makes when an association is requested, and those of the request's media types."""
    settings = receiver.settings()
    if not authorised:
        raise RequestError(401, "the [http] token is required: Authorization: Bearer TOKEN")
    peer, refusal = client_peer(settings, request.client_address[0])
    if refusal:
        raise RequestError(403, refusal)
    busy = "the node is shutting down" if receiver.stopping.is_set() else receiver.low_on_disk()
    if busy:
        raise RequestError(503, busy)
    content_type = media_type(request.headers.get("Content-Type", ""))
    declared = content_type.get_param("type")
    if content_type.get_content_type() != "multipart/related" or (
        isinstance(declared, str) and declared.lower() != DICOM
    ):
        got = request.headers.get("Content-Type")
        raise RequestError(415, f'expected Content-Type multipart/related; type="{DICOM}" (got {got!r})')
    accept = request.headers.get("Accept", "*/*")
    if not any(kind in accept for kind in (DICOM_JSON, "application/json", "*/*", "application/*")):
        raise RequestError(406, f"the response is {DICOM_JSON} only (Accept: {accept!r})")
    boundary = content_type.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise RequestError(400, "the Content-Type has no boundary parameter")
    return peer, boundary


def handle_stow(request: BaseHTTPRequestHandler, receiver: Receiver, path: str, *, authorised: bool) -> None:
    """Answer one STOW-RS request (called by node.web's do_POST)."""
    settings = receiver.settings()
    address, port = request.client_address[:2]
    client = f"{address}:{port}"
    request.connection.settimeout(settings.node.network_timeout_s)  # a silent client does not hold a thread for ever
    limit = int(settings.node.max_object_mb * 1e6) + SLACK_BYTES
    try:
        try:
            peer, boundary = admission(request, receiver, authorised)
        except RequestError:
            _drain(request, limit)
            raise
        if _expects_continue(request):
            request.send_response_only(100)  # RFC 9110 10.1.1: the client waits for this before sending the body
            request.end_headers()
        parts = split_multipart(read_body(request.headers, request.rfile, limit), boundary)
        if not parts:
            raise RequestError(400, "the multipart body has no parts")
    except RequestError as error:
        log.warning("STOW-RS from %s refused (%d): %s", client, error.status, error.why)
        receiver.audit.record("stow", outcome="refused", status=error.status, address=client, reason=error.why[:300])
        headers = {"Retry-After": "60"} if error.status == 503 else {}
        if error.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="cxrnode"'
        _answer(request, error.status, json.dumps({"error": error.why}).encode(), "application/json", headers, [])
        return
    match = STOW_PATH.match(path)
    study_uid = match.group(1) if match else None
    template = Arrival(
        data=b"",
        sop_class_uid="",
        sop_instance_uid="",
        transfer_syntax_uid="",
        calling_ae=peer.ae_title if peer is not None else "",
        called_ae=settings.node.ae_title,
        address=address,
        peer=f"{peer.name if peer else 'client'}@{client}",
        service="STOW-RS",
        named_by="its File Meta Information",
    )
    outcomes = [store_part(receiver, part, n, study_uid, template) for n, part in enumerate(parts, start=1)]
    stored = sum(1 for o in outcomes if o.receipt.status == SUCCESS)
    status = 200 if stored == len(outcomes) else 202 if stored else 409
    warnings = [
        f"part {n}: {o.receipt.why}"
        if o.receipt.status != SUCCESS
        else f"{o.sop_instance_uid} not analysed: {o.receipt.why}"
        for n, o in enumerate(outcomes, start=1)
        if o.receipt.why
    ]
    log.info("STOW-RS from %s: %d of %d instance(s) stored (HTTP %d)", template.peer, stored, len(outcomes), status)
    body = json.dumps(response_dataset(outcomes).to_json_dict()).encode()
    _answer(request, status, body, DICOM_JSON, {}, warnings)


def _expects_continue(request: BaseHTTPRequestHandler) -> bool:
    return request.request_version >= "HTTP/1.1" and request.headers.get("Expect", "").lower() == "100-continue"


def _drain(request: BaseHTTPRequestHandler, limit: int) -> None:
    """Read and drop the body of a request refused before it was read, so that the client gets the answer rather
    than a reset connection (up to the request size limit; beyond it the connection is closed). A client that
    waits for 100 Continue has sent no body: there is nothing to read."""
    if _expects_continue(request):
        return
    try:
        read_body(request.headers, request.rfile, limit)
    except (RequestError, OSError):
        pass


def _answer(
    request: BaseHTTPRequestHandler,
    status: int,
    body: bytes,
    content_type: str,
    headers: dict[str, str],
    warnings: list[str],
) -> None:
    request.send_response(status)
    request.send_header("Content-Type", content_type)
    request.send_header("Content-Length", str(len(body)))
    request.send_header("Cache-Control", "no-store")
    for name, value in headers.items():
        request.send_header(name, value)
    for text in warnings[:20]:  # PS3.18 8.3.5: Warning: 299 <service>: <text>
        clean = re.sub(r"[^\x20-\x7e]", " ", text).replace('"', "'")[:300]
        request.send_header("Warning", f'299 cxrnode "{clean}"')
    request.end_headers()
    request.wfile.write(body)
