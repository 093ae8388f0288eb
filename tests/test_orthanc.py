"""Orthanc round trip: a real Orthanc (Debian's `orthanc`), started here with its own configuration on free ports and
cxrnode declared as one of its modalities. An image uploaded to Orthanc's REST API is sent by Orthanc to cxrnode;
the SEG, SR and GSPS come back into the same study in Orthanc, and are downloaded and validated with dciodvfy."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pydicom
import pytest

from conftest import free_port
from dicom_peers import NodeProcess, require_orthanc, synthetic_file, wait_for_port, wait_until, write_config
from dicom_validation import assert_valid_dicom

pytestmark = pytest.mark.slow


class Orthanc:
    def __init__(self, folder: Path, executable: str) -> None:
        self.folder = folder
        self.executable = executable
        self.http_port, self.dicom_port = free_port(), free_port()
        self.process: subprocess.Popen | None = None

    def start(self, cxrnode_port: int) -> Orthanc:
        configuration = {
            "Name": "cxrnode-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {"cxrnode": ["CXRNODE", "127.0.0.1", cxrnode_port]},
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": True,
            "Plugins": [],
            "HttpServerEnabled": True,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(configuration, indent=2))
        self.process = subprocess.Popen(
            [self.executable, str(path)], stdout=open(self.folder / "orthanc.log", "wb"), stderr=subprocess.STDOUT
        )
        wait_for_port(self.http_port, 60, self.process)
        wait_for_port(self.dicom_port, 60, self.process)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)

    def rest(self, method: str, path: str, body: bytes | None = None) -> object:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method)
        with urllib.request.urlopen(request, timeout=60) as response:
            data = response.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data


def test_orthanc_round_trip(tmp_path: Path) -> None:
    executable = require_orthanc()
    orthanc_folder = tmp_path / "orthanc"
    orthanc_folder.mkdir()
    orthanc = Orthanc(orthanc_folder, executable)
    node_port = free_port()
    config = write_config(
        tmp_path / "node.toml",
        port=node_port,
        data_dir=tmp_path / "data",
        destination_port=orthanc.dicom_port,
        objects=("SEG", "SR", "GSPS"),
    )
    config.write_text(
        config.read_text()
        .replace('ae_title = "PACS"', 'ae_title = "ORTHANC"')
        .replace("may_send = false", "may_send = true")
    )  # Orthanc both sends and receives
    node = NodeProcess(config, node_port, tmp_path / "node.log").start()
    orthanc.start(node_port)
    try:
        image = synthetic_file(tmp_path, "upload", seed=5150, size=(512, 480), positive=True)
        uploaded = orthanc.rest("POST", "/instances", image.read_bytes())
        assert isinstance(uploaded, dict) and uploaded["Status"] == "Success"
        study = uploaded["ParentStudy"]
        sent = orthanc.rest("POST", "/modalities/cxrnode/store", json.dumps([uploaded["ID"]]).encode())
        assert isinstance(sent, dict) and sent.get("FailedInstancesCount", 0) == 0, sent

        def modalities() -> list[str]:
            series = orthanc.rest("GET", f"/studies/{study}/series")
            assert isinstance(series, list)
            return sorted(s["MainDicomTags"].get("Modality", "") for s in series)

        wait_until(lambda: modalities() == ["DX", "PR", "SEG", "SR"], timeout=180, what="results in Orthanc")
        instances = orthanc.rest("GET", f"/studies/{study}/instances")
        assert isinstance(instances, list) and len(instances) == 4
        source = pydicom.dcmread(image, stop_before_pixels=True)
        downloaded = []
        for instance in instances:
            data = orthanc.rest("GET", f"/instances/{instance['ID']}/file")
            assert isinstance(data, bytes)
            path = tmp_path / f"{instance['ID']}.dcm"
            path.write_bytes(data)
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if ds.SOPInstanceUID == source.SOPInstanceUID:
                continue
            assert ds.StudyInstanceUID == source.StudyInstanceUID
            downloaded.append(path)
        for path in downloaded:  # content first, then dciodvfy (which skips where it is missing)
            assert_valid_dicom(path, allowed_warnings=("99CXRNODE",))
    finally:
        node.kill()
        orthanc.stop()
