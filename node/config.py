"""The node's settings: embedded defaults < TOML file < environment (``CXRNODE_*``) < overrides.

Loose input (TOML tables, environment strings, command-line values) is converted once, here, into one
frozen, validated :class:`Settings` object. The entry point creates it and passes it down; nothing reads
configuration from anywhere else.

    settings = load_settings(Path("config/node.toml"), overrides={"node.port": 11113})
    settings.destinations_for("CR_ROOM1")   # -> [Peer(name="pacs", ...), ...]

Every problem becomes a :class:`ConfigError` whose message names where the value came from (the file, the
environment variable, the override), the key path (``peers[1].port``, ``routing.rules[0].destinations``),
what is wrong and what is allowed. All problems found are reported together, one per line.

Environment variables (for containers):

* ``CXRNODE_CONFIG`` — the TOML file to read when ``load_settings`` gets no path.
* ``CXRNODE_DESTINATION_TOKEN``, or ``CXRNODE_DESTINATION_USERNAME`` and ``CXRNODE_DESTINATION_PASSWORD`` — the
  credentials of ``serve --destination https://…`` (a DICOMweb destination given on the command line).
* The variables a peer names in ``token_env`` / ``password_env`` (its DICOMweb credentials), whatever their names.
* ``CXRNODE_<SECTION>__<KEY>`` — one setting, e.g. ``CXRNODE_NODE__PORT=104``, ``CXRNODE_INFERENCE__DEVICE=cpu``.
  Lists are comma-separated (``CXRNODE_ROUTING__DEFAULT=pacs,archive``) or a TOML array
  (``CXRNODE_FILTERS__BODY_PARTS='["CHEST", ""]'``); an empty value is an empty list, or "unset" for the
  optional settings (weights, thresholds, sender.calling_ae_title). Peers and routing rules are tables and
  can only be declared in the file. Any other ``CXRNODE_`` variable is an error, so a typo cannot pass
  silently.

Loading is cheap and has no side effects (no directories are created), so peers and routing can be
reloaded (SIGHUP) by calling :func:`load_settings` again and swapping the object.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import urlsplit

import pydicom.uid
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "Address",
    "ConfigError",
    "Filters",
    "InferenceSettings",
    "NodeSettings",
    "Outputs",
    "Peer",
    "Problem",
    "Routing",
    "RoutingRule",
    "SenderSettings",
    "Settings",
    "describe",
    "load_settings",
    "parse_address",
    "with_command_line_peers",
]

ENV_PREFIX = "CXRNODE_"
ENV_CONFIG = "CXRNODE_CONFIG"
ENV_DESTINATION_TOKEN = "CXRNODE_DESTINATION_TOKEN"  # credentials of a DICOMweb `serve --destination URL`
ENV_DESTINATION_USERNAME = "CXRNODE_DESTINATION_USERNAME"
ENV_DESTINATION_PASSWORD = "CXRNODE_DESTINATION_PASSWORD"
ENV_NOT_SETTINGS = {
    ENV_CONFIG,
    "CXRNODE_CRASH_AT",  # node.faults, for fault-injection tests
    ENV_DESTINATION_TOKEN,
    ENV_DESTINATION_USERNAME,
    ENV_DESTINATION_PASSWORD,
}
RESULTS_DIR_NAME = "results"


# --------------------------------------------------------------------------------------------- errors


class Problem(NamedTuple):
    """One thing wrong with the settings."""

    source: str  # where the value came from: the file path, "environment CXRNODE_X__Y", "override x.y", "defaults"
    key: str  # the key path, e.g. "peers[1].port"; "" when the problem is with the source as a whole
    message: str  # what is wrong and what is allowed

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.message}" if self.key else f"{self.source}: {self.message}"


class ConfigError(ValueError):
    """The settings are unusable. ``str(error)`` has one line per problem: ``SOURCE: KEY: what is wrong``.

    A ``ValueError``, so ``parse_address`` can serve directly as an argparse ``type=``.
    """

    def __init__(self, problems: Sequence[Problem] | str) -> None:
        if isinstance(problems, str):
            problems = [Problem("settings", "", problems)]
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# ------------------------------------------------------------------------------ value types (at the edge)

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


# ------------------------------------------------------------------------------------------- the schema


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSettings(_Section):
    """``[node]``: this node as a DICOM application entity (the storage SCP)."""

    ae_title: AETitle = "CXRNODE"
    host: Host = "127.0.0.1"
    port: Port = 11112
    # Absolute after loading: a relative path in a file is relative to the file's folder, else to the current dir.
    data_dir: Path = Path("cxrnode-data")
    log_level: LogLevel = "INFO"
    # Maximum PDU length we accept, in bytes. 0 = unlimited: peers send in their largest PDUs, so fewer, larger
    # PDUs per image (pynetdicom's own default would be 16382).
    max_pdu: Annotated[int, AfterValidator(_max_pdu)] = 0
    network_timeout_s: Seconds = 30.0  # also the idle limit: a silent association is aborted after it
    acse_timeout_s: Seconds = 30.0
    dimse_timeout_s: Seconds = 30.0
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 10
    # Associations one calling AE may hold at the same time (a peer's own max_associations overrides it).
    max_associations_per_peer: Annotated[int, Field(ge=1, le=1000)] = 4
    # Low-water mark of the data dir's file system: below either, new associations are refused (transient
    # A-ASSOCIATE-RJ, the sender retries later) and C-STOREs answer 0xA700, before the disk is actually full.
    min_free_mb: Annotated[float, Field(ge=0)] = 1024
    min_free_percent: Annotated[float, Field(ge=0, le=100)] = 1.0
    # Largest object accepted, and largest decoded image (Rows x Columns x frames x samples x bytes per sample):
    # bigger ones are refused with 0xA700 before anything is written or decoded.
    max_object_mb: Annotated[float, Field(gt=0)] = 512
    max_decoded_mb: Annotated[float, Field(gt=0)] = 1024
    # What this node runs: "receive" (the SCP and STOW-RS), "infer" (the worker process and its models), "send" (the
    # sender). Any subset but all three needs a [queue] url the other nodes share (node.service.check_roles).
    roles: Annotated[list[Literal["receive", "infer", "send"]], AfterValidator(_unique), AfterValidator(_not_empty)] = [
        "receive",
        "infer",
        "send",
    ]
    # Receiving processes on the one DICOM port (SO_REUSEPORT); the association limits count across them.
    receivers: Annotated[int, Field(ge=1, le=64)] = 1

    @model_validator(mode="after")
    def _absolute_data_dir(self) -> NodeSettings:
        absolute = Path(os.path.abspath(self.data_dir.expanduser()))
        if absolute != self.data_dir:
            object.__setattr__(self, "data_dir", absolute)  # still during validation; frozen afterwards
        return self


class Peer(_Section):
    """``[[peers]]``: another application entity: a modality or PACS that sends us images, a destination for results.

    A destination with a ``url`` gets its results by DICOMweb STOW-RS (PS3.18 10.5) instead of C-STORE; host and
    port then come from the url, and ae_title is needed only if the peer also sends to us by C-STORE. Credentials
    (bearer token, or HTTP basic user name and password) are given here or, better, named by ``*_env`` keys."""

    name: PeerName
    ae_title: Annotated[str, AfterValidator(_optional_ae_title)]  # "" only for a peer with url
    host: Host
    port: Port
    may_send: bool = True  # may send images to us (C-STORE) and C-ECHO us
    description: str = ""
    # Source addresses this peer may call from (IP addresses or networks such as 10.1.2.0/24); empty = any.
    addresses: Annotated[list[IPNetworkText], AfterValidator(_unique)] = []
    # Associations this peer may hold at the same time; None = node.max_associations_per_peer.
    max_associations: Annotated[int, Field(ge=1, le=1000)] | None = None
    # Send results to this peer over DICOM TLS (needs [tls] certificate and private_key).
    tls: bool = False
    # The result objects this destination gets (its output profile); None = [outputs] objects.
    objects: OutputObjects | None = None
    # A DICOMweb destination: its base URL (STOW-RS posts to URL/studies), and its credentials, never logged.
    url: DICOMwebURL | None = None
    token: SecretStr | None = None  # Authorization: Bearer
    token_env: EnvName | None = None  # ...or the environment variable that holds the token
    username: str | None = None  # HTTP basic authentication
    password: SecretStr | None = None
    password_env: EnvName | None = None

    @property
    def address(self) -> Address:
        return Address(self.ae_title, self.host, self.port)

    @property
    def where(self) -> str:
        """Where results go, for logs and the audit: the URL or AE@HOST:PORT (never a credential)."""
        return self.url if self.url else str(self.address)

    def token_value(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The bearer token, from the file or the variable token_env names (read now)."""
        if self.token_env:
            return (os.environ if environ is None else environ).get(self.token_env) or None
        return self.token.get_secret_value() if self.token else None

    def password_value(self, environ: Mapping[str, str] | None = None) -> str | None:
        if self.password_env:
            return (os.environ if environ is None else environ).get(self.password_env) or None
        return self.password.get_secret_value() if self.password else None

    @model_validator(mode="before")
    @classmethod
    def _host_and_port_from_url(cls, data: Any) -> Any:
        """A DICOMweb peer's host and port are its URL's (written again, they must agree with it); it has no AE
        title and does not send to us unless ae_title and may_send = true say so."""
        if not isinstance(data, dict) or not isinstance(data.get("url"), str):
            return data
        try:
            parts = urlsplit(data["url"].strip())
            host, port = parts.hostname or "", parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError:
            return data  # the url's own check reports it
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for key, value in (("host", host), ("port", port)):
            if key in data and str(data[key]).strip("[] ") != str(value):
                problems.append(((key,), f"a peer with url takes its {key} from it ({value}); remove {key}"))
        if problems:
            raise PydanticCustomError("cross_check", "{count} problems", {"count": len(problems), "problems": problems})
        return {"ae_title": "", "may_send": False, **data, "host": host or "-", "port": port}

    @model_validator(mode="after")
    def _dicomweb_or_dimse(self, info: ValidationInfo) -> Peer:
        environ = (info.context or {}).get("environ", os.environ)
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if self.url is None:
            if not self.ae_title:
                problems.append((("ae_title",), "required unless the peer has a url (a DICOMweb destination)"))
            for key in ("token", "token_env", "username", "password", "password_env"):
                if getattr(self, key) is not None:
                    problems.append(((key,), f"{key} is for a DICOMweb destination: give url too, or remove {key}"))
        elif self.tls:
            problems.append((("tls",), "tls is DICOM TLS for C-STORE; for DICOMweb use an https:// url"))
        for secret in ("token", "password"):
            if getattr(self, secret) is not None and getattr(self, f"{secret}_env") is not None:
                problems.append(((f"{secret}_env",), f"give {secret} or {secret}_env, not both"))
            name = getattr(self, f"{secret}_env")
            if name is not None and not environ.get(name):
                problems.append(((f"{secret}_env",), f"environment variable {name} is not set or is empty"))
        has_password = self.password is not None or self.password_env is not None
        if has_password and not self.username:
            problems.append((("username",), "a password needs its username (HTTP basic authentication)"))
        if (self.token is not None or self.token_env is not None) and (self.username or has_password):
            problems.append((("token",), "give a bearer token or a username and password, not both"))
        if problems:
            raise PydanticCustomError("cross_check", "{count} problems", {"count": len(problems), "problems": problems})
        return self


