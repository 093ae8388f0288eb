"""Loading the settings: embedded defaults < TOML file < environment (``CXRNODE_*``) < overrides.

Loose input (TOML tables, environment strings, command-line values) is converted once, here, into one
frozen, validated :class:`~node.config.schema.Settings` object.

Every problem becomes a :class:`~node.config.errors.ConfigError` whose message names where the value came from (the
file, the environment variable, the override), the key path (``peers[1].port``, ``routing.rules[0].destinations``),
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

import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ValidationError

from node.config.errors import ConfigError, Problem
from node.config.schema import Peer, Settings
from node.config.values import _PEER_NAME, is_url, parse_address

ENV_PREFIX = "CXRNODE_"
ENV_CONFIG = "CXRNODE_CONFIG"
ENV_DESTINATION_TOKEN = "CXRNODE_DESTINATION_TOKEN"  # credentials of a DICOMweb `serve --destination URL`
ENV_DESTINATION_USERNAME = "CXRNODE_DESTINATION_USERNAME"
ENV_DESTINATION_PASSWORD = "CXRNODE_DESTINATION_PASSWORD"
ENV_NOT_SETTINGS = {
    ENV_CONFIG,
    "CXRNODE_CRASH_AT",  # node.faults, for fault-injection tests
    "CXRNODE_WORKER_DIES_ON",  # node.faults: the worker process kills itself before analysing this SOP Instance
    ENV_DESTINATION_TOKEN,
    ENV_DESTINATION_USERNAME,
    ENV_DESTINATION_PASSWORD,
}

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
