"""The value types of the settings, checked at the edge: AE titles (PS3.5 VR AE), hosts, ports, peer names, code
strings, storage SOP classes, IP networks, DICOMweb URLs, and ``AE@HOST:PORT`` addresses (:func:`parse_address`).

Each check is a plain function that returns the value normalized or raises ``ValueError`` with what is wrong and
what is allowed; the ``Annotated`` types attach them to the fields of :mod:`node.config.schema`.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import urlsplit

import pydicom.uid
from pydantic import AfterValidator, BeforeValidator, Field

from node.config.errors import ConfigError, Problem

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_PEER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CODE_STRING = re.compile(r"^[A-Z0-9 _]{0,16}$")


def check_ae_title(value: str) -> str:
    """Return *value* stripped if it is a valid DICOM AE title (PS3.5 VR AE), else raise ``ValueError``."""
    if not isinstance(value, str):
        raise ValueError(f"an AE title must be a string (got {value!r})")
    stripped = value.strip(" ")
    if not stripped:
        raise ValueError("an AE title may not be empty or all spaces")
    if len(stripped) > 16:
        raise ValueError(f"an AE title is at most 16 characters (got {len(stripped)}: {stripped!r})")
    if "\\" in stripped:
        raise ValueError(f"an AE title may not contain a backslash (got {stripped!r})")
    if _CONTROL.search(stripped):
        raise ValueError(f"an AE title may not contain control characters such as tab or newline (got {stripped!r})")
    if not stripped.isascii():
        raise ValueError(f"an AE title must use ASCII characters only (got {stripped!r})")
    return stripped


def _check_host(value: str) -> str:
    stripped = value.strip()
    if not stripped or any(c.isspace() for c in stripped):
        raise ValueError(f"a host must be a host name or IP address without spaces (got {value!r})")
    if stripped.startswith("[") and stripped.endswith("]"):  # "[::1]" as written in URLs
        stripped = stripped[1:-1]
    return stripped


def _check_peer_name(value: str) -> str:
    if not _PEER_NAME.match(value):
        raise ValueError(f"a peer name is 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-' (got {value!r})")
    return value


def _check_code_string(value: str) -> str:
    """Modality, Body Part Examined, View Position: code strings, compared upper-case."""
    normalized = value.strip().upper()
    if not _CODE_STRING.match(normalized):
        raise ValueError(
            f"expected a DICOM code string (up to 16 of A-Z, 0-9, space, '_') or \"\" for empty (got {value!r})"
        )
    return normalized


def storage_sop_class_uid(value: str) -> str:
    """A storage SOP class given as a UID or a pydicom keyword -> its UID; ``ValueError`` otherwise."""
    text = value.strip()
    if _UID.match(text):
        if len(text) > 64:
            raise ValueError(f"a UID is at most 64 characters (got {len(text)})")
        known = pydicom.uid.UID(text)
        if known.is_private or not known.name or known.name == text:
            return text  # a private or newer SOP class pydicom does not know: trust the admin
        if known.type != "SOP Class" or "Storage" not in known.name:
            raise ValueError(f"{text} is {known.name!r} ({known.type}), not a storage SOP class")
        return text
    uid = getattr(pydicom.uid, text, None)
    if isinstance(uid, pydicom.uid.UID) and uid.type == "SOP Class" and "Storage" in uid.keyword:
        return str(uid)
    raise ValueError(
        f"{value!r} is neither a UID nor a storage SOP class keyword; use e.g. "
        "'ComputedRadiographyImageStorage' or '1.2.840.10008.5.1.4.1.1.1'"
    )


def _unique(items: list[Any]) -> list[Any]:
    seen: set[Any] = set()
    for item in items:
        if item in seen:
            raise ValueError(f"{item!r} is listed twice")
        seen.add(item)
    return items


def _not_empty(items: list[Any]) -> list[Any]:
    if not items:
        raise ValueError("list at least one value (an empty list would accept nothing)")
    return items


def _upper(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value


AETitle = Annotated[str, AfterValidator(check_ae_title)]
Host = Annotated[str, AfterValidator(_check_host)]
Port = Annotated[int, Field(ge=1, le=65535)]
PeerName = Annotated[str, AfterValidator(_check_peer_name)]
CodeString = Annotated[str, AfterValidator(_check_code_string)]
SOPClassUID = Annotated[str, AfterValidator(storage_sop_class_uid)]


def _check_network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ValueError(f"expected an IP address or network such as 10.1.2.3 or 10.1.2.0/24 (got {value!r})") from None


IPNetworkText = Annotated[str, AfterValidator(_check_network)]


def is_url(text: str) -> bool:
    """Whether a destination is written as a DICOMweb base URL rather than AE@HOST:PORT."""
    return text.strip().lower().startswith(("http://", "https://"))


def _check_dicomweb_url(value: str) -> str:
    """A DICOMweb base URL (the part before /studies), without a trailing slash."""
    text = value.strip()
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as error:
        raise ValueError(f"not a valid URL ({error}); expected e.g. https://pacs.example.org/dicom-web") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"expected an http:// or https:// URL such as https://pacs.example.org/dicom-web (got {text!r})"
        )
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "put credentials in username and password (or password_env), or token, not in the url: URLs are logged"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"the DICOMweb base URL takes no query or fragment (got {text!r})")
    return text.rstrip("/")


def _check_env_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError(f"expected the name of an environment variable, e.g. PACS_TOKEN (got {value!r})")
    return value


def _optional_ae_title(value: str) -> str:
    return check_ae_title(value) if isinstance(value, str) and value.strip() else ""


DICOMwebURL = Annotated[str, AfterValidator(_check_dicomweb_url)]
EnvName = Annotated[str, AfterValidator(_check_env_name)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Seconds = Annotated[float, Field(gt=0.0)]
OutputObject = Annotated[Literal["SEG", "SR", "GSPS", "SC"], BeforeValidator(_upper)]
LogLevel = Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(_upper)]


def _max_pdu(value: int) -> int:
    if value != 0 and not 4096 <= value <= 0xFFFFFFFF:
        raise ValueError(f"max_pdu is 0 (unlimited) or 4096 to 4294967295 bytes (got {value})")
    return value


class Address(NamedTuple):
    """Where a DICOM application entity listens: ``AE@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


def parse_address(text: str) -> Address:
    """``"PACS@pacs.example.org:104"`` -> ``Address("PACS", "pacs.example.org", 104)``.

    IPv6 hosts go in brackets: ``"PACS@[::1]:104"``. Raises :class:`ConfigError` (a ``ValueError``).
    """

    def bad(why: str) -> ConfigError:
        return ConfigError(
            [
                Problem(
                    "address",
                    repr(text),
                    f"{why}; expected AE@HOST:PORT, e.g. PACS@pacs.example.org:104 or PACS@[::1]:104",
                )
            ]
        )

    ae, at, rest = text.strip().rpartition("@")
    if not at:
        raise bad("the '@' between AE title and host is missing")
    try:
        ae = check_ae_title(ae)
    except ValueError as error:
        raise bad(str(error)) from None
    if rest.startswith("["):
        host, bracket, port_text = rest[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise bad("an IPv6 host needs its closing ']' followed by ':PORT'")
        port_text = port_text[1:]
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            raise bad("the ':PORT' after the host is missing")
        if ":" in host:
            raise bad("put an IPv6 host in brackets")
    if not host or any(c.isspace() for c in host):
        raise bad("the host is missing or contains spaces")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise bad(f"the port must be a number from 1 to 65535 (got {port_text!r})")
    return Address(ae, host, int(port_text))