class HTTPSettings(_Section):
    """``[http]``: Prometheus /metrics, /healthz, /readyz and the read-only status page."""

    port: Annotated[int, Field(ge=0, le=65535)] = 11180  # 0 = no HTTP server
    host: Host = "127.0.0.1"
    token: str | None = None  # required when host is not a loopback address: ?token=... or Authorization: Bearer

    @model_validator(mode="after")
    def _token_beyond_loopback(self) -> HTTPSettings:
        try:
            loopback = ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            loopback = self.host == "localhost"
        if self.port and not loopback and not self.token:
            raise ValueError(
                f"http.host {self.host} is reachable from other machines: set http.token too "
                "(the status page shows patient-free but private operational data)"
            )
        return self


class TLSSettings(_Section):
    """``[tls]``: DICOM TLS (PS3.15 Annex B) for the SCP and for results sent to peers with tls = true."""

    enabled: bool = False  # the SCP accepts only TLS connections when true
    certificate: Path | None = None  # PEM, our certificate (chain)
    private_key: Path | None = None  # PEM, its key
    ca_certificates: Path | None = None  # PEM bundle used to verify peers (clients and destinations)
    require_client_certificate: bool = False  # the SCP refuses clients without a certificate signed by ca_certificates
    verify_destinations: bool = True  # check the destination's certificate against ca_certificates

    @model_validator(mode="after")
    def _complete(self) -> TLSSettings:
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("tls.enabled needs tls.certificate and tls.private_key")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("tls.require_client_certificate needs tls.ca_certificates to verify clients against")
        return self


