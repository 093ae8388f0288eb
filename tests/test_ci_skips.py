"""Under CI=true a skipped test fails (tests/conftest.py): run pytest on a small suite with the real conftest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

SUITE = """
import pytest

@pytest.mark.skipif(True, reason="storescu is not installed")
def test_marked_skip():
    pass

def test_skip_in_the_test():
    pytest.skip("dciodvfy is not installed")

def test_allowed():
    pytest.skip("needs hardware CI never has")

@pytest.mark.xfail(reason="a known fault", strict=True)
def test_expected_failure():
    assert False

def test_runs():
    pass
"""


def run_suite(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    conftest = (REPO / "tests" / "conftest.py").read_text()
    conftest += '\nALLOWED_SKIPS["test_suite.py::test_allowed"] = "CI machines have no such hardware"\n'
    (tmp_path / "conftest.py").write_text(conftest)
    (tmp_path / "postgres.py").write_text((REPO / "tests" / "postgres.py").read_text())  # the conftest imports it
    (tmp_path / "test_suite.py").write_text(SUITE)
    (tmp_path / "test_module_skip.py").write_text(
        'import pytest\npytest.skip("no ../shared", allow_module_level=True)\n'
    )
    environment = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci is not None else {})
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-c", os.devnull, "--rootdir", tmp_path],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_skips_pass_outside_ci(tmp_path: Path) -> None:
    run = run_suite(tmp_path, None)
    assert run.returncode == 0, run.stdout
    assert "1 passed, 4 skipped, 1 xfailed" in run.stdout


def test_skips_fail_under_ci(tmp_path: Path) -> None:
    run = run_suite(tmp_path, "true")
    assert run.returncode == 1, run.stdout
    assert "FAILED test_suite.py::test_skip_in_the_test - skipped under CI=true" in run.stdout
    assert "ERROR test_suite.py::test_marked_skip - skipped under CI=true" in run.stdout  # skipif: at set-up
    assert "test_module_skip.py: no ../shared" in run.stdout  # a skipped module fails the run at its end
    assert "test_suite.py::test_allowed: needs hardware CI never has (allowed: CI machines have no" in run.stdout
    assert "XFAIL test_suite.py::test_expected_failure" in run.stdout and "1 passed" in run.stdout


def test_ci_false_is_not_strict(tmp_path: Path) -> None:
    assert run_suite(tmp_path, "false").returncode == 0
