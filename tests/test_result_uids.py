"""Content-true result UIDs (node/writers/uids.py): the same file with the same settings gives the same UIDs; other
pixels under the same SOP Instance UID, a corrected header, other thresholds or options give other objects."""

from __future__ import annotations

import datetime
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID

from models.finding import Finding
from node.writers import uids
from node.writers.gsps import presentation_state
from node.writers.seg import segmentation
from node.writers.sr import measurement_report
from test_writers import CONTENT_DATETIME, CR, DX_PRESENTATION, make_finding, make_source, write


def test_uids_are_deterministic_distinct_and_valid() -> None:
    source = make_source(CR)
    finding = make_finding((int(source.Rows), int(source.Columns)), 1)
    key = uids.result_key(source, finding, "1.0")
    a = key.instance_uid("seg")
    assert a == uids.result_key(source, finding, "1.0").instance_uid("seg")
    others = {
        key.instance_uid("sr"),
        key.instance_uid("seg", "option"),
        key.series_uid("seg"),
        key.tracking_uid("seg"),
        uids.result_key(source, finding, "1.1").instance_uid("seg"),
        uids.result_key(source, replace(finding, model_version="v2"), "1.0").instance_uid("seg"),
        uids.result_key(source, finding, "1.0", {"option": 1}).instance_uid("seg"),
        uids.device_observer_uid("v1"),
    }
    assert a not in others and len(others) == 8
    for uid in (a, *others):
        assert UID(uid).is_valid and uid.startswith("2.25.") and len(uid) <= 64


def test_uid_inputs_cannot_run_together() -> None:
    source = make_source(CR)
    key = uids.result_key(source, make_finding((int(source.Rows), int(source.Columns)), 1), "1.0")
    assert key.instance_uid("ab", "c") != key.instance_uid("a", "bc")


@pytest.mark.parametrize("empty", ["", "   "])
def test_uid_inputs_may_not_be_empty(empty: str) -> None:
    source = make_source(CR)
    finding = make_finding((int(source.Rows), int(source.Columns)), 1)
    with pytest.raises(ValueError, match='Argument "model_version" may not be empty'):
        uids.result_key(source, replace(finding, model_version=empty), "1.0")
    with pytest.raises(ValueError, match='Argument "kind" may not be empty'):
        uids.result_key(source, finding, "1.0").instance_uid(empty)


def test_a_source_without_pixel_data_gets_no_uids() -> None:
    source = make_source(CR)
    del source.PixelData
    with pytest.raises(ValueError, match="no Pixel Data; result UIDs are derived from a digest of it"):
        segmentation(source, make_finding((int(source.Rows), int(source.Columns)), 1))


def _uids_of(source: Dataset, finding: Finding) -> dict[str, tuple[str, str]]:
    seg = segmentation(source, finding, content_datetime=CONTENT_DATETIME)
    sr = measurement_report(source, finding, seg, content_datetime=CONTENT_DATETIME)
    gsps = presentation_state(source, finding, content_datetime=CONTENT_DATETIME)
    return {kind: (ds.SOPInstanceUID, ds.SeriesInstanceUID) for kind, ds in (("seg", seg), ("sr", sr), ("gsps", gsps))}


def test_same_file_twice_gives_the_same_uids(tmp_path: Path) -> None:
    source = make_source(DX_PRESENTATION)
    path = write(source, tmp_path / "source.dcm")
    finding = make_finding((int(source.Rows), int(source.Columns)), 2)
    first = _uids_of(pydicom.dcmread(path), finding)
    second = _uids_of(pydicom.dcmread(path), finding)
    assert first == second
    # The clock is not part of the key: a re-send at another time keeps the UIDs.
    later = segmentation(pydicom.dcmread(path), finding, content_datetime=datetime.datetime(2030, 1, 1))
    assert later.SOPInstanceUID == first["seg"][0]


def test_other_pixels_under_the_same_sop_instance_uid_give_other_objects() -> None:
    source = make_source(DX_PRESENTATION)
    other = make_source(DX_PRESENTATION)
    pixels = bytearray(other.PixelData)
    pixels[0] ^= 0x01  # one bit of one pixel
    other.PixelData = bytes(pixels)
    assert other.SOPInstanceUID == source.SOPInstanceUID
    finding = make_finding((int(source.Rows), int(source.Columns)), 2)
    before, after = _uids_of(source, finding), _uids_of(other, finding)
    for kind in ("seg", "sr", "gsps"):
        assert before[kind][0] != after[kind][0], kind  # SOP Instance UID
        assert before[kind][1] == after[kind][1], kind  # same study and settings: the same series
    assert len({uid for uid, _ in after.values()}) == 3


def test_other_header_thresholds_or_options_give_other_objects() -> None:
    source = make_source(CR)
    finding = make_finding((int(source.Rows), int(source.Columns)), 1)
    base = _uids_of(source, finding)
    renamed = make_source(CR)
    renamed.PatientID = "P-0002"  # a corrected header: the results copy it
    assert _uids_of(renamed, finding)["seg"][0] != base["seg"][0]
    stricter = replace(finding, thresholds=replace(finding.thresholds, score=0.7))
    changed = _uids_of(source, stricter)
    for kind in ("seg", "sr", "gsps"):
        assert changed[kind][0] != base[kind][0] and changed[kind][1] != base[kind][1], kind
    seg = segmentation(source, finding, content_datetime=CONTENT_DATETIME)
    plain = measurement_report(source, finding, seg)
    noted = measurement_report(source, finding, seg, orientation_note="Orientation assumed.")
    alone = measurement_report(source, finding, None)
    assert len({plain.SOPInstanceUID, noted.SOPInstanceUID, alone.SOPInstanceUID}) == 3