class RoutingRule(_Section):
    """``[[routing.rules]]``: results of images sent by *calling_ae* go to *destinations* instead of the default."""

    calling_ae: AETitle
    destinations: Annotated[list[PeerName], AfterValidator(_unique)]


class Routing(_Section):
    """``[routing]``: where results go. An empty destination list means: files under ``data_dir/results/``."""

    default: Annotated[list[PeerName], AfterValidator(_unique)] = []
    rules: list[RoutingRule] = []


DEFAULT_SOP_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
]


class Filters(_Section):
    """``[filters]``: which received images are analysed; the others are accepted and stored but skipped.

    Code strings are stored upper-case and stripped; ``""`` stands for an empty or missing attribute. Applied by
    ``node.filters``.
    """

    modalities: Annotated[list[CodeString], AfterValidator(_not_empty), AfterValidator(_unique)] = ["CR", "DX"]
    sop_classes: Annotated[list[SOPClassUID], AfterValidator(_not_empty), AfterValidator(_unique)] = list(
        DEFAULT_SOP_CLASSES
    )
    body_parts: Annotated[list[CodeString], AfterValidator(_not_empty), AfterValidator(_unique)] = ["CHEST", ""]
    # Empty ViewPosition is accepted by default: many CR modalities leave it empty. Laterals (LL, RL) are skipped.
    view_positions: Annotated[list[CodeString], AfterValidator(_not_empty), AfterValidator(_unique)] = [
        "PA",
        "AP",
        "",
    ]


