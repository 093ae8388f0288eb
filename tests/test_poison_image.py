"""A poison image, one that kills the worker process each time it is analysed (a crash in a native library, the
out-of-memory killer; here node.faults' CXRNODE_WORKER_DIES_ON), sent in one association with innocent ones that
are batched with it. The innocent images must all be analysed and delivered; the poison one fails with a message
that says what happened after `[inference] max_tries` tries, instead of killing workers for ever; the node keeps
serving. Before the claim counter, the batch was claimed together again after every restart and nothing of it was
ever delivered."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from conftest import free_port
from dicom_peers import (
    NodeProcess,
    StoreSCP,
    echoscu,
    require_dcmtk,
    source_of,
    storescu,
    synthetic_file,
    wait_until,
    write_config,
)
from node.queue import Job, JobState, connect

pytestmark = pytest.mark.slow

MAX_TRIES = 2  # not the default (3): the key is read, and the test restarts the worker once less
PATIENT_NAME = "Poisonova^Vera^Q"
PATIENT_ID = "PID-POISON-90417"


def radiographs(folder: Path, count: int) -> list[Path]:
    """Small synthetic radiographs with a patient name and ID that must never reach the log."""
    paths = []
    for i in range(count):
        path = synthetic_file(folder, f"image{i}", seed=9100 + i, size=(320, 300), positive=i % 2 == 0)
        ds = pydicom.dcmread(path)
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_a_poison_image_fails_after_max_tries_and_its_batch_is_delivered(tmp_path: Path) -> None:
    require_dcmtk()
    images = radiographs(tmp_path, 6)
    poison, innocent, later = images[1], [images[0], *images[2:5]], images[5]
    poison_uid = uid_of(poison)
    pacs = StoreSCP("PACS", free_port(), tmp_path / "pacs").start()
    port = free_port()
    config = write_config(tmp_path / "node.toml", port=port, data_dir=tmp_path / "data", destination_port=pacs.port)
    text = config.read_text()
    assert "batch_size = 4\nmax_wait_ms = 100\n" in text
    # One batch for all five (the worker waits up to 3 s for a batch of 8 to fill).
    config.write_text(
        text.replace(
            "batch_size = 4\nmax_wait_ms = 100\n", f"batch_size = 8\nmax_wait_ms = 3000\nmax_tries = {MAX_TRIES}\n"
        )
    )
    node = NodeProcess(config, port, tmp_path / "node.log").start(faults={"CXRNODE_WORKER_DIES_ON": poison_uid})
    queue = connect(f"sqlite://{tmp_path / 'data' / 'queue.sqlite'}")

    def poison_job() -> Job | None:
        return queue.find(poison_uid)

    def delivered_sources() -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for result in pacs.received():
            found.setdefault(source_of(result), []).append(str(result.Modality))
        return found

    try:
        sent = storescu(port, [innocent[0], poison, *innocent[1:]])  # one association, all acknowledged
        assert sent.returncode == 0, sent.stdout[-3000:]
        log = node.log.read_text
        wait_until(lambda: "worker process exited" in log(), timeout=120, what="the poison image killing the worker")
        job = wait_until(
            lambda: (j := poison_job()) is not None and j.state is JobState.FAILED and j, timeout=600, what="failed"
        )
        assert job.error is not None and f"did not finish in {MAX_TRIES} tries" in job.error, job.error
        assert f"cxrnode resend {job.id}" in job.error
        # Claimed MAX_TRIES times by a worker that died with it, once more to be failed without running the models.
        assert job.claims == MAX_TRIES + 1
        assert log().count("worker process exited") == MAX_TRIES

        # Every innocent image of the poison's batch: one SEG and one SR at the PACS.
        expected = {uid_of(p) for p in innocent}
        # (A SEG can land before its SR, and a file still being written is not read: wait for both of each.)
        wait_until(
            lambda: all(len(delivered_sources().get(uid, [])) >= 2 for uid in expected),
            timeout=300,
            what="results of the innocent images",
        )
        delivered = delivered_sources()
        assert {uid: sorted(kinds) for uid, kinds in delivered.items()} == {uid: ["SEG", "SR"] for uid in expected}
        # The sender records a job done after the destination answered, a moment after storescp wrote the files.
        for uid in expected:
            wait_until(
                lambda uid=uid: (j := queue.find(uid)) is not None and j.state is JobState.DONE,
                timeout=60,
                what=f"job of {uid} done",
            )

        # `cxrnode jobs` shows the failed job and why.
        listed = node.cli("jobs", "--json", "--state", "failed")
        assert listed.returncode == 0, listed.stderr
        [shown] = json.loads(listed.stdout)["jobs"]
        assert (
            shown["sop_instance_uid"] == poison_uid and shown["error"] == job.error and shown["claims"] == MAX_TRIES + 1
        )

        # The node still serves: C-ECHO, and a new image is analysed and delivered.
        assert echoscu(port).returncode == 0
        assert storescu(port, [later]).returncode == 0
        wait_until(lambda: uid_of(later) in delivered_sources(), timeout=300, what="results of an image sent after")
        assert node.process is not None and node.process.poll() is None

        text = log()
        assert f"job={job.id} sop={poison_uid} failed: analysis did not finish in {MAX_TRIES} tries" in text
        for secret in (PATIENT_ID, "Poisonova", "Vera"):
            assert secret not in text, f"patient data {secret!r} in the node's log"
    finally:
        queue.close()
        node.kill()
        pacs.stop()
