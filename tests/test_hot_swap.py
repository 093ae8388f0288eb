"""New weights without downtime (issue 13): a node under steady load gets new weights by SIGHUP; no C-STORE fails,
no job is lost, and the results before and after the swap name their own model versions. A broken weights folder is
refused with one log line while the running model keeps serving."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from pathlib import Path

import pydicom
import pytest

from conftest import free_port
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
from models.weights import DEMO_WEIGHTS

pytestmark = pytest.mark.slow


def _relabel(folder: Path, version: str) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["version"] = version
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def test_weights_swapped_under_load(tmp_path: Path) -> None:
    require_dcmtk()
    weights = tmp_path / "weights"
    shutil.copytree(DEMO_WEIGHTS, weights, ignore=shutil.ignore_patterns("README.md"))
    _relabel(weights, "A")
    pacs = StoreSCP("PACS", free_port(), tmp_path / "pacs").start()
    port = free_port()
    config = write_config(tmp_path / "node.toml", port=port, data_dir=tmp_path / "data", destination_port=pacs.port)
    config.write_text(config.read_text().replace("[inference]\n", f'[inference]\nweights = "{weights}"\n', 1))
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    images = tmp_path / "images"
    images.mkdir()
    files = [synthetic_file(images, f"i{n}", seed=300 + n, size=(300, 280)) for n in range(12)]
    codes: list[int] = []

    def steady_load() -> None:  # one image at a time, as a modality sends them
        for path in files:
            codes.append(storescu(port, [path]).returncode)
            time.sleep(0.3)

    try:
        sender = threading.Thread(target=steady_load)
        sender.start()
        wait_until(lambda: len(codes) >= 3, 120, what="three images sent")
        # a broken folder first (manifest half written): refused, the running model keeps serving
        good = (weights / "manifest.json").read_text()
        (weights / "manifest.json").write_text(good[: len(good) // 2])
        node.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "new weights in" in node.log.read_text(), 60, what="the broken weights refused")
        wait_until(lambda: len(codes) >= 6, 120, what="six images sent")
        (weights / "manifest.json").write_text(good)
        _relabel(weights, "B")
        node.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "models swapped" in node.log.read_text(), 120, what="the new weights swapped in")
        sender.join(300)
        assert codes == [0] * len(files), codes  # no C-STORE failed

        expected = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}

        def all_delivered() -> list[dict]:
            jobs = json.loads(node.cli("jobs", "--json", "--limit", "100").stdout)["jobs"]
            done = [j for j in jobs if j["state"] == "done"]
            return done if {j["sop_instance_uid"] for j in done} == expected else []

        jobs = wait_until(all_delivered, 240, what="every image done")
        versions = {j["sop_instance_uid"]: j["model_version"] for j in jobs}
        assert {v.split(" (")[0] for v in versions.values()} == {"cxrnode-demo A", "cxrnode-demo B"}, versions
        # each result at the PACS names the model its job records, and the SOP Instance UIDs differ between models
        named: dict[str, set[str]] = {}
        for ds in pacs.received():
            if ds.Modality == "SEG":
                algorithm = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
                named.setdefault(source_of(ds), set()).add(str(algorithm.AlgorithmVersion))
        assert set(named) == expected
        for uid, version in versions.items():
            assert named[uid] == {version}, (uid, named[uid], version)
        log = node.log.read_text()
        refused = [line for line in log.splitlines() if "new weights in" in line and "refused" in line]
        assert len(refused) == 1 and "cxrnode-demo A" in refused[0], refused
        assert "Traceback" not in log
    finally:
        node.kill()
        pacs.stop()
