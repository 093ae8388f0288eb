"""docker/ cannot be built here (no Docker engine), so these checks keep it honest: the image installs with the same
make target the README's commands use, and its configuration and environment are valid settings."""

from __future__ import annotations

import re

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