class InferenceSettings(_Section):
    """``[inference]``: the model and how it is run."""

    device: Annotated[
        str,
        BeforeValidator(lambda v: v.strip().lower() if isinstance(v, str) else v),
        Field(pattern=r"^(auto|cpu|cuda|cuda:[0-9]+)$"),
    ] = "auto"
    batch_size: Annotated[int, Field(ge=1, le=64)] = 4
    max_wait_ms: Annotated[int, Field(ge=0, le=60_000)] = 200
    weights: Path | None = None  # None = the demo weights shipped with the package
    score_threshold: Fraction | None = None  # None = the value recorded with the weights
    present_threshold: Fraction | None = None
    mask_threshold: Fraction | None = None
    # Nice value (0-19) of the threads that decode, analyse and write: receiving keeps precedence over them, so a
    # burst of images is acknowledged at full speed while the CPU also runs the models. 0 = same priority.
    nice: Annotated[int, Field(ge=0, le=19)] = 10

    @model_validator(mode="after")
    def _absolute_weights(self) -> InferenceSettings:
        if self.weights is not None:
            object.__setattr__(self, "weights", Path(os.path.abspath(self.weights.expanduser())))
        return self


OutputObjects = Annotated[list[OutputObject], AfterValidator(_not_empty), AfterValidator(_unique)]


class Outputs(_Section):
    """``[outputs]``: which DICOM objects are made from each result (a destination's own `objects` overrides it).
    Results always go to data_dir/results."""

    objects: OutputObjects = ["SEG", "SR", "GSPS"]


class SenderSettings(_Section):
    """``[sender]``: C-STORE of results to destinations, with retries: delay = base * factor**(attempt-1), capped."""

    retry_base_s: Seconds = 5.0
    retry_factor: Annotated[float, Field(ge=1.0)] = 2.0
    retry_max_delay_s: Annotated[float, Field(ge=0.0)] = 600.0
    max_attempts: Annotated[int, Field(ge=1)] = 8
    timeout_s: Seconds = 30.0
    # Filled in with node.ae_title when not given, so after validation it is always a string.
    calling_ae_title: AETitle | None = None


def _queue_url(url: str) -> str:
    from node.queue import check_url  # its QueueURLError is a ValueError: reported like any bad value

    return check_url(url.strip())


def _node_id(value: str) -> str:
    value = value.strip()
    if not value or len(value) > 200 or not value.isprintable() or any(c.isspace() for c in value):
        raise ValueError("a node id is 1-200 printable characters without spaces, e.g. gpu-host-2 or cxr-a:1")
    return value


class QueueSettings(_Section):
    """``[queue]``: where the jobs are (a SQLite file on this host, or a PostgreSQL database several nodes share), and
    how this node holds the jobs it works on (``node.queue``)."""

    url: Annotated[str, AfterValidator(_queue_url)] | None = None  # None = sqlite:///<data_dir>/queue.sqlite
    # This node's name as the owner of the jobs it holds; unique per running node. Filled in with hostname:pid.
    node_id: Annotated[str, AfterValidator(_node_id)] = ""
    # Seconds a claimed job stays held without a renewal (renewed every third of it): a dead node's jobs are taken
    # over after at most this long.
    lease_s: Annotated[float, Field(ge=1.0, le=3600.0)] = 30.0

    @model_validator(mode="after")
    def _default_node_id(self) -> QueueSettings:
        if not self.node_id:
            from node.queue import default_node_id

            object.__setattr__(self, "node_id", default_node_id())  # still during validation; frozen afterwards
        return self


