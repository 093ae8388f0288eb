"""The node against real peers: DCMTK storescu sends, DCMTK storescp receives the results, dciodvfy validates them,
highdicom reads them back. The node runs as a subprocess (`python -m node.cli serve`) with the demo weights."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from conftest import free_port
from dicom_peers import (
    StoreSCP,
    SentImage,
    echoscu,
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
from result_checks import check_report, check_segmentation
from models import Predictor
from node.pixels import prepare
from node.writers import pixel_spacing_mm

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
        source = synthetic_file(folder, f"{name}-source", seed=100 + index, modality=modality,
                                photometric=photometric, bits=bits, positive=index % 2 == 0)
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
        with running_node(tmp_path, destination_port=pacs.port) as node:
            sent = storescu(node.port, [i.path for i in images])
            assert sent.returncode == 0, sent.stderr
            in_scope = [i for i in images if i.in_scope]
            wait_until(lambda: len(pacs.files()) >= 2 * len(in_scope), timeout=240, what="all SEG and SR")
            jobs = json.loads(node.cli("jobs", "--json", "--limit", "100").stdout)
    finally:
        pacs.stop()
    received = pacs.received()
    assert len(received) == 2 * len(in_scope)
    grouped = results_by_source(received)
    assert set(grouped) == {i.sop_instance_uid for i in in_scope}  # nothing for the lateral or the CT
    for image in in_scope:
        kinds = Counter(ds.Modality for ds in grouped[image.sop_instance_uid])
        assert kinds == {"SEG": 1, "SR": 1}, image.path.name
    for path in pacs.files():
        assert_valid_dicom(path, allowed_warnings=("99CXRNODE",))
    states = {j["sop_instance_uid"]: j for j in jobs["jobs"]}
    for image in images:
        job = states[image.sop_instance_uid]
        if image.in_scope:
            assert job["state"] == "done", job
        else:
            assert job["state"] == "skipped" and job["error"], job
    assert "View Position LL" in states[images[-2].sop_instance_uid]["error"]
    assert "SOP Class" in states[images[-1].sop_instance_uid]["error"]

    # Read back with highdicom; the numbers must be those the Predictor gives for the same file here.
    predictor = Predictor.load(device="cpu")
    for image in in_scope:
        source = pydicom.dcmread(image.path)
        finding = predictor.predict([prepare(source)])[0]
        objects = {ds.Modality: ds for ds in grouped[image.sop_instance_uid]}
        seg_path = next(p for p in pacs.files() if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                        == objects["SEG"].SOPInstanceUID)
        sr_path = next(p for p in pacs.files() if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                       == objects["SR"].SOPInstanceUID)
        seg = hd.seg.segread(seg_path)
        sr = hd.sr.srread(sr_path)
        check_segmentation(source, finding, seg, predictor.model_version)
        check_report(source, finding, seg, sr, pixel_spacing_mm(source), predictor.model_version)
