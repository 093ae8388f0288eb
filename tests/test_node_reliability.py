"""Nothing acknowledged is lost: SIGKILL and restart, a destination that is down, association policy, C-ECHO."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest

from conftest import REPO, free_port
from dicom_peers import (
    NodeProcess,
    StoreSCP,
    echoscu,
    require_dcmtk,
    running_node,
    source_of,
    storescu,
    synthetic_file,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    require_dcmtk()
    folder = tmp_path_factory.mktemp("small")
    return [
        synthetic_file(
            folder, f"img{i}", seed=700 + i, size=(400, 380), positive=i % 3 == 0, modality="CR" if i % 2 else "DX"
        )
        for i in range(8)
    ]


def jobs(node: NodeProcess) -> dict:
    done = node.cli("jobs", "--json", "--limit", "1000")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def delivered_uids(pacs: StoreSCP) -> dict[str, set[str]]:
    """source SOP Instance UID -> the set of result SOP Instance UIDs received for it (files may repeat)."""
    grouped: dict[str, set[str]] = defaultdict(set)
    for ds in pacs.received():
        grouped[source_of(ds)].add(str(ds.SOPInstanceUID))
    return grouped


def sop_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def test_sigkill_after_acknowledgement_loses_nothing(small_images: list[Path], tmp_path: Path) -> None:
    """Kill the node twice: once right after the images are acknowledged (jobs received or inferring), once while
    results wait for a destination that is down. After the last restart every image has one SEG and one SR."""
    pacs_port = free_port()
    pacs = StoreSCP("PACS", pacs_port, tmp_path / "pacs")
    port = free_port()
    config = write_config(
        tmp_path / "node.toml",
        port=port,
        data_dir=tmp_path / "data",
        destination_port=pacs_port,
        retry="retry_base_s = 0.5\nretry_factor = 1\nretry_max_delay_s = 0.5\nmax_attempts = 1000",
    )
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    first, second = small_images[:4], small_images[4:]
    assert storescu(port, first).returncode == 0
    node.kill()  # kill point 1: acknowledged, inference not finished
    node.start()
    assert storescu(port, second).returncode == 0
    wait_until(
        lambda: all(j["state"] == "sending" for j in jobs(node)["jobs"]) and len(jobs(node)["jobs"]) == 8,
        timeout=120,
        what="all results written and waiting for the destination",
    )
    node.kill()  # kill point 2: results written, destination down
    pacs.start()
    try:
        node.start()
        wait_until(
            lambda: len(delivered_uids(pacs)) == 8 and all(len(v) == 2 for v in delivered_uids(pacs).values()),
            timeout=120,
            what="every result delivered",
        )
        wait_until(lambda: all(j["state"] == "done" for j in jobs(node)["jobs"]), timeout=30, what="jobs done")
        assert node.stop() == 0
    finally:
        node.kill()
        pacs.stop()
    delivered = delivered_uids(pacs)
    assert set(delivered) == sop_uids(small_images)
    assert all(len(results) == 2 for results in delivered.values())  # one SEG UID and one SR UID per image
    all_results = [uid for results in delivered.values() for uid in results]
    assert len(all_results) == len(set(all_results)) == 16
    assert not list((tmp_path / "data" / "spool").rglob("*.dcm"))  # done jobs leave nothing spooled


def test_destination_down_then_dead_then_resend(small_images: list[Path], tmp_path: Path) -> None:
    pacs = StoreSCP("PACS", free_port(), tmp_path / "pacs")
    images = small_images[:3]
    with running_node(tmp_path, destination_port=pacs.port) as node:  # 3 attempts, 0.5 s apart at most 2 s
        assert storescu(node.port, images).returncode == 0
        wait_until(
            lambda: [j["state"] for j in jobs(node)["jobs"]] == ["dead"] * 3,
            timeout=120,
            what="jobs dead after max attempts",
        )
        dead = jobs(node)["jobs"]
        assert all(j["attempts"] == 3 and j["error"].startswith("pacs: association") for j in dead), dead
        pacs.start()
        try:
            resent = node.cli("resend", "--failed")
            assert resent.returncode == 0 and "3 job(s) queued again" in resent.stdout
            wait_until(lambda: len(pacs.files()) == 6, timeout=60, what="results delivered after resend")
            wait_until(lambda: [j["state"] for j in jobs(node)["jobs"]] == ["done"] * 3, timeout=30, what="done")
        finally:
            pacs.stop()
    assert set(delivered_uids(pacs)) == sop_uids(images)


def test_destination_comes_back_before_max_attempts(small_images: list[Path], tmp_path: Path) -> None:
    pacs_port = free_port()
    pacs = StoreSCP("PACS", pacs_port, tmp_path / "pacs")
    port = free_port()
    config = write_config(
        tmp_path / "n.toml",
        port=port,
        data_dir=tmp_path / "d",
        destination_port=pacs_port,
        retry="retry_base_s = 0.5\nretry_factor = 2\nretry_max_delay_s = 1\nmax_attempts = 100",
    )
    node = NodeProcess(config, port, tmp_path / "n.log").start()
    try:
        assert storescu(port, small_images[:2]).returncode == 0
        wait_until(lambda: all(j["attempts"] >= 2 for j in jobs(node)["jobs"]), timeout=120, what="retries")
        pacs.start()
        wait_until(lambda: len(pacs.files()) == 4, timeout=60, what="delivery once the destination is back")
    finally:
        node.kill()
        pacs.stop()


def test_association_policy_and_echo(tmp_path: Path) -> None:
    require_dcmtk()
    peers = '[[peers]]\nname = "modality"\nae_title = "MODALITY"\nhost = "127.0.0.1"\nport = 104\nmay_send = true\n'
    with running_node(tmp_path, destination_port=None, extra="") as plain:
        assert echoscu(plain.port, calling="ANYONE").returncode == 0  # no peers declared: anyone may associate
        wrong_called = echoscu(plain.port, called="NOT_CXRNODE")
        assert wrong_called.returncode != 0 and "Called AE Title Not Recognized" in wrong_called.stderr
        echo = subprocess.run(
            [sys.executable, "-m", "node.cli", "echo", f"CXRNODE@127.0.0.1:{plain.port}"],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert echo.returncode == 0 and "success" in echo.stdout
    port = free_port()
    config = write_config(tmp_path / "policy.toml", port=port, data_dir=tmp_path / "policy-data", destination_port=None)
    config.write_text(config.read_text() + "\n" + peers)
    node = NodeProcess(config, port, tmp_path / "policy.log").start()
    try:
        assert echoscu(port, calling="MODALITY").returncode == 0
        stranger = echoscu(port, calling="STRANGER")
        assert stranger.returncode != 0 and "Calling AE Title Not Recognized" in stranger.stderr
        echo = subprocess.run(
            [sys.executable, "-m", "node.cli", "echo", f"CXRNODE@127.0.0.1:{port}", "--calling-ae", "STRANGER"],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert echo.returncode == 1 and "rejected" in echo.stderr
        wait_until(
            lambda: "association rejected from STRANGER" in (tmp_path / "policy.log").read_text(),
            timeout=10,
            what="the rejection in the node's log",
        )
    finally:
        node.kill()


def test_sighup_reloads_peers_without_dropping_associations(tmp_path: Path) -> None:
    """An association open across the reload keeps working; new associations see the new peer list."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    require_dcmtk()
    port = free_port()
    config = write_config(tmp_path / "reload.toml", port=port, data_dir=tmp_path / "reload-data", destination_port=None)
    node = NodeProcess(config, port, tmp_path / "reload.log").start()
    try:
        ae = AE(ae_title="LONGLIVED")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
        assert assoc.is_established
        assert echoscu(port, calling="STRANGER").returncode == 0  # no peers yet: anyone may call
        config.write_text(
            config.read_text() + '\n[[peers]]\nname = "modality"\nae_title = "MODALITY"\n'
            'host = "127.0.0.1"\nport = 104\nmay_send = true\n'
        )
        assert node.process is not None
        node.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload: 1 peer(s)" in (tmp_path / "reload.log").read_text(), timeout=10, what="reload")
        assert assoc.send_c_echo().Status == 0  # the open association survived the reload
        assoc.release()
        assert echoscu(port, calling="STRANGER").returncode != 0
        assert echoscu(port, calling="MODALITY").returncode == 0
        config.write_text("[node]\nport = 'not a number'\n")  # a broken file is refused, the running config kept
        node.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in (tmp_path / "reload.log").read_text(), timeout=10, what="refusal")
        assert echoscu(port, calling="MODALITY").returncode == 0
        assert node.stop() == 0  # SIGTERM: clean exit
    finally:
        node.kill()


