"""Shared fixtures. `SHARED` is the read-only material beside the clone (../shared); tests that need it skip without."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from postgres import PostgresServer, require_postgres

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CXRNODE_SHARED", REPO.parent / "shared"))
REAL_CXR = SHARED / "data" / "real-cxr"
LUNGS_REAL = SHARED / "data" / "lungs-real"


def needs(path: Path) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is not here (../shared is beside the clone in CI)")


def free_port() -> int:
    """A TCP port nobody listens on right now (pynetdicom's tests/utils.py::get_port does the same)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session (tests/postgres.py); skips when the binaries are missing."""
    require_postgres()
    server = PostgresServer(free_port())
    try:
        yield server
    finally:
        server.close()
