"""Crash safety by fault injection: the node kills itself (SIGKILL) at each stage boundary (node.faults), and once it
is killed from outside in the middle of a transfer. After each restart, every image that was acknowledged gets
exactly one SEG and one SR (by UID) at the destination, nothing unacknowledged is half-kept, and the spool and the job
table agree. 20 images per run, 6 runs: 120 images in flight."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path

import pydicom
import pytest

from conftest import free_port
from dicom_peers import NodeProcess, StoreSCP, require_dcmtk, source_of, synthetic_file, wait_until, write_config

pytestmark = pytest.mark.slow

IMAGES_PER_RUN = 20
RESULTS = {"SEG", "SR"}


def acknowledged(storescu_output: str, files: list[Path]) -> set[Path]:
    """Files storescu reports as stored with success ("I: Received Store Response (Success)" after "Sending file")."""
    done, current = set(), None
    for line in storescu_output.splitlines():
        if "Sending file:" in line:
            current = Path(line.split("Sending file:", 1)[1].strip())
        elif "Received Store Response (Success)" in line and current is not None:
            done.add(current)
    return {f for f in files if f in done}


def send(port: int, files: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["storescu", "-v", "--aetitle", "MODALITY", "--call", "CXRNODE", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def check_consistency(data_dir: Path) -> None:
    """The spool and the job table agree: every spooled file has a job, every unfinished job has its file."""
    db = sqlite3.connect(data_dir / "queue.sqlite")
    rows = db.execute("SELECT sop_instance_uid, state, spool_path FROM jobs").fetchall()
    db.close()
    jobs = {uid: (state, path) for uid, state, path in rows}
    spooled = {p.stem for p in (data_dir / "spool").rglob("*.dcm")}
    assert spooled <= set(jobs), f"spooled without a job: {spooled - set(jobs)}"
    for uid, (state, path) in jobs.items():
        if state in ("received", "inferring", "writing", "sending"):
            assert path and (data_dir / path).is_file(), f"job {uid} ({state}) lost its spooled file"
    assert not list((data_dir / "spool" / "tmp").glob("*")) and not list(data_dir.rglob(".part-*"))


@pytest.mark.parametrize("kill", ["received:4", "spooled:7", "inferring:2", "writing:5", "sending:3", "external"])
def test_kill_and_restart_loses_nothing(kill: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    require_dcmtk()
    images = tmp_path_factory.getbasetemp() / "crash-images"
    if not images.exists():
        images.mkdir()
        for i in range(IMAGES_PER_RUN):
            synthetic_file(images, f"c{i:02d}", seed=6000 + i, size=(240, 224), positive=i % 4 == 0)
    files = sorted(images.glob("c*.dcm"))
    pacs = StoreSCP("PACS", free_port(), tmp_path / "pacs").start()
    port = free_port()
    config = write_config(
        tmp_path / "node.toml",
        port=port,
        data_dir=tmp_path / "data",
        destination_port=pacs.port,
        retry="retry_base_s = 0.5\nretry_factor = 1\nretry_max_delay_s = 0.5\nmax_attempts = 1000",
    )
    node = NodeProcess(config, port, tmp_path / "node.log")
    try:
        if kill == "external":
            node.start()
            big = [synthetic_file(tmp_path, f"big{i}", seed=6100 + i, size=(3000, 2800), bits=16) for i in range(2)]
            transfer = subprocess.Popen(  # small PDUs: a large object takes a while to arrive
                [
                    "storescu",
                    "-v",
                    "--max-send-pdu",
                    "4096",
                    "--aetitle",
                    "MODALITY",
                    "--call",
                    "CXRNODE",
                    "127.0.0.1",
                    str(port),
                    *map(str, big + files),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            wait_until(
                lambda: "association accepted from MODALITY" in node.log.read_text(),
                timeout=30,
                interval=0.02,
                what="the transfer to start",
            )
            time.sleep(0.2)
            node.kill()  # in the middle of receiving the first large object
            output = transfer.communicate(timeout=60)[0]
            files = big + files
        else:
            node.start(crash_at=kill)
            output = (lambda done: done.stdout + done.stderr)(send(port, files))
            wait_until(
                lambda: node.process is not None and node.process.poll() is not None,
                timeout=120,
                what=f"the node to kill itself at {kill}",
            )
        first_acknowledged = acknowledged(output, files)
        node.start()  # no crash point this time
        check_consistency(tmp_path / "data")
        unacknowledged = [f for f in files if f not in first_acknowledged]
        if unacknowledged:  # a modality retries only what was not acknowledged: the rest must not be lost
            retried = send(port, unacknowledged)
            assert retried.returncode == 0, retried.stderr
        source_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}

        def delivered() -> dict[str, Counter]:
            """source image -> how many distinct result UIDs of each kind arrived for it"""
            uids: dict[str, set[tuple[str, str]]] = defaultdict(set)
            for ds in pacs.received():
                uids[source_of(ds)].add((str(ds.Modality), str(ds.SOPInstanceUID)))
            return {source: Counter(kind for kind, _ in found) for source, found in uids.items()}

        wait_until(
            lambda: all(delivered().get(uid) == Counter(RESULTS) for uid in source_uids),
            timeout=240,
            what="one SEG and one SR for every image",
        )
        wait_until(
            lambda: all(
                j["state"] == "done" for j in json.loads(node.cli("jobs", "--json", "--limit", "100").stdout)["jobs"]
            ),
            timeout=60,
            what="every job done",
        )
        assert node.stop() == 0
        check_consistency(tmp_path / "data")
    finally:
        node.kill()
        pacs.stop()
    per_source = delivered()
    assert set(per_source) == set(source_uids)  # nothing extra, nothing missing
    assert all(kinds == Counter(RESULTS) for kinds in per_source.values())  # one SEG UID and one SR UID each
    # storescu sends the files in order on one association: what was acknowledged before the kill is a prefix of
    # them, and the kill cut the transfer where it was meant to.
    assert first_acknowledged == set(files[: len(first_acknowledged)]), "acknowledged out of order"
    point, _, nth = kill.partition(":")
    if point in ("received", "spooled"):  # killed at the nth object, before answering it
        assert len(first_acknowledged) == int(nth) - 1, f"{len(first_acknowledged)} acknowledged before the kill"
    elif point == "external":  # killed in the middle of the first large object
        assert len(first_acknowledged) < len(files), "the whole transfer was acknowledged before the kill"
    print(
        f"kill {kill}: {len(first_acknowledged)} of {len(files)} acknowledged before the kill, "
        f"{len(pacs.files())} result files received for {2 * len(files)} distinct results"
    )
