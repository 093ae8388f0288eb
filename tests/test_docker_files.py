"""docker/ cannot be built here (no Docker engine), so these checks keep it honest: the image installs with the same
make target the README's commands use, and its configuration and environment are valid settings."""

from __future__ import annotations

import re
import tomllib

from conftest import REPO
from node.config import load_settings


def test_image_installs_with_the_readme_target() -> None:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    readme = (REPO / "README.md").read_text()
    assert re.search(r"^RUN make PYTHON=\S+ \.venv/\.installed$", dockerfile, re.M)
    assert "STAMP  := $(VENV)/.installed" in makefile and re.search(r"^serve: \$\(STAMP\)$", makefile, re.M)
    assert "make serve" in readme and "make test" in readme
    assert "USER cxrnode" in dockerfile and "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile
    assert 'VOLUME ["/data"]' in dockerfile


def test_container_configuration_is_valid() -> None:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    env_line = next(line for line in dockerfile.splitlines() if line.startswith("ENV CXRNODE_"))
    environment = dict(re.findall(r"(CXRNODE_[A-Z_]+)=(\S+)", env_line))
    environment["CXRNODE_HTTP__TOKEN"] = "change-me"
    settings = load_settings(REPO / "docker" / "node.compose.toml", environ=environment)
    assert str(settings.node.data_dir) == "/data" and settings.node.host == "0.0.0.0"
    assert [p.name for p in settings.destinations_for("ORTHANC")] == ["orthanc"]
    assert settings.http.host == "0.0.0.0" and settings.http.token == "change-me"
    compose = (REPO / "docker" / "compose.yaml").read_text()
    assert '"cxrnode": ["CXRNODE", "cxrnode", 11112]' in compose and "node.compose.toml" in compose


def requirement_name(requirement: str) -> str:
    """The normalised project name of a requirement ("Pillow>=10" -> "pillow", PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]).lower()


def test_installs_are_pinned_and_serve_has_no_test_extras() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "PIP_INSTALL := $(BIN)/pip install --quiet -c constraints.txt" in makefile
    serve_install = makefile.split("$(STAMP): pyproject.toml constraints.txt\n", 1)[1].split("\n\n", 1)[0]
    assert "$(PIP_INSTALL) -e .\n" in serve_install and "[test]" not in serve_install  # what serve and the image get
    assert re.search(r"^test: \$\(TEST_STAMP\) tools$", makefile, re.M)
    assert "$(PIP_INSTALL) -e '.[test]'" in makefile

    with open(REPO / "pyproject.toml", "rb") as file:
        project = tomllib.load(file)["project"]
    pinned = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pinned[requirement_name(name)] = version
    wanted = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    unpinned = sorted({requirement_name(r) for r in wanted} - set(pinned))
    assert not unpinned, f"not in constraints.txt (run `make constraints`): {unpinned}"
    assert "cxrnode" not in pinned
    assert (pinned["torch"], pinned["torchvision"]) == ("2.14.1", "0.29.1")
