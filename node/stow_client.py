"""DICOMweb out: a job's results to a destination's STOW-RS service (PS3.18 10.5), with the `dicomweb-client` library.

A destination has the results when it answers 200 or 202 and lists every one of them in its Referenced SOP Sequence
(0008,1199) with no Failed SOP Sequence (0008,1198) entry; a Warning Reason there counts as stored, as the storage
warnings do for C-STORE. Anything else raises STOWError naming the instance and the Failure Reason (or the HTTP
status), and the sender tries again later, exactly as after a failed C-STORE.

Credentials (a bearer token, or HTTP basic user name and password) go into the request by the session's `auth`,
never into a URL, an exception message or a log line. https destinations are verified against [tls]
ca_certificates when given, else the system's CAs; [tls] verify_destinations = false turns verification off.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread

from node.config import Peer, TLSSettings

FAILURE_REASONS = {
    0xA700: "Refused: Out of Resources",
    0xA900: "Error: Data Set does not match SOP Class",
    0xC000: "Error: Cannot understand",
    0xC122: "Referenced Transfer Syntax not supported",
    0x0110: "Processing failure",
    0x0122: "Referenced SOP Class not supported",
}
"""Failure Reason (0008,1197) values a STOW-RS origin server may give (PS3.18 Table 10.5.3-2, PS3.4 Annex B), by
name for the error message; other values are shown in hex."""


class STOWError(Exception):
    """A DICOMweb destination did not take the results; the message says which instance and why."""


class BearerToken(requests.auth.AuthBase):
    """`Authorization: Bearer TOKEN` on every request of a session (and nowhere else)."""

    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.token}"
        return request


def session_for(peer: Peer, tls: TLSSettings) -> requests.Session:
    """An HTTP session with the peer's credentials and the configured certificate checks."""
    session = requests.Session()
    token, password = peer.token_value(), peer.password_value()
    if peer.token_env and not token:
        raise STOWError(f"{peer.name}: environment variable {peer.token_env} (token_env) is not set or is empty")
    if peer.password_env and not password:
        raise STOWError(f"{peer.name}: environment variable {peer.password_env} (password_env) is not set or is empty")
    if token:
        session.auth = BearerToken(token)
    elif peer.username:
        session.auth = requests.auth.HTTPBasicAuth(peer.username, password or "")
    if not tls.verify_destinations:
        session.verify = False
    elif tls.ca_certificates is not None:
        session.verify = str(tls.ca_certificates)
    return session


def reason_text(code: int) -> str:
    return f"0x{code:04X} {FAILURE_REASONS[code]}" if code in FAILURE_REASONS else f"0x{code:04X}"


def _response_dataset(response: requests.Response | None) -> Dataset:
    """The STOW-RS response body as a data set (DICOM JSON), or an empty one when there is none to read."""
    if response is None or not response.content:
        return Dataset()
    try:
        return Dataset.from_json(response.json())
    except ValueError:  # not JSON (e.g. an HTML error page) or not DICOM JSON
        return Dataset()


def problems_in(result: Dataset, sent: Sequence[Dataset]) -> list[str]:
    """What the STOW-RS response says went wrong with `sent`: failures, and instances it does not list as stored."""
    failed = {str(item.get("ReferencedSOPInstanceUID", "")): item for item in result.get("FailedSOPSequence", [])}
    stored = {str(item.get("ReferencedSOPInstanceUID", "")) for item in result.get("ReferencedSOPSequence", [])}
    problems = []
    for ds in sent:
        uid = str(ds.SOPInstanceUID)
        if uid in failed:
            reason = failed[uid].get("FailureReason")
            problems.append(f"{uid}: failed, {reason_text(int(reason)) if reason is not None else 'no reason given'}")
        elif uid not in stored:
            problems.append(f"{uid}: not listed as stored in the response")
    return problems


def no_answer(error: requests.RequestException, timeout: float) -> str:
    """Why a request got no HTTP answer, in a line (requests' own messages repeat the URL and the pool)."""
    if isinstance(error, requests.Timeout):
        return f"no answer within {timeout:g} s (sender.timeout_s)"
    cause = re.search(r"\[Errno -?\d+\] [^'\")]+", str(error))
    if isinstance(error, requests.exceptions.SSLError):
        return f"TLS failed: {error}"
    if isinstance(error, requests.ConnectionError):
        return f"cannot connect: {cause.group(0) if cause else error}"
    return f"{type(error).__name__}: {error}"


def store_dicomweb(peer: Peer, paths: Sequence[Path], *, timeout: float, tls: TLSSettings) -> None:
    """POST `paths` to the peer's STOW-RS service in one multipart/related request. Raises STOWError unless
    every instance is stored."""
    assert peer.url is not None  # the sender calls this for DICOMweb peers only
    datasets = [dcmread(path) for path in paths]
    client = DICOMwebClient(url=peer.url, session=session_for(peer, tls), timeout=timeout)
    client.set_http_retry_params(retry=False)  # the sender retries, with its own backoff, and counts the attempts
    try:
        result = client.store_instances(datasets)
    except requests.HTTPError as error:
        response = error.response
        code = response.status_code if response is not None else 0
        details = problems_in(_response_dataset(response), datasets) if code in (400, 409) else []
        hint = " (check the peer's token or username/password)" if code in (401, 403) else ""
        reason = response.reason if response is not None else ""
        raise STOWError(
            f"{peer.url}: HTTP {code} {reason}{hint}" + (f": {'; '.join(details)}" if details else "")
        ) from None
    except requests.RequestException as error:  # no answer: refused, reset, timed out, TLS
        raise STOWError(f"{peer.url}: {no_answer(error, timeout)}") from None
    problems = problems_in(result, datasets)
    if problems:
        raise STOWError(f"{peer.url}: {'; '.join(problems)}")