class Settings(BaseModel):
    """All settings of the node: built once at start-up by :func:`load_settings` and passed down."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Factories, not instances: a default is built at load time (data_dir is made absolute against the cwd then).
    node: NodeSettings = Field(default_factory=NodeSettings)
    peers: list[Peer] = []
    routing: Routing = Field(default_factory=Routing)
    filters: Filters = Field(default_factory=Filters)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    outputs: Outputs = Field(default_factory=Outputs)
    sender: SenderSettings = Field(default_factory=SenderSettings)
    tls: TLSSettings = Field(default_factory=TLSSettings)
    http: HTTPSettings = Field(default_factory=HTTPSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        names: dict[str, int] = {}
        for i, peer in enumerate(self.peers):
            if peer.name in names:
                problems.append(
                    (
                        ("peers", i, "name"),
                        f"peer name {peer.name!r} is already used by peers[{names[peer.name]}]; names must be unique",
                    )
                )
            names.setdefault(peer.name, i)
        senders: dict[str, int] = {}
        for i, peer in enumerate(self.peers):
            if not peer.may_send:
                continue
            if peer.ae_title in senders:
                problems.append(
                    (
                        ("peers", i, "ae_title"),
                        f"AE title {peer.ae_title!r} is already used by peers[{senders[peer.ae_title]}]; peers with "
                        "may_send = true must have distinct AE titles, since the calling AE title identifies them",
                    )
                )
            senders.setdefault(peer.ae_title, i)
        known = ", ".join(sorted(names)) or "none: declare them as [[peers]]"
        for i, peer in enumerate(self.peers):
            if peer.tls and (self.tls.certificate is None or self.tls.private_key is None):
                problems.append((("peers", i, "tls"), "tls = true needs [tls] certificate and private_key"))

        def check_names(loc: tuple[str | int, ...], destinations: list[str]) -> None:
            for name in destinations:
                if name not in names:
                    problems.append((loc, f"unknown peer {name!r}; known peers: {known}"))

        check_names(("routing", "default"), self.routing.default)
        rule_for: dict[str, int] = {}
        for i, rule in enumerate(self.routing.rules):
            check_names(("routing", "rules", i, "destinations"), rule.destinations)
            if rule.calling_ae in rule_for:
                problems.append(
                    (
                        ("routing", "rules", i, "calling_ae"),
                        f"calling AE {rule.calling_ae!r} already has a rule: routing.rules[{rule_for[rule.calling_ae]}]",
                    )
                )
            rule_for.setdefault(rule.calling_ae, i)
        if problems:
            raise PydanticCustomError(
                "cross_check", "{count} cross-check problems", {"count": len(problems), "problems": problems}
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _default_calling_ae_title(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        sender = data.get("sender", {})
        if isinstance(sender, SenderSettings):
            sender = sender.model_dump()
        if not isinstance(sender, dict) or sender.get("calling_ae_title") is not None:
            return data
        node = data.get("node", {})
        if isinstance(node, NodeSettings):
            node = node.model_dump()
        ae = node.get("ae_title", NodeSettings.model_fields["ae_title"].default) if isinstance(node, dict) else None
        try:
            ae = check_ae_title(ae)
        except ValueError:
            return data  # node.ae_title reports the problem, once
        return {**data, "sender": {**sender, "calling_ae_title": ae}}

    # -- questions the rest of the node asks --------------------------------------------------------------

    @property
    def results_dir(self) -> Path:
        """Where results are written as files when a route has no destinations (data_dir/results)."""
        return self.node.data_dir / RESULTS_DIR_NAME

    def peer(self, name: str) -> Peer:
        """The peer called *name* (``KeyError`` if none)."""
        for peer in self.peers:
            if peer.name == name:
                return peer
        raise KeyError(name)

    def peer_by_ae(self, calling_ae: str) -> Peer | None:
        """The peer with this AE title: one with may_send first (those are unique), else the first declared."""
        ae = calling_ae.strip(" ")
        matching = [p for p in self.peers if p.ae_title == ae]
        return next((p for p in matching if p.may_send), matching[0] if matching else None)

    def destinations_for(self, calling_ae: str) -> list[Peer]:
        """The peers that receive results of images sent by *calling_ae*: its rule if one matches, else the default.

        An empty list means: write the results as files under :attr:`results_dir`.
        """
        ae = calling_ae.strip(" ")
        names = next((r.destinations for r in self.routing.rules if r.calling_ae == ae), self.routing.default)
        return [self.peer(name) for name in names]

    def objects_for(self, peer: Peer | None) -> list[str]:
        """The result objects a destination gets (its own profile, else [outputs]); None = results as files."""
        return list(peer.objects) if peer is not None and peer.objects is not None else list(self.outputs.objects)

    def objects_to_write(self, calling_ae: str) -> list[str]:
        """Every object any destination of this caller's results needs (or [outputs] when they go to files),
        in the order SEG, SR, GSPS, SC."""
        destinations = self.destinations_for(calling_ae)
        wanted = {kind for peer in destinations or [None] for kind in self.objects_for(peer)}
        return [kind for kind in ("SEG", "SR", "GSPS", "SC") if kind in wanted]

    def allowed_calling_aes(self) -> set[str] | None:
        """AE titles that may send to us, or None (any calling AE accepted) when no peer has may_send = true."""
        if not any(p.may_send for p in self.peers):
            return None
        return {p.ae_title for p in self.peers if p.may_send and p.ae_title}  # a DICOMweb-only peer has none


# ------------------------------------------------------------------------------------------------ loading

_SECTIONS: dict[str, type[BaseModel]] = {
    name: typing.cast(type[BaseModel], field.annotation)
    for name, field in Settings.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
}
_TABLE_ONLY = {("routing", "rules")}  # lists of tables: file only


def load_settings(
    path: Path | str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Build the settings: embedded defaults < TOML file < ``CXRNODE_*`` environment < *overrides*.

    *path* None: the file named by ``CXRNODE_CONFIG`` if set, else the embedded defaults only.
    *environ* defaults to ``os.environ``. *overrides* come from command-line flags as dotted keys,
    ``{"node.port": 11113}``; a None value means "flag not given" and is ignored; a string for a list is
    split like an environment value.

    Cheap and without side effects (creates no directories). Raises :class:`ConfigError`.
    """
    environ = os.environ if environ is None else environ
    if path is None and environ.get(ENV_CONFIG, "").strip():
        path = Path(environ[ENV_CONFIG].strip())
    data: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}
    problems: list[Problem] = []
    default_source = "defaults"

    if path is not None:
        default_source = str(path)
        data = _read_toml(Path(path))
        for section in data:
            sources[(section,)] = default_source
        _resolve_file_paths(data, Path(path))
        problems += _quoted_scalars(data, default_source)

    named_by_peers = {
        peer.get(key)
        for peer in (data.get("peers") if isinstance(data.get("peers"), list) else [])
        if isinstance(peer, dict)
        for key in ("token_env", "password_env")
    }
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_SETTINGS or name in named_by_peers:
            continue
        label = f"environment {name}"
        section, sep, key = name[len(ENV_PREFIX) :].lower().partition("__")
        where = (
            _settable(section, key)
            if sep
            else (f"not a setting; use {ENV_PREFIX}<SECTION>__<KEY> (e.g. CXRNODE_NODE__PORT) or {ENV_CONFIG}")
        )
        if where:
            problems.append(Problem(label, "", where))
            continue
        _set(data, sources, section, key, _from_text(section, key, environ[name]), label)

    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        label = f"override {dotted}"
        section, sep, key = dotted.partition(".")
        where = _settable(section, key) if sep else "expected a dotted key SECTION.KEY, e.g. node.port"
        if where:
            problems.append(Problem(label, "", where))
            continue
        if isinstance(value, str):
            value = _from_text(section, key, value)
        elif isinstance(value, (list, tuple)):
            value = list(value)
        _set(data, sources, section, key, value, label)

    if problems:
        raise ConfigError(problems)
    context = {"environ": environ}  # for the peers' token_env / password_env
    try:
        return Settings.model_validate(data, context=context)
    except ValidationError as error:
        problems = _problems(error, sources, default_source)
    # Cross-checks run only once everything validated; run them on peers + routing alone so that, e.g., an unknown
    # peer name in routing is reported together with a bad port elsewhere.
    if not any(p.key.startswith(("peers", "routing")) for p in problems):
        try:
            Settings.model_validate({k: data[k] for k in ("peers", "routing") if k in data}, context=context)
        except ValidationError as error:
            problems += _problems(error, sources, default_source)
    raise ConfigError(problems)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes()
    except OSError as error:
        raise ConfigError(
            [
                Problem(
                    str(path),
                    "",
                    f"cannot read the config file: {error.strerror or error}; give an existing TOML file (or unset {ENV_CONFIG})",
                )
            ]
        ) from None
    try:
        return tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(
            [Problem(str(path), "", f"not UTF-8 text (byte {error.start}); save the file as UTF-8")]
        ) from None
    except tomllib.TOMLDecodeError as error:
        message = str(error)
        where = re.search(r"\(at line (\d+), column (\d+)\)$", message)
        if where:
            message = message[: where.start()].rstrip()
            message = f"line {where[1]}, column {where[2]}: TOML syntax error: {message}"
        else:
            message = f"TOML syntax error: {message}"
        raise ConfigError([Problem(str(path), "", message + " (see https://toml.io)")]) from None


