"""The settings' schema: one frozen pydantic model per TOML section (``[node]``, ``[[peers]]``, ``[routing]``,
``[filters]``, ``[inference]``, ``[outputs]``, ``[sender]``, ``[tls]``, ``[http]``, ``[queue]``) and :class:`Settings`,
which holds them all and cross-checks them (unique peer names, known destinations, one rule per calling AE).

``config/node.toml`` shows and explains every key; an unknown key is an error. The routing questions the rest of the
node asks (``settings.destinations_for(calling_ae)``) are answered by :mod:`node.config.routing`.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from node.config import routing as policy
from node.config.values import (
    Address,
    AETitle,
    CodeString,
    DICOMwebURL,
    EnvName,
    Fraction,
    Host,
    IPNetworkText,
    LogLevel,
    OutputObject,
    PeerName,
    Port,
    Seconds,
    SOPClassUID,
    _max_pdu,
    _not_empty,
    _optional_ae_title,
    _unique,
    check_ae_title,
)

RESULTS_DIR_NAME = "results"


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
    # Claims of one image for analysis before it is failed ("not tried again"): each time a worker took it and never
    # finished (the process died, e.g. in a native library or out of memory, or lost its lease). A job claimed a
    # second time is analysed alone, so such an image never takes the others of its batch with it.
    max_tries: Annotated[int, Field(ge=1)] = 3
    weights: Path | None = None  # None = the demo weights shipped with the package
    score_threshold: Fraction | None = None  # None = the value recorded with the weights
    present_threshold: Fraction | None = None
    mask_threshold: Fraction | None = None
    # Pixel probability at which a reported opacity's pixel counts towards lung involvement (severity); the reported
    # masks keep mask_threshold. None = the value recorded with the weights (or mask_threshold when none is).
    severity_mask_threshold: Fraction | None = None
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


def _store_url(url: str) -> str:
    from node.store import check_url  # its StoreURLError is a ValueError: reported like any bad value

    return check_url(url.strip())


class StoreSettings(_Section):
    """``[store]``: where received images, results and overlay pictures are kept (``node.store``)."""

    url: Annotated[str, AfterValidator(_store_url)] | None = None  # None = file://<data_dir>


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
    store: StoreSettings = Field(default_factory=StoreSettings)

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
        """The peer with this AE title (:func:`node.config.routing.peer_by_ae`)."""
        return policy.peer_by_ae(self, calling_ae)

    def destinations_for(self, calling_ae: str) -> list[Peer]:
        """The peers that get results of images sent by *calling_ae* (:func:`node.config.routing.destinations_for`)."""
        return policy.destinations_for(self, calling_ae)

    def objects_for(self, peer: Peer | None) -> list[str]:
        """The result objects a destination gets (:func:`node.config.routing.objects_for`)."""
        return policy.objects_for(self, peer)

    def objects_to_write(self, calling_ae: str) -> list[str]:
        """Every object this caller's results need (:func:`node.config.routing.objects_to_write`)."""
        return policy.objects_to_write(self, calling_ae)

    def allowed_calling_aes(self) -> set[str] | None:
        """AE titles that may send to us, or None for any (:func:`node.config.routing.allowed_calling_aes`)."""
        return policy.allowed_calling_aes(self)