def test_source_address_per_peer(tmp_path: Path) -> None:
    require_dcmtk()
    port = free_port()
    config = write_config(tmp_path / "addr.toml", port=port, data_dir=tmp_path / "addr-data", destination_port=None)
    config.write_text(
        config.read_text() + '\n[[peers]]\nname = "far"\nae_title = "FARAWAY"\nhost = "10.9.9.9"\n'
        'port = 104\naddresses = ["10.9.9.0/24"]\n\n[[peers]]\nname = "near"\nae_title = "NEARBY"\n'
        'host = "127.0.0.1"\nport = 104\naddresses = ["127.0.0.1"]\n'
    )
    node = NodeProcess(config, port, tmp_path / "addr.log").start()
    try:
        assert echoscu(port, calling="NEARBY").returncode == 0
        wrong_place = echoscu(port, calling="FARAWAY")  # the right AE title from the wrong address
        assert wrong_place.returncode != 0 and "Calling AE Title Not Recognized" in wrong_place.stderr
        audit = (tmp_path / "addr-data" / "audit.jsonl").read_text()
        assert "peer far (FARAWAY) may not call from 127.0.0.1" in audit
    finally:
        node.kill()


def test_audit_answers_where_a_study_went(small_images: list[Path], tmp_path: Path) -> None:
    """From the audit log alone: when the image arrived, that delivery failed, the resend, and where it went."""
    pacs = StoreSCP("PACS", free_port(), tmp_path / "pacs")
    image = small_images[0]
    source = pydicom.dcmread(image, stop_before_pixels=True)
    with running_node(tmp_path, destination_port=pacs.port) as node:
        assert storescu(node.port, [image]).returncode == 0
        wait_until(lambda: [j["state"] for j in jobs(node)["jobs"]] == ["dead"], timeout=60, what="dead")
        pacs.start()
        try:
            assert node.cli("resend", "--failed").returncode == 0
            wait_until(lambda: [j["state"] for j in jobs(node)["jobs"]] == ["done"], timeout=60, what="done")
        finally:
            pacs.stop()
        events = [
            json.loads(line) for line in (node.config.parent / "node-data" / "audit.jsonl").read_text().splitlines()
        ]
    about = [e for e in events if source.StudyInstanceUID in json.dumps(e) or source.SOPInstanceUID in json.dumps(e)]
    kinds = [(e["event"], e["outcome"] if "outcome" in e else e.get("action")) for e in about]
    assert ("instance", "received") in kinds
    assert ("delivery", "failed") in kinds and ("job", "dead") in kinds
    assert ("delivery", "delivered") in kinds
    delivered = next(e for e in about if e["event"] == "delivery" and e["outcome"] == "delivered")
    assert (
        delivered["destination"] == "pacs"
        and delivered["ae_title"] == "PACS"
        and set(delivered["results"]) == {"SEG", "SR"}
    )
    assert any(e["event"] == "admin" and e["action"] == "resend" for e in events)
    text = json.dumps(events)
    assert str(source.PatientName) not in text and str(source.PatientID) not in text