def _scalar_kind(annotation: Any) -> type | None:
    """int, float or bool when a field takes only that (Optional allowed); None otherwise."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_kind(kinds[0]) if len(kinds) == 1 else None
    return annotation if annotation in (int, float, bool) else None


def _quoted_scalars(data: Mapping[str, Any], source: str) -> list[Problem]:
    """A number or true/false written in quotes in the file (`port = "11112"`): TOML has types, and a quoted number
    is a typo worth naming, not something to convert silently."""
    tables: list[tuple[str, type[BaseModel], Any]] = []
    for section, table in data.items():
        if section == "peers" and isinstance(table, list):
            tables += [(f"peers[{i}]", Peer, t) for i, t in enumerate(table)]
        elif section in _SECTIONS:
            tables.append((section, _SECTIONS[section], table))
    problems = []
    for where, model, table in tables:
        if not isinstance(table, dict):
            continue
        for key, value in table.items():
            field = model.model_fields.get(key)
            kind = _scalar_kind(field.annotation) if field is not None else None
            if kind is not None and isinstance(value, str):
                what = {int: "an integer", float: "a number", bool: "true or false"}[kind]
                written = value.strip().lower() if kind is bool else value.strip()
                problems.append(
                    Problem(
                        source,
                        f"{where}.{key}",
                        f"{value!r} is a quoted string; {what} goes without quotes: {key} = {written}",
                    )
                )
    return problems


def _resolve_file_paths(data: dict[str, Any], path: Path) -> None:
    """Relative paths written in a file are relative to the file's folder."""
    folder = Path(os.path.abspath(path)).parent
    for section, key in (
        ("node", "data_dir"),
        ("inference", "weights"),
        ("tls", "certificate"),
        ("tls", "private_key"),
        ("tls", "ca_certificates"),
    ):
        table = data.get(section)
        if isinstance(table, dict) and isinstance(table.get(key), str) and table[key]:
            given = Path(table[key]).expanduser()
            table[key] = str(given if given.is_absolute() else folder / given)


