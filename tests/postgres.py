"""A PostgreSQL server of the tests' own: Debian's `postgresql` binaries, a cluster in a temporary folder, loopback
only, on a free port. PostgreSQL refuses to run as root (the tests run as root in CI), so when root the cluster
belongs to the unprivileged `postgres` user and every server command runs through `runuser -u postgres --`.

`conftest.py::postgres` starts one per test session; `PostgresServer.new_database()` gives each test an empty
database of its own. `stop()` / `start()` are there for tests of a database that goes away and comes back."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

BIN = Path(os.environ.get("CXRNODE_PG_BIN", "/usr/lib/postgresql/15/bin"))
USER = "cxrnode"
PASSWORD = "test-only-password"  # scram-sha-256 over TCP: the tests' URLs carry it, as a site's would


def require_postgres() -> None:
    missing = [tool for tool in ("initdb", "pg_ctl", "postgres") if not (BIN / tool).is_file()]
    if missing:
        pytest.skip(f"PostgreSQL binaries missing in {BIN}: {', '.join(missing)} (make test installs postgresql)")


class PostgresServer:
    """One running cluster: `url()` for its databases, `new_database()` for an empty one."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.folder = Path(tempfile.mkdtemp(prefix="cxrnode-pg-"))  # /tmp: the postgres user can reach it
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self._as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        password_file = self.folder / "password"
        password_file.write_text(PASSWORD + "\n")
        if self._as_postgres:
            account = pwd.getpwnam("postgres")
            os.chown(self.folder, account.pw_uid, account.pw_gid)
            os.chown(password_file, account.pw_uid, account.pw_gid)
        self._run(
            BIN / "initdb",
            "-D",
            self.data,
            "-U",
            USER,
            f"--pwfile={password_file}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--no-instructions",
        )
        password_file.unlink()
        self.start()

    def _run(self, *command: object) -> None:
        result = subprocess.run(
            [*self._as_postgres, *map(str, command)], capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{Path(str(command[0])).name} failed ({result.returncode}): {result.stderr[-2000:]}")

    def start(self) -> None:
        # fsync off: a test server, thrown away at the end, on a machine shared by many test runs. The node's
        # durability on PostgreSQL is PostgreSQL's (synchronous_commit on, the default, is kept).
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c max_connections=300 "
            "-c fsync=off -c full_page_writes=off"
        )
        self._run(BIN / "pg_ctl", "start", "-D", self.data, "-l", self.log, "-w", "-t", "60", "-o", options)

    def stop(self, mode: str = "fast") -> None:
        """`fast` disconnects every client and stops; `immediate` is the closest to a crash."""
        self._run(BIN / "pg_ctl", "stop", "-D", self.data, "-m", mode, "-w", "-t", "60")

    def url(self, database: str = "postgres", *, password: bool = True) -> str:
        secret = f":{PASSWORD}" if password else ""
        return f"postgresql://{USER}{secret}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """An empty database; its URL (with the password)."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        try:
            self.stop("immediate")
        except RuntimeError:
            pass  # already stopped
        shutil.rmtree(self.folder, ignore_errors=True)
