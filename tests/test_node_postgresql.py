"""The whole node on a PostgreSQL queue (`[queue] url`): DCMTK storescu in, storescp out, a SIGKILL after the
acknowledgements, and `cxrnode jobs --queue URL` reading the shared queue from outside."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pydicom

from conftest import REPO, free_port
from dicom_peers import (
    NodeProcess,
    StoreSCP,
    require_dcmtk,
    source_of,
    storescu,
    synthetic_file,
    wait_until,
    write_config,
)
from postgres import PostgresServer


def jobs(url: str) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", "jobs", "--queue", url, "--json", "--limit", "100"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout)["jobs"])


def test_node_on_postgresql_loses_nothing_across_a_sigkill(postgres: PostgresServer, tmp_path: Path) -> None:
    require_dcmtk()
    (tmp_path / "in").mkdir()
    images = [synthetic_file(tmp_path / "in", f"img{i}", seed=900 + i, size=(400, 380)) for i in range(4)]
    url = postgres.new_database()
    pacs_port, port = free_port(), free_port()
    pacs = StoreSCP("PACS", pacs_port, tmp_path / "pacs")
    config = write_config(
        tmp_path / "node.toml",
        port=port,
        data_dir=tmp_path / "data",
        destination_port=pacs_port,
        retry="retry_base_s = 0.5\nretry_factor = 1\nretry_max_delay_s = 0.5\nmax_attempts = 1000",
        extra=f'[queue]\nurl = "{url}"\nlease_s = 5\n',
    )
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    pacs.start()
    try:
        assert storescu(port, images).returncode == 0
        node.kill()  # acknowledged; the jobs are received or held by the dead node
        node.start()
        wait_until(lambda: [j["state"] for j in jobs(url)] == ["done"] * 4, timeout=180, what="every job done")
        assert node.stop() == 0
    finally:
        node.kill()
        pacs.stop()
    delivered: dict[str, set[str]] = defaultdict(set)
    for ds in pacs.received():
        delivered[source_of(ds)].add(str(ds.SOPInstanceUID))
    assert set(delivered) == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in images}
    assert all(len(results) == 2 for results in delivered.values())  # one SEG and one SR UID per image
    assert all(j["error"] is None for j in jobs(url))
    assert not (tmp_path / "data" / "queue.sqlite").exists()  # nothing went to the embedded queue