def _settable(section: str, key: str) -> str | None:
    """None if SECTION.KEY can be set outside the file, else what is wrong."""
    if section == "peers":
        return "peers can only be declared in the config file, as [[peers]] tables"
    model = _SECTIONS.get(section)
    if model is None:
        return f"unknown section {section!r}; sections: {', '.join(_SECTIONS)}"
    if key not in model.model_fields:
        return f"unknown key {key!r} in [{section}]; keys: {', '.join(model.model_fields)}"
    if (section, key) in _TABLE_ONLY:
        return f"{section}.{key} can only be declared in the config file"
    return None


def _from_text(section: str, key: str, text: str) -> Any:
    """An environment/command-line string -> what the field wants (pydantic coerces the scalars)."""
    annotation = _SECTIONS[section].model_fields[key].annotation
    is_list = typing.get_origin(annotation) is list
    is_optional = type(None) in typing.get_args(annotation) and typing.get_origin(annotation) in (
        typing.Union,
        types.UnionType,
    )
    stripped = text.strip()
    if is_list:
        if not stripped:
            return []
        if stripped.startswith("["):
            try:
                return tomllib.loads(f"v = {stripped}")["v"]
            except tomllib.TOMLDecodeError:
                pass  # let the comma split produce something pydantic can complain about
        return [item.strip() for item in stripped.split(",")]
    if is_optional and not stripped:
        return None
    return text


def _set(
    data: dict[str, Any], sources: dict[tuple[str, ...], str], section: str, key: str, value: Any, label: str
) -> None:
    table = data.setdefault(section, {})
    if not isinstance(table, dict):  # e.g. "node = 1" in the file: let validation report the file's error
        return
    table[key] = value
    sources[(section, key)] = label


