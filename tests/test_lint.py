"""The linter and formatter configured in pyproject.toml run as part of the tests, so their settings check something."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PATHS = ["node", "models", "tests", "bench"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["ruff check", "ruff format"])
def test_ruff(command: list[str]) -> None:
    ruff = Path(sys.executable).parent / "ruff"  # the version the project installs
    done = subprocess.run([ruff, *command, *PATHS], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
