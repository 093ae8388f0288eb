"""The node's settings: embedded defaults < TOML file < environment (``CXRNODE_*``) < overrides.

Loose input (TOML tables, environment strings, command-line values) is converted once, here, into one
frozen, validated :class:`Settings` object. The entry point creates it and passes it down; nothing reads
configuration from anywhere else.

    settings = load_settings(Path("config/node.toml"), overrides={"node.port": 11113})
    settings.destinations_for("CR_ROOM1")   # -> [Peer(name="pacs", ...), ...]

One module per job (every name below is importable from ``node.config``):

* :mod:`node.config.values` — the value types checked at the edge (AE titles, hosts, SOP classes, URLs) and
  ``AE@HOST:PORT`` addresses (:func:`parse_address`).
* :mod:`node.config.schema` — one model per TOML section of ``config/node.toml``, and :class:`Settings`.
* :mod:`node.config.routing` — where results go and who may send: the questions the rest of the node asks.
* :mod:`node.config.loading` — :func:`load_settings` (file, ``CXRNODE_*`` environment, overrides) and
  :func:`with_command_line_peers`.
* :mod:`node.config.errors` — :class:`ConfigError`: one :class:`Problem` a line, naming source, key and fault.
* :mod:`node.config.describe` — :func:`describe`, the summary ``cxrnode config check`` prints.
"""

from node.config.describe import describe
from node.config.errors import ConfigError, Problem
from node.config.loading import (
    ENV_CONFIG,
    ENV_DESTINATION_PASSWORD,
    ENV_DESTINATION_TOKEN,
    ENV_DESTINATION_USERNAME,
    ENV_NOT_SETTINGS,
    ENV_PREFIX,
    load_settings,
    with_command_line_peers,
)
from node.config.schema import (
    DEFAULT_SOP_CLASSES,
    RESULTS_DIR_NAME,
    Filters,
    HTTPSettings,
    InferenceSettings,
    NodeSettings,
    Outputs,
    Peer,
    QueueSettings,
    Routing,
    RoutingRule,
    SenderSettings,
    Settings,
    StoreSettings,
    TLSSettings,
)
from node.config.values import Address, check_ae_title, is_url, parse_address, storage_sop_class_uid

__all__ = [
    "DEFAULT_SOP_CLASSES",
    "ENV_CONFIG",
    "ENV_DESTINATION_PASSWORD",
    "ENV_DESTINATION_TOKEN",
    "ENV_DESTINATION_USERNAME",
    "ENV_NOT_SETTINGS",
    "ENV_PREFIX",
    "RESULTS_DIR_NAME",
    "Address",
    "ConfigError",
    "Filters",
    "HTTPSettings",
    "InferenceSettings",
    "NodeSettings",
    "Outputs",
    "Peer",
    "Problem",
    "QueueSettings",
    "StoreSettings",
    "Routing",
    "RoutingRule",
    "SenderSettings",
    "Settings",
    "TLSSettings",
    "check_ae_title",
    "describe",
    "is_url",
    "load_settings",
    "parse_address",
    "storage_sop_class_uid",
    "with_command_line_peers",
]
