"""The whole node on a PostgreSQL queue (`[queue] url`): DCMTK storescu in, storescp out, a SIGKILL after the
acknowledgements, and `cxrnode jobs --queue URL` reading the shared queue from outside."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
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


def test_node_on_a_postgresql_queue_and_store_keeps_nothing_on_disk(postgres: PostgresServer, tmp_path: Path) -> None:
    """`[store] url` = the queue's database: images, results and overlay pictures are rows of its `objects` table
    (nothing in the data dir's spool/ or results/); SEG and SR reach storescp, read from the database; a SIGKILL
    after the acknowledgements loses nothing; received objects are removed once delivered, results stay."""
    import psycopg

    require_dcmtk()
    (tmp_path / "in").mkdir()
    images = [synthetic_file(tmp_path / "in", f"img{i}", seed=950 + i, size=(400, 380)) for i in range(3)]
    url = postgres.new_database()
    pacs_port, port, http_port = free_port(), free_port(), free_port()
    pacs = StoreSCP("PACS", pacs_port, tmp_path / "pacs")
    config = write_config(
        tmp_path / "node.toml",
        port=port,
        data_dir=tmp_path / "data",
        destination_port=pacs_port,
        retry="retry_base_s = 0.5\nretry_factor = 1\nretry_max_delay_s = 0.5\nmax_attempts = 1000",
        extra=f'[queue]\nurl = "{url}"\nlease_s = 5\n\n[store]\nurl = "{url}"\n',
        http_port=http_port,
    )
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    try:
        assert storescu(port, images).returncode == 0
        node.kill()  # acknowledged, with the destination down: everything is in the database
        node.start()
        pacs.start()
        wait_until(lambda: [j["state"] for j in jobs(url)] == ["done"] * 3, timeout=180, what="every job done")
        first = min(j["id"] for j in jobs(url))
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/thumbnails/{first}.png", timeout=30) as answer:
            assert answer.read().startswith(b"\x89PNG")  # served from the objects table
        assert node.stop() == 0
    finally:
        node.kill()
        pacs.stop()
    delivered: dict[str, set[str]] = defaultdict(set)
    for ds in pacs.received():
        delivered[source_of(ds)].add(str(ds.SOPInstanceUID))
    assert set(delivered) == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in images}
    assert all(len(results) == 2 for results in delivered.values())  # one SEG and one SR UID per image
    with psycopg.connect(url) as db:
        keys = [row[0] for row in db.execute("SELECT key FROM objects ORDER BY key")]
    assert not [k for k in keys if k.startswith("spool/")], keys  # delivered: the received objects are gone
    results = {k.rsplit("-", 1)[-1].removesuffix(".dcm") for k in keys if k.startswith("results/")}
    assert results == {uid for uids in delivered.values() for uid in uids}
    assert len([k for k in keys if k.startswith(("thumbnails/", "overlays/"))]) == 6
    data = tmp_path / "data"
    assert not list(data.rglob("*.dcm")) and not (data / "queue.sqlite").exists()
