"""Shared fixtures and hooks. `SHARED` is the read-only material beside the clone (../shared); tests that need it skip
without, except under CI=true, where a skip fails the test (see ALLOWED_SKIPS below)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from postgres import PostgresServer, require_postgres

REPO = Path(__file__).resolve().parents[1]
# Elsewhere than beside the clone: TEST_SHARED_DIR. (Not a CXRNODE_ variable: the node refuses unknown ones, and the
# nodes the tests start inherit this environment.)
SHARED = Path(os.environ.get("TEST_SHARED_DIR") or REPO.parent / "shared")
REAL_CXR = SHARED / "data" / "real-cxr"
LUNGS_REAL = SHARED / "data" / "lungs-real"


def needs(path: Path) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is not here (../shared is beside the clone in CI)")


def free_port() -> int:
    """A TCP port nobody listens on right now (pynetdicom's tests/utils.py::get_port does the same)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- Under CI=true a skip is a failure ---------------------------------------------------------------------------
# A test skips where what it needs is missing: a real peer (DCMTK, dciodvfy, Orthanc, Chromium, openssl), the real
# data beside the clone (../shared), or root (mounting a tmpfs). On a developer's machine that is a convenience; in CI
# it would hide the very checks the suite exists for, so there every skip fails the test, except those listed here.
ALLOWED_SKIPS: dict[str, str] = {
    # "tests/test_file.py::test_name": "why CI may skip it (e.g. it needs hardware CI machines never have)",
}


def strict_skips() -> bool:
    """CI=true (as CI services set it): a skipped test fails unless ALLOWED_SKIPS names it."""
    return os.environ.get("CI", "").strip().lower() == "true"


def allowed_skip(nodeid: str) -> str | None:
    """The reason CI may skip the test `nodeid` (an entry names a test, a parametrized test or a whole file)."""
    for name, reason in ALLOWED_SKIPS.items():
        if nodeid == name or nodeid.startswith((f"{name}::", f"{name}[")):
            return reason
    return None


def skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def fail_skip_in_ci(report: pytest.TestReport) -> None:
    if not (strict_skips() and report.skipped) or hasattr(report, "wasxfail") or allowed_skip(report.nodeid):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under CI=true, where every test must run: {skip_reason(report)}\n"
        "Install what it needs (`make tools` installs the real peers; ../shared holds the real data; some tests need "
        "root), or, if CI may never run it, add it to ALLOWED_SKIPS in tests/conftest.py with the reason."
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    report: pytest.TestReport = yield
    fail_skip_in_ci(report)
    return report


SKIPPED_MODULES: list[pytest.CollectReport] = []  # under CI=true: a failed collect report would stop the session


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """A whole module skipped (pytest.skip(..., allow_module_level=True)) fails the run at its end under CI=true."""
    if strict_skips() and report.skipped and not allowed_skip(report.nodeid):
        SKIPPED_MODULES.append(report)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if SKIPPED_MODULES and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not strict_skips():
        return
    if SKIPPED_MODULES:
        terminalreporter.section("modules skipped under CI=true (a failure)", red=True)
        for report in SKIPPED_MODULES:
            terminalreporter.line(f"{report.nodeid}: {skip_reason(report)}")
    allowed = [r for r in terminalreporter.stats.get("skipped", []) if allowed_skip(r.nodeid)]
    if allowed:
        terminalreporter.section("skips allowed under CI=true")
        for report in allowed:
            terminalreporter.line(f"{report.nodeid}: {skip_reason(report)} (allowed: {allowed_skip(report.nodeid)})")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session (tests/postgres.py); skips when the binaries are missing."""
    require_postgres()
    server = PostgresServer(free_port())
    try:
        yield server
    finally:
        server.close()
