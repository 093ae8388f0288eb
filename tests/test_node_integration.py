"""The node against real peers: DCMTK storescu sends, DCMTK storescp receives the results, dciodvfy validates them,
highdicom reads them back. The node runs as a subprocess (`python -m node.cli serve`) with the demo weights."""

from __future__ import annotations

import json
import signal
from collections import Counter, defaultdict
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from conftest import free_port
from dicom_peers import (
    SentImage,
    StoreSCP,
    out_of_scope_files,
    require_dcmtk,
    running_node,
    source_of,
    storescu,
    synthetic_file,
    transcode,
    wait_until,
)
from dicom_validation import assert_valid_dicom
from models import Predictor
from node.pixels import prepare
from result_checks import check_close

pytestmark = pytest.mark.slow

# (name, modality, photometric, bits, transfer syntax)
IN_SCOPE = [
    ("dx-explicit-m2", "DX", "MONOCHROME2", 12, "explicit"),
    ("cr-jpeg-lossless-m1", "CR", "MONOCHROME1", 12, "jpeg-lossless-sv1"),
    ("dx-jpeg-ls-m2", "DX", "MONOCHROME2", 16, "jpeg-ls"),
    ("cr-j2k-m2", "CR", "MONOCHROME2", 12, "j2k-lossless"),
    ("dx-j2k-lossy-m1", "DX", "MONOCHROME1", 12, "j2k"),
    ("cr-rle-m1", "CR", "MONOCHROME1", 16, "rle"),
    ("cr-baseline-8bit", "CR", "MONOCHROME2", 8, "jpeg-baseline"),
    ("dx-deflated", "DX", "MONOCHROME2", 10, "deflated"),
    ("cr-big-endian", "CR", "MONOCHROME1", 12, "big-endian"),
    ("dx-implicit", "DX", "MONOCHROME2", 14, "implicit"),
]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[SentImage]:
    require_dcmtk()
    folder = tmp_path_factory.mktemp("images")
    made = []
    for index, (name, modality, photometric, bits, syntax) in enumerate(IN_SCOPE):
        source = synthetic_file(
            folder,
            f"{name}-source",
            seed=100 + index,
            modality=modality,
            photometric=photometric,
            bits=bits,
            positive=index % 2 == 0,
        )
        path = transcode(source, folder / f"{name}.dcm", syntax)
        source.unlink()
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        made.append(SentImage(path, str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID), True))
    for path in out_of_scope_files(folder, seed=500):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        made.append(SentImage(path, str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID), False))
    assert len({i.transfer_syntax for i in made}) >= 9
    return made


def results_by_source(datasets: list[pydicom.Dataset]) -> dict[str, list[pydicom.Dataset]]:
    """Received result objects grouped by the SOP Instance UID of the image they describe."""
    grouped: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for ds in datasets:
        grouped[source_of(ds)].append(ds)
    return grouped


def test_end_to_end_with_dcmtk(images: list[SentImage], tmp_path: Path) -> None:
    pacs = StoreSCP("PACS", free_port(), tmp_path / "pacs").start()
    try:
        with running_node(tmp_path, destination_port=pacs.port, objects=("SEG", "SR", "GSPS")) as node:
            sent = storescu(node.port, [i.path for i in images])
            assert sent.returncode == 0, sent.stderr
            in_scope = [i for i in images if i.in_scope]
            wait_until(lambda: len(pacs.files()) >= 3 * len(in_scope), timeout=240, what="all SEG, SR and GSPS")
            jobs = json.loads(node.cli("jobs", "--json", "--limit", "100").stdout)
    finally:
        pacs.stop()
    received = pacs.received()
    assert len(received) == 3 * len(in_scope)
    grouped = results_by_source(received)
    assert set(grouped) == {i.sop_instance_uid for i in in_scope}  # nothing for the lateral or the CT
    for image in in_scope:
        kinds = Counter(ds.Modality for ds in grouped[image.sop_instance_uid])
        assert kinds == {"SEG": 1, "SR": 1, "PR": 1}, image.path.name
    states = {j["sop_instance_uid"]: j for j in jobs["jobs"]}
    for image in images:
        job = states[image.sop_instance_uid]
        if image.in_scope:
            assert job["state"] == "done", job
        else:
            assert job["state"] == "skipped" and job["error"], job
    assert "View Position LL" in states[images[-2].sop_instance_uid]["error"]
    assert "SOP Class" in states[images[-1].sop_instance_uid]["error"]

    # Read back with highdicom; the numbers must be those the Predictor gives for the same file here (up to the
    # floating-point differences between a batch of one and the node's batches).
    predictor = Predictor.load(device="cpu")
    for image in in_scope:
        source = pydicom.dcmread(image.path)
        finding = predictor.predict([prepare(source)])[0]
        objects = {ds.Modality: ds for ds in grouped[image.sop_instance_uid]}
        seg_path = next(
            p
            for p in pacs.files()
            if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == objects["SEG"].SOPInstanceUID
        )
        sr_path = next(
            p
            for p in pacs.files()
            if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == objects["SR"].SOPInstanceUID
        )
        seg = hd.seg.segread(seg_path)
        sr = hd.sr.srread(sr_path)
        check_close(source, finding, seg, sr)
    for path in pacs.files():  # last: where dciodvfy is missing (a skip), the content above is still checked
        assert_valid_dicom(path, allowed_warnings=("99CXRNODE",))


def test_output_profiles_per_destination(tmp_path: Path) -> None:
    """One destination gets the default objects, another only what an older viewer shows: GSPS and the SC."""
    require_dcmtk()
    images = [synthetic_file(tmp_path, f"p{i}", seed=900 + i, size=(420, 400), positive=True) for i in range(2)]
    pacs = StoreSCP("PACS", free_port(), tmp_path / "pacs").start()
    viewer = StoreSCP("OLDVIEWER", free_port(), tmp_path / "viewer").start()
    extra = (
        f'[[peers]]\nname = "viewer"\nae_title = "OLDVIEWER"\nhost = "127.0.0.1"\nport = {viewer.port}\n'
        'may_send = false\nobjects = ["GSPS", "SC"]\n'
    )
    try:
        with running_node(tmp_path, destination_port=pacs.port, objects=("SEG", "SR", "GSPS"), extra=extra) as node:
            config = node.config.read_text().replace('default = ["pacs"]', 'default = ["pacs", "viewer"]')
            node.config.write_text(config)
            assert node.process is not None
            node.process.send_signal(signal.SIGHUP)
            wait_until(lambda: "reload:" in node.log.read_text(), timeout=10, what="reload")
            assert storescu(node.port, images).returncode == 0
            wait_until(lambda: len(pacs.files()) == 6 and len(viewer.files()) == 4, timeout=120, what="deliveries")
    finally:
        pacs.stop()
        viewer.stop()
    assert Counter(ds.Modality for ds in pacs.received()) == {"SEG": 2, "SR": 2, "PR": 2}
    assert Counter(ds.SOPClassUID for ds in viewer.received()) == {
        "1.2.840.10008.5.1.4.1.1.11.1": 2,  # Grayscale Softcopy Presentation State
        "1.2.840.10008.5.1.4.1.1.7": 2,  # Secondary Capture
    }
    for ds in viewer.received():
        if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7":
            assert ds.BurnedInAnnotation == "YES" and ds.SamplesPerPixel == 3
    for path in viewer.files():
        assert_valid_dicom(path)
