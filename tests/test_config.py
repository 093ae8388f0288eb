"""node.config: defaults, the example file, precedence, and an error naming file + key for every bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node.config import (
    Address,
    ConfigError,
    Settings,
    describe,
    load_settings,
    parse_address,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "node.toml"

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"

PEERS = """
[[peers]]
name = "pacs"
ae_title = "PACS"
host = "pacs.example.org"
port = 104

[[peers]]
name = "archive"
ae_title = "ARCHIVE"
host = "10.0.0.2"
port = 11112
may_send = false
"""


def write(tmp_path: Path, text: str, name: str = "node.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_for(tmp_path: Path, text: str, **kwargs: object) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={}, **kwargs)  # type: ignore[arg-type]
    return caught.value


# ------------------------------------------------------------------------------------------- defaults


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(environ={})
    assert s.node.ae_title == "CXRNODE"
    assert (s.node.host, s.node.port) == ("127.0.0.1", 11112)
    assert s.node.data_dir == tmp_path / "cxrnode-data"  # relative to the current dir, made absolute
    assert s.results_dir == tmp_path / "cxrnode-data" / "results"
    assert not s.node.data_dir.exists()  # loading creates nothing
    assert s.node.max_pdu == 0 and s.node.max_associations == 10
    assert s.peers == [] and s.routing.default == [] and s.routing.rules == []
    assert s.filters.modalities == ["CR", "DX"]
    assert s.filters.sop_classes == [CR, DX_PRESENTATION, DX_PROCESSING, SC]
    assert s.filters.body_parts == ["CHEST", ""]
    assert s.filters.view_positions == ["PA", "AP", ""]
    assert s.inference.device == "auto" and s.inference.batch_size == 4 and s.inference.weights is None
    assert s.inference.score_threshold is None
    assert s.outputs.objects == ["SEG", "SR", "GSPS"]
    assert s.sender.max_attempts == 8 and s.sender.calling_ae_title == "CXRNODE"
    assert s.allowed_calling_aes() is None
    assert s.destinations_for("ANYONE") == []


def test_settings_are_frozen() -> None:
    s = load_settings(environ={})
    with pytest.raises(ValueError):
        s.node.port = 1  # type: ignore[misc]


def test_example_file_loads_and_resolves_as_documented() -> None:
    s = load_settings(EXAMPLE, environ={})
    assert s.node.data_dir == EXAMPLE.parent / "cxrnode-data"  # relative to the file's folder
    assert {p.name for p in s.peers} == {"pacs", "archive", "cr-room1"}
    assert s.allowed_calling_aes() == {"ORTHANC", "CR_ROOM1"}
    assert [p.name for p in s.destinations_for("CR_ROOM1")] == ["pacs", "archive"]
    assert [p.name for p in s.destinations_for("ORTHANC")] == ["pacs"]
    assert s.peer_by_ae("CR_ROOM1 ").name == "cr-room1"  # type: ignore[union-attr]
    assert s.peer_by_ae("NOBODY") is None
    assert s.peer("pacs").address == Address("ORTHANC", "127.0.0.1", 4242)
    text = describe(s)
    assert "CXRNODE" in text and "CR_ROOM1 -> pacs, archive" in text and "ORTHANC@127.0.0.1:4242" in text


def test_example_file_shows_every_key() -> None:
    text = EXAMPLE.read_text()
    for section, model in Settings.model_fields.items():
        assert f"[{section}]" in text or f"[[{section}]]" in text, section
        annotation = model.annotation
        fields = annotation.model_fields if hasattr(annotation, "model_fields") else {}
        for key in fields:
            shown = f"{key} =" in text or f"[[{section}.{key}]]" in text
            assert shown, f"{section}.{key} is not shown in config/node.toml"
    for key in ("name", "ae_title", "host", "port", "may_send", "description", "calling_ae", "destinations"):
        assert f"{key} =" in text


# ----------------------------------------------------------------------------------------- precedence


def test_precedence_defaults_file_environment_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nport = 2000\nae_title = "FROMFILE"\nlog_level = "debug"\n' + PEERS)
    from_file = load_settings(path, environ={})
    assert (from_file.node.port, from_file.node.ae_title, from_file.node.log_level) == (2000, "FROMFILE", "DEBUG")
    assert from_file.node.host == "127.0.0.1"  # default kept
    assert from_file.sender.calling_ae_title == "FROMFILE"  # follows node.ae_title when unset

    env = {
        "CXRNODE_NODE__PORT": "3000",
        "CXRNODE_ROUTING__DEFAULT": "pacs, archive",
        "CXRNODE_INFERENCE__DEVICE": "cpu",
    }
    from_env = load_settings(path, environ=env)
    assert from_env.node.port == 3000 and from_env.node.ae_title == "FROMFILE"
    assert from_env.routing.default == ["pacs", "archive"] and from_env.inference.device == "cpu"

    both = load_settings(path, environ=env, overrides={"node.port": 4000, "node.ae_title": "CLI", "node.host": None})
    assert (both.node.port, both.node.ae_title, both.node.host) == (4000, "CLI", "127.0.0.1")
    assert both.routing.default == ["pacs", "archive"]


def test_environment_names_the_file_and_coerces_values(tmp_path: Path) -> None:
    path = write(tmp_path, PEERS)
    s = load_settings(
        environ={
            "CXRNODE_CONFIG": str(path),
            "CXRNODE_FILTERS__BODY_PARTS": '["CHEST", ""]',
            "CXRNODE_FILTERS__VIEW_POSITIONS": "pa,",
            "CXRNODE_INFERENCE__SCORE_THRESHOLD": "0.25",
            "CXRNODE_INFERENCE__WEIGHTS": "",
            "CXRNODE_NODE__DATA_DIR": "rel",
            "OTHER_VARIABLE": "ignored",
        }
    )
    assert [p.name for p in s.peers] == ["pacs", "archive"]
    assert s.filters.body_parts == ["CHEST", ""] and s.filters.view_positions == ["PA", ""]
    assert s.inference.score_threshold == 0.25 and s.inference.weights is None
    assert s.node.data_dir == Path(os.getcwd()) / "rel"  # not from a file: relative to the current dir


def test_keywords_and_uids_for_sop_classes(tmp_path: Path) -> None:
    path = write(
        tmp_path, '[filters]\nsop_classes = ["DigitalXRayImageStorageForPresentation", "1.2.840.10008.5.1.4.1.1.7"]\n'
    )
    s = load_settings(path, environ={})
    assert s.filters.sop_classes == [DX_PRESENTATION, SC]


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("[node]\nprot = 104\n", "node.prot", ["unknown key", "port"]),
        ("[nod]\nport = 104\n", "nod", ["unknown key", "node"]),
        ("[node]\nport = 70000\n", "node.port", ["less than or equal to 65535", "70000"]),
        ('[node]\nae_title = "ABCDEFGHIJKLMNOPQ"\n', "node.ae_title", ["at most 16"]),
        ('[node]\nae_title = "A\\\\B"\n', "node.ae_title", ["backslash"]),
        ('[node]\nae_title = "   "\n', "node.ae_title", ["empty"]),
        ("[node]\nmax_pdu = 100\n", "node.max_pdu", ["0 (unlimited)"]),
        ('[inference]\ndevice = "gpu"\n', "inference.device", ["gpu"]),
        ("[inference]\nscore_threshold = 1.5\n", "inference.score_threshold", ["less than or equal to 1"]),
        ("[inference]\nbatch_size = 0\n", "inference.batch_size", ["greater than or equal to 1"]),
        ('[outputs]\nobjects = ["SEG", "PDF"]\n', "outputs.objects[1]", ["GSPS"]),
        ('[filters]\nsop_classes = ["CTImageStorag"]\n', "filters.sop_classes[0]", ["ComputedRadiographyImageStorage"]),
        ("[filters]\nmodalities = []\n", "filters.modalities", ["at least one"]),
        ('[routing]\ndefault = ["nowhere"]\n' + PEERS, "routing.default", ["'nowhere'", "archive, pacs"]),
        (
            PEERS + '[[routing.rules]]\ncalling_ae = "CR1"\ndestinations = ["pacs", "typo"]\n',
            "routing.rules[0].destinations",
            ["'typo'", "known peers"],
        ),
        (PEERS + '[[peers]]\nname = "pacs"\nae_title = "OTHER"\nhost = "h"\nport = 1\n', "peers[2].name", ["unique"]),
        (
            PEERS + '[[peers]]\nname = "p2"\nae_title = "PACS"\nhost = "h"\nport = 1\n',
            "peers[2].ae_title",
            ["distinct"],
        ),
        (PEERS.replace("port = 104", "port = 70000"), "peers[0].port", ["65535"]),
        (PEERS.replace('name = "pacs"', 'name = "pa cs"'), "peers[0].name", ["A-Z"]),
        (PEERS.replace("port = 104\n", ""), "peers[0].port", ["required"]),
        (PEERS.replace("port = 104\n", "port = 104\nprot = 1\n"), "peers[0].prot", ["unknown key", "may_send"]),
    ],
)
def test_bad_values_name_file_and_key(tmp_path: Path, text: str, key: str, words: list[str]) -> None:
    error = error_for(tmp_path, text)
    line = next((str(p) for p in error.problems if p.key == key), None)
    assert line is not None, f"no problem for {key}: {error}"
    assert line.startswith(f"{tmp_path / 'node.toml'}: {key}: ")
    for word in words:
        assert word in line, line


def test_all_problems_are_reported(tmp_path: Path) -> None:
    error = error_for(tmp_path, '[node]\nport = 0\nae_title = ""\n[inference]\nbatch_size = 100\n')
    assert {p.key for p in error.problems} == {"node.port", "node.ae_title", "inference.batch_size"}
    assert len(str(error).splitlines()) == 3


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    error = error_for(tmp_path, '[node]\nport = 104\nae_title = "X\n')
    assert str(error).startswith(f"{tmp_path / 'node.toml'}: line 3, column ")
    assert "TOML syntax error" in str(error)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.toml: cannot read"):
        load_settings(tmp_path / "missing.toml", environ={})


def test_unknown_environment_variable_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"CXRNODE_NODE__PROT": "104"})
    assert str(caught.value).startswith("environment CXRNODE_NODE__PROT: unknown key 'prot' in [node]")
    for name in ("CXRNODE_NDOE__PORT", "CXRNODE_PORT", "CXRNODE_PEERS__NAME", "CXRNODE_ROUTING__RULES"):
        with pytest.raises(ConfigError, match=name):
            load_settings(environ={name: "x"})


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, PEERS)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={"CXRNODE_NODE__PORT": "70000", "CXRNODE_ROUTING__DEFAULT": "pacs,nope"})
    lines = str(caught.value).splitlines()
    assert (
        "environment CXRNODE_NODE__PORT: node.port: Input should be less than or equal to 65535 (got '70000')" in lines
    )
    assert any(
        line.startswith("environment CXRNODE_ROUTING__DEFAULT: routing.default: unknown peer 'nope'") for line in lines
    )


def test_bad_override_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"override node\.port: node\.port: .*65535"):
        load_settings(environ={}, overrides={"node.port": 70000})
    with pytest.raises(ConfigError, match="override node.prot: unknown key"):
        load_settings(environ={}, overrides={"node.prot": 1})


# --------------------------------------------------------------------------------------------- routing


def test_destinations_for_with_and_without_a_rule(tmp_path: Path) -> None:
    text = PEERS + '[routing]\ndefault = ["archive"]\n[[routing.rules]]\ncalling_ae = "PACS"\ndestinations = ["pacs"]\n'
    text += '[[routing.rules]]\ncalling_ae = "LOCAL"\ndestinations = []\n'
    s = load_settings(write(tmp_path, text), environ={})
    assert [p.name for p in s.destinations_for("PACS")] == ["pacs"]
    assert [p.name for p in s.destinations_for("OTHER")] == ["archive"]
    assert s.destinations_for("LOCAL") == []  # results as files
    assert s.allowed_calling_aes() == {"PACS"}  # archive has may_send = false


# ------------------------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("PACS@host:104", Address("PACS", "host", 104)),
        ("  PACS @pacs.example.org:11112", Address("PACS", "pacs.example.org", 11112)),
        ("PACS@[::1]:104", Address("PACS", "::1", 104)),
        ("A@B@10.0.0.1:65535", Address("A@B", "10.0.0.1", 65535)),
    ],
)
def test_parse_address(text: str, expected: Address) -> None:
    assert parse_address(text) == expected
    assert parse_address(str(expected)) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("@h:1", "empty"),
        ("A@h", "PORT"),
        ("A@h:0", "1 to 65535"),
        ("A@h:x", "1 to 65535"),
        ("host:104", "'@'"),
        ("ABCDEFGHIJKLMNOPQ@h:1", "at most 16"),
        ("A@::1:104", "brackets"),
        ("A@:104", "host"),
    ],
)
def test_parse_address_rejects(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as caught:
        parse_address(text)
    assert isinstance(caught.value, ConfigError) and "AE@HOST:PORT" in str(caught.value)