def _key_path(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed_keys(loc: Sequence[str | int]) -> list[str] | None:
    """The field names of the model at *loc* (for 'unknown key' messages)."""
    model: Any = Settings
    for part in loc:
        if isinstance(part, int):
            args = typing.get_args(model)
            model = args[0] if args else None
        elif isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            model = model.model_fields[part].annotation
        else:
            return None
        while typing.get_origin(model) is Annotated:
            model = typing.get_args(model)[0]
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return None


def _problems(error: ValidationError, sources: Mapping[tuple[str, ...], str], default_source: str) -> list[Problem]:
    def source(loc: Sequence[str | int]) -> str:
        for n in (2, 1):
            if len(loc) >= n and tuple(map(str, loc[:n])) in sources:
                return sources[tuple(map(str, loc[:n]))]
        return default_source

    problems: list[Problem] = []
    for item in error.errors():
        loc = tuple(item["loc"])
        if item["type"] == "cross_check":
            for cross_loc, message in item["ctx"]["problems"]:
                full = (*loc, *cross_loc)  # a section's own cross-check names keys relative to it
                problems.append(Problem(source(full), _key_path(full), message))
            continue
        message = item["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            message = message.removeprefix(prefix)
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            message = "unknown key" + (f"; allowed keys here: {', '.join(allowed)}" if allowed else "")
        elif item["type"] == "missing":
            message = "required key is missing"
        elif item["type"] == "model_type" and isinstance(item.get("input"), (str, int, float, bool, list)):
            message = f"expected a table (e.g. [{_key_path(loc)}] or {{ ... }}), got {item['input']!r}"
        elif item["type"] != "value_error" and isinstance(item.get("input"), (str, int, float, bool)):
            message += f" (got {item['input']!r})"
        problems.append(Problem(source(loc), _key_path(loc), message))
    return problems


# ---------------------------------------------------------------------------------------------- summary


def describe(settings: Settings) -> str:
    """A short human summary for ``cxrnode config check``."""
    node = settings.node
    allowed = settings.allowed_calling_aes()
    lines = [
        f"node       {node.ae_title} listening on {node.host}:{node.port}, data in {node.data_dir}",
        "accepts    "
        + (
            "any calling AE (no peer has may_send = true)"
            if allowed is None
            else "calling AEs " + (", ".join(sorted(allowed)) or "none (the peers that may send have no AE title)")
        ),
    ]
    routed = set(settings.routing.default).union(*(r.destinations for r in settings.routing.rules))
    for peer in settings.peers:
        roles = (["may send to us"] if peer.may_send else []) + (["receives results"] if peer.name in routed else [])
        role = ", ".join(roles) or "unused"
        if peer.name in routed:
            role += f": {', '.join(settings.objects_for(peer))}"
        if peer.url:
            auth = (
                ", bearer token" if peer.token or peer.token_env else f", user {peer.username}" if peer.username else ""
            )
            text = f"peer       {peer.name}: {peer.url} (DICOMweb; {role}{auth})"
        else:
            text = f"peer       {peer.name}: {peer.address} ({role}{', TLS' if peer.tls else ''})"
        lines.append(text + (f" - {peer.description}" if peer.description else ""))

    def route(names: list[str]) -> str:
        return ", ".join(names) if names else f"files in {settings.results_dir}"

    lines.append(f"route      default -> {route(settings.routing.default)}")
    for rule in settings.routing.rules:
        lines.append(f"route      from {rule.calling_ae} -> {route(rule.destinations)}")

    def values(items: list[str]) -> str:
        return ", ".join(v or "(empty)" for v in items)

    f = settings.filters
    sop_names = [pydicom.uid.UID(u).keyword or u for u in f.sop_classes]
    lines.append(
        f"filters    modalities {values(f.modalities)}; body parts {values(f.body_parts)}; "
        f"views {values(f.view_positions)}; SOP classes {', '.join(sop_names)}"
    )
    inf = settings.inference
    lines.append(
        f"inference  device {inf.device}, batch {inf.batch_size}, wait {inf.max_wait_ms} ms, "
        f"weights {inf.weights or 'demo (shipped)'}"
    )
    lines.append(f"outputs    {', '.join(settings.outputs.objects)}")
    s = settings.sender
    lines.append(
        f"sender     as {s.calling_ae_title}, {s.max_attempts} attempts, retry {s.retry_base_s:g} s x{s.retry_factor:g} "
        f"up to {s.retry_max_delay_s:g} s, timeout {s.timeout_s:g} s"
    )
    from node.queue import queue_url, redacted

    lines.append(
        f"queue      {redacted(queue_url(settings))}, node id {settings.queue.node_id}, lease {settings.queue.lease_s:g} s"
    )
    return "\n".join(lines)


def with_command_line_peers(
    settings: Settings,
    destinations: Sequence[str],
    allowed_calling_aes: Sequence[str],
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """`serve --destination AE@HOST:PORT` (or a DICOMweb base URL, its credentials from CXRNODE_DESTINATION_*) and
    `--allow-calling-ae AE` on top of the file's peers."""
    if not destinations and not allowed_calling_aes:
        return settings
    environ = os.environ if environ is None else environ
    data = settings.model_dump()
    names: list[str] = []
    taken = {peer["name"] for peer in data["peers"]}
    for index, text in enumerate(destinations, start=1):
        # Named by its AE title, as the admin wrote it ("PACS"), unless that is not a valid or free peer name.
        address = None if is_url(text) else parse_address(text)
        name = address.ae_title if address and _PEER_NAME.match(address.ae_title) else f"destination-{index}"
        if name in taken:
            name = f"{name}-{index}"
        taken.add(name)
        if address is None:
            peer: dict[str, Any] = {"name": name, "url": text, "may_send": False}
            if environ.get(ENV_DESTINATION_TOKEN):
                peer["token_env"] = ENV_DESTINATION_TOKEN
            if environ.get(ENV_DESTINATION_USERNAME):
                peer["username"] = environ[ENV_DESTINATION_USERNAME]
            if environ.get(ENV_DESTINATION_PASSWORD):
                peer["password_env"] = ENV_DESTINATION_PASSWORD
            try:
                data["peers"].append(Peer.model_validate(peer, context={"environ": environ}).model_dump())
            except ValidationError as error:
                raise ConfigError(_problems(error, {}, f"--destination {text}")) from None
        else:
            data["peers"].append(
                {
                    "name": name,
                    "ae_title": address.ae_title,
                    "host": address.host,
                    "port": address.port,
                    "may_send": False,
                }
            )
        names.append(name)
    if names:
        data["routing"]["default"] = names
    for index, ae_title in enumerate(allowed_calling_aes, start=1):
        data["peers"].append(
            {
                "name": f"allowed-{index}",
                "ae_title": ae_title,
                "host": "0.0.0.0",
                "port": 104,
                "may_send": True,
                "description": "--allow-calling-ae",
            }
        )
    return Settings.model_validate(data, context={"environ": environ})
