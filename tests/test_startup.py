"""Start-up fails fast and cleanly, and one data folder serves one node (issue 9).

Each refusal is checked as an admin meets it: `cxrnode serve` in a process group of its own, exit status 2 within
30 s, one line naming the problem and no traceback, nothing left running in its process group, and nothing accepted
on its DICOM port meanwhile. The weights folder in these configurations is empty: a node that loaded its models
before taking its ports would fail on the weights instead, so the message also shows the order of the start-up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

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

pytestmark = pytest.mark.slow


def _start(config: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")}
    return subprocess.Popen(
        [sys.executable, "-m", "node.cli", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),
        cwd=REPO,
        env=env,
        start_new_session=True,  # its own process group: whatever it started can be found afterwards
    )


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            members.append(int(entry.name))
    return members


def _connections_accepted(port: int, until: threading.Event, accepted: list[float]) -> None:
    while not until.is_set():
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                accepted.append(time.monotonic())
        time.sleep(0.05)


def _refused(config: Path, log: Path, dicom_port: int | None) -> str:
    """Run a node that must refuse to start; the one line it printed. `dicom_port`: its DICOM port, watched for
    connections accepted meanwhile (None when something else holds it)."""
    started = time.monotonic()
    accepted: list[float] = []
    done = threading.Event()
    watcher = threading.Thread(target=_connections_accepted, args=(dicom_port, done, accepted), daemon=True)
    if dicom_port is not None:
        watcher.start()
    process = _start(config, log)
    try:
        code = process.wait(30)
    finally:
        done.set()
        if watcher.is_alive():
            watcher.join()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    took = time.monotonic() - started
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert code == 2, text
    assert took < 30
    assert "Traceback" not in text, text
    assert len(lines) == 1, text
    assert lines[0].startswith("cxrnode serve: "), text
    assert _group_members(process.pid) == [], "a process of the refused node is still running"
    assert accepted == [], "the refused node accepted a connection on its DICOM port"
    return lines[0]


def _config(tmp: Path, name: str, *, port: int, http_port: int, data_dir: Path, weights: Path) -> Path:
    config = write_config(tmp / f"{name}.toml", port=port, data_dir=data_dir, http_port=http_port)
    text = config.read_text().replace("[inference]\n", f'[inference]\nweights = "{weights}"\n', 1)
    config.write_text(text)
    return config


@pytest.fixture
def empty_weights(tmp_path: Path) -> Path:
    folder = tmp_path / "no-weights"
    folder.mkdir()
    return folder


def test_http_port_taken(tmp_path: Path, empty_weights: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        http_port = holder.getsockname()[1]
        port = free_port()
        config = _config(tmp_path, "a", port=port, http_port=http_port, data_dir=tmp_path / "a", weights=empty_weights)
        line = _refused(config, tmp_path / "a.log", port)
    assert f"HTTP port 127.0.0.1:{http_port}" in line and "in use" in line, line


def test_dicom_port_taken(tmp_path: Path, empty_weights: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = _config(tmp_path, "a", port=port, http_port=0, data_dir=tmp_path / "a", weights=empty_weights)
        line = _refused(config, tmp_path / "a.log", None)
    assert f"DICOM port 127.0.0.1:{port}" in line and "in use" in line, line


def test_second_node_on_one_data_folder_refuses_and_the_first_delivers_everything(
    tmp_path: Path, empty_weights: Path
) -> None:
    require_dcmtk()
    pacs = StoreSCP("PACS", free_port(), tmp_path / "pacs").start()
    data_dir = tmp_path / "shared-data"
    first_port = free_port()
    first = NodeProcess(
        write_config(tmp_path / "first.toml", port=first_port, data_dir=data_dir, destination_port=pacs.port),
        first_port,
        tmp_path / "first.log",
    ).start()
    try:
        images = tmp_path / "images"
        images.mkdir()
        files = [synthetic_file(images, f"i{n}", seed=900 + n, size=(320, 300)) for n in range(6)]
        sent = storescu(first_port, files[:3])
        assert sent.returncode == 0, sent.stderr
        second_port = free_port()
        second = _config(tmp_path, "second", port=second_port, http_port=0, data_dir=data_dir, weights=empty_weights)
        line = _refused(second, tmp_path / "second.log", second_port)
        assert f"data folder {data_dir} is in use by cxrnode pid {first.process.pid}" in line, line
        sent = storescu(first_port, files[3:])
        assert sent.returncode == 0, sent.stderr
        expected = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}

        def delivered() -> bool:
            kinds: dict[str, set[str]] = {}
            for ds in pacs.received():
                kinds.setdefault(source_of(ds), set()).add(str(ds.Modality))
            return all(kinds.get(uid) == {"SEG", "SR"} for uid in expected)

        wait_until(delivered, 180, what="a SEG and an SR for every image at the first node's destination")
        counts = json.loads(first.cli("jobs", "--json").stdout)["counts"]
        assert counts["done"] + counts["sending"] == len(files) and counts["failed"] == counts["dead"] == 0, counts
    finally:
        first.kill()
        pacs.stop()


def test_a_signal_during_start_up_stops_it(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "a.toml", port=port, data_dir=tmp_path / "a")
    log = tmp_path / "a.log"
    process = _start(config, log)
    # ports bound, queue open: the worker process is loading its models now
    wait_until(lambda: "start-up:" in log.read_text(), 60, what="the start-up under way")
    process.send_signal(signal.SIGTERM)
    code = process.wait(20)
    text = log.read_text()
    assert "Traceback" not in text, text
    assert code == 128 + signal.SIGTERM and "SIGTERM during start-up: stopped" in text, text
    assert "ready:" not in text
    wait_until(lambda: _group_members(process.pid) == [], 10, what="no process of the node left")


def test_a_second_signal_stops_the_shutdown_at_once(tmp_path: Path) -> None:
    """An association left open holds a graceful shutdown for up to dimse_timeout_s (30 s here); a second SIGTERM
    ends it at once."""
    port = free_port()
    node = NodeProcess(write_config(tmp_path / "a.toml", port=port, data_dir=tmp_path / "a"), port, tmp_path / "a.log")
    node.start()
    ae = AE(ae_title="IDLE")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
    assert assoc.is_established
    try:
        node.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "shutting down" in node.log.read_text(), 10, what="the first SIGTERM heard")
        time.sleep(1.0)
        assert node.process.poll() is None, "the open association should hold the graceful shutdown"
        started = time.monotonic()
        node.process.send_signal(signal.SIGTERM)
        node.process.wait(15)
        assert time.monotonic() - started < 15
        assert "stopping now" in node.log.read_text()
    finally:
        assoc.abort()
        node.kill()
