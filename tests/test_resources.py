"""Resources: a really full disk (a small tmpfs the test mounts), the low-water mark, per-peer association limits and
the object-size limit."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from conftest import free_port
from dicom_peers import NodeProcess, require_dcmtk, storescu, synthetic_file, wait_until, write_config

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MB tmpfs, or skip where mounting is not allowed."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path, leave_mb: float) -> Path:
    """A filler file that leaves about `leave_mb` MB free on `disk`."""
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    filler = disk / "filler"
    with filler.open("ab") as handle:
        handle.write(b"\0" * max(0, int(free - leave_mb * 1e6)))
    return filler


def out_of_resources(done: subprocess.CompletedProcess[str]) -> bool:
    """storescu failed because the node answered 0xA700."""
    return done.returncode != 0 and "Refused: OutOfResources" in done.stdout + done.stderr


def test_full_disk_answers_out_of_resources_and_recovers(small_disk: Path, tmp_path: Path) -> None:
    require_dcmtk()
    port = free_port()
    config = write_config(tmp_path / "disk.toml", port=port, data_dir=small_disk / "data")
    config.write_text(config.read_text().replace("[node]\n", "[node]\nmin_free_mb = 0\nmin_free_percent = 0\n"))
    node = NodeProcess(config, port, tmp_path / "disk.log").start()
    try:
        big = synthetic_file(tmp_path, "big", seed=77, size=(2200, 2000), bits=16)  # about 9 MB
        filler = fill(small_disk, leave_mb=4)
        refused = storescu(port, [big])
        assert out_of_resources(refused), refused.stderr
        data = small_disk / "data"
        assert not list((data / "spool").rglob("*.dcm")) and not list((data / "spool" / "tmp").iterdir())
        assert not list(data.rglob(".part-*"))
        filler.unlink()
        accepted = storescu(port, [big])
        assert accepted.returncode == 0, accepted.stderr
        jobs = json.loads(node.cli("jobs", "--json").stdout)["jobs"]
        uid = str(pydicom.dcmread(big, stop_before_pixels=True).SOPInstanceUID)
        assert [j["sop_instance_uid"] for j in jobs] == [uid]  # the refused attempt left no job
        audit = (data / "audit.jsonl").read_text()
        assert '"outcome": "refused", "status": "0xA700"' in audit
    finally:
        node.kill()


def test_low_water_mark_refuses_associations_before_the_disk_is_full(small_disk: Path, tmp_path: Path) -> None:
    require_dcmtk()
    port = free_port()
    config = write_config(tmp_path / "low.toml", port=port, data_dir=small_disk / "data")
    config.write_text(config.read_text().replace("[node]\n", "[node]\nmin_free_mb = 12\nmin_free_percent = 0\n"))
    node = NodeProcess(config, port, tmp_path / "low.log").start()
    try:
        image = synthetic_file(tmp_path, "img", seed=78, size=(300, 280))
        filler = fill(small_disk, leave_mb=8)  # 8 MB free: below the 12 MB mark, far from full
        refused = storescu(port, [image])
        assert refused.returncode != 0 and "Association Rejected" in refused.stderr, refused.stderr
        assert "Transient" in refused.stderr or "transient" in refused.stderr.lower()
        filler.unlink()
        assert storescu(port, [image]).returncode == 0
        audit = (small_disk / "data" / "audit.jsonl").read_text()
        assert "low-water mark" in audit
    finally:
        node.kill()


def test_per_peer_association_limit_and_object_size(tmp_path: Path) -> None:
    require_dcmtk()
    port = free_port()
    config = write_config(tmp_path / "limits.toml", port=port, data_dir=tmp_path / "data")
    config.write_text(
        config.read_text().replace(
            "[node]\n", "[node]\nmax_associations_per_peer = 2\nmax_object_mb = 1\nmin_free_mb = 0\n"
        )
    )
    node = NodeProcess(config, port, tmp_path / "limits.log").start()
    held = []
    try:
        for _ in range(2):
            ae = AE(ae_title="GREEDY")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
            assert assoc.is_established
            held.append(assoc)
        third = AE(ae_title="GREEDY")
        third.add_requested_context(Verification)
        refused = third.associate("127.0.0.1", port, ae_title="CXRNODE")
        assert refused.is_rejected
        other = AE(ae_title="POLITE")
        other.add_requested_context(Verification)
        polite = other.associate("127.0.0.1", port, ae_title="CXRNODE")
        assert polite.is_established  # another peer is still served
        polite.release()
        large = synthetic_file(tmp_path, "large", seed=79, size=(1200, 1100), bits=16)  # about 2.6 MB
        too_big = storescu(port, [large])
        assert out_of_resources(too_big), too_big.stderr
        wait_until(lambda: "above max_object_mb" in node.log.read_text(), timeout=5, what="the log line")
    finally:
        for assoc in held:
            assoc.release()
        node.kill()
