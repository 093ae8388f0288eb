"""The hostile corpus (tests/hostile.py) against a running node, while a well-behaved peer keeps sending: every file
gets its defined outcome, nothing half-written remains, no patient name reaches the log, and the node never dies."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, _config

from dicom_peers import echoscu, require_dcmtk, running_node, synthetic_file, wait_until
from hostile import corpus

pytestmark = pytest.mark.slow


def send_raw(port: int, path: Path, sop_class: str, syntax: str) -> str:
    """C-STORE a file as its bytes are: with STORE_SEND_CHUNKED_DATASET pynetdicom reads only the file meta and
    streams the rest of the file unparsed, as a hostile or broken peer would send it."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
    if not assoc.is_established:
        return "association refused"
    try:
        status = assoc.send_c_store(path)
        return f"0x{int(status.Status):04X}" if "Status" in status else "no response"
    except Exception as error:  # pynetdicom could not even read the file to send it
        return f"not sent: {type(error).__name__}"
    finally:
        if assoc.is_established:
            assoc.release()


def test_hostile_corpus(tmp_path: Path) -> None:
    require_dcmtk()
    cases = corpus()
    good = [synthetic_file(tmp_path, f"good{i}", seed=3000 + i, size=(200, 180)) for i in range(3)]
    with running_node(tmp_path, destination_port=None) as node:
        stop = threading.Event()
        good_results: list[str] = []

        def well_behaved_peer() -> None:
            while not stop.is_set():
                for path in good:
                    good_results.append(
                        send_raw(node.port, path, str(pydicom.dcmread(path).SOPClassUID), "1.2.840.10008.1.2.1")
                    )
                time.sleep(0.05)

        peer = threading.Thread(target=well_behaved_peer)
        peer.start()
        outcomes = {}
        try:
            for index, item in enumerate(cases):
                path = tmp_path / f"hostile-{index:02d}.dcm"
                path.write_bytes(item.data)
                meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta
                outcomes[item.name] = send_raw(node.port, path, item.sop_class_uid, str(meta.TransferSyntaxUID))
        finally:
            stop.set()
            peer.join()
        unfinished = ("received", "inferring", "writing")

        def jobs() -> dict[str, dict]:
            listed = json.loads(node.cli("jobs", "--json", "--limit", "1000").stdout)["jobs"]
            return {j["sop_instance_uid"]: j for j in listed}

        wait_until(
            lambda: not any(j["state"] in unfinished for j in jobs().values()),
            timeout=180,
            what="every acknowledged job analysed",
        )
        table = jobs()
        assert node.process is not None and node.process.poll() is None  # still running
        assert echoscu(node.port).returncode == 0
        log = node.log.read_text(errors="replace")
        data_dir = node.config.parent / "node-data"
    report = []
    for item in cases:
        status = outcomes[item.name]
        job = table.get(item.sop_instance_uid)
        outcome = status if status != "0x0000" else (job["state"] if job else "acknowledged but no job!")
        report.append((item.name, item.expected, outcome, (job or {}).get("error")))
    print(
        "\n".join(
            f"{name:<45} expected {expected:<8} got {outcome:<8} {error or ''}"
            for name, expected, outcome, error in report
        )
    )
    assert [(name, outcome) for name, _, outcome, _ in report] == [(name, exp) for name, exp, _, _ in report]
    for name, expected, _, error in report:
        if expected in ("failed", "skipped"):
            assert error, f"{name}: no reason recorded"
    assert good_results and set(good_results) == {"0x0000"}  # the well-behaved peer was served throughout
    for forbidden in ("Müller", "Jürgen", "山田", "Иванов", "王", "Zoë"):
        assert forbidden not in log
    assert not list((data_dir / "spool" / "tmp").iterdir())
    assert not list(data_dir.rglob(".part-*"))
    refused = {item.sop_instance_uid for item, (_, _, outcome, _) in zip(cases, report) if outcome.startswith("0x")}
    spooled = {p.stem for p in (data_dir / "spool").rglob("*.dcm")}
    assert not refused & spooled  # nothing refused was kept