def test_sigterm_finishes_the_transfer_in_flight(tmp_path: Path) -> None:
    require_dcmtk()
    port = free_port()
    config = write_config(tmp_path / "term.toml", port=port, data_dir=tmp_path / "term-data", destination_port=None)
    node = NodeProcess(config, port, tmp_path / "term.log").start()
    big = synthetic_file(tmp_path, "big", seed=424, size=(3000, 2800), bits=16)
    transfer = subprocess.Popen(
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
            str(big),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(
            lambda: "association accepted from MODALITY" in node.log.read_text(),
            timeout=30,
            interval=0.02,
            what="the transfer to start",
        )
        assert node.process is not None
        node.process.send_signal(signal.SIGTERM)
        output = transfer.communicate(timeout=120)[0]
        assert node.process.wait(120) == 0
    finally:
        node.kill()
    assert "Received Store Response (Success)" in output  # the object in flight was received and acknowledged
    assert "SIGTERM: shutting down" in node.log.read_text()
    uid = str(pydicom.dcmread(big, stop_before_pixels=True).SOPInstanceUID)
    from node.queue import connect

    job = connect(f"sqlite://{tmp_path / 'term-data' / 'queue.sqlite'}").find(uid)
    assert job is not None  # recorded; the restarted node resumes it


def test_cxrnode_send_a_folder(small_images: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "outbox"
    folder.mkdir()
    for image in small_images[:2]:
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "notes.txt").write_text("not DICOM")
    with running_node(tmp_path, destination_port=None) as node:
        sent = subprocess.run(
            [sys.executable, "-m", "node.cli", "send", f"CXRNODE@127.0.0.1:{node.port}", str(folder)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stderr
        assert "sent 2 of 2" in sent.stdout and sent.stdout.count(": Success") == 2
        assert "notes.txt: skipped, not a DICOM file" in sent.stderr
        assert len(jobs(node)["jobs"]) == 2


def test_a_dead_worker_process_is_restarted(small_images: list[Path], tmp_path: Path) -> None:
    """The models run in their own process: if it dies (out of memory, a native crash), the receiving process keeps
    answering, starts a new worker, and the jobs the old one had in hand are done by the new one."""
    pacs = StoreSCP("PACS", free_port(), tmp_path / "pacs").start()
    try:
        with running_node(tmp_path, destination_port=pacs.port) as node:
            assert node.process is not None
            workers = subprocess.run(  # the spawned worker, not multiprocessing's resource tracker
                ["pgrep", "-P", str(node.process.pid), "-f", "spawn_main"], capture_output=True, text=True
            ).stdout.split()
            assert workers, "no worker process found"
            # Only the worker loads torch: the receiving process stays small and starts fast.
            assert "libtorch" not in Path(f"/proc/{node.process.pid}/maps").read_text()
            assert "libtorch" in Path(f"/proc/{workers[0]}/maps").read_text()
            for pid in workers:
                os.kill(int(pid), signal.SIGKILL)
            assert storescu(node.port, small_images[:3]).returncode == 0  # receiving goes on meanwhile
            wait_until(lambda: "restarting it in 5 s" in node.log.read_text(), timeout=10, what="the restart")
            wait_until(lambda: len(pacs.files()) == 6, timeout=120, what="results from the new worker")
            assert node.process.poll() is None
    finally:
        pacs.stop()
