"""Patient orientation (node.orientation): a mirrored, rotated or flipped copy of a radiograph, with the Patient
Orientation that says so, gives the same patient-side results as the original, on its own pixel grid."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_peers import require_dcmtk, running_node, storescu, wait_until
from models import Finding, Predictor
from models.finding import Opacity, Thresholds
from models.severity import lung_involvement
from models.synth import make_dataset, make_radiograph
from node.cli import main as cxrnode
from node.orientation import (
    ALL_TRANSFORMS,
    IDENTITY,
    DisplayTransform,
    OrientationError,
    box_to_stored,
    display_orientation,
    display_shape,
    finding_to_stored,
    parse_patient_orientation,
    point_to_stored,
    to_display,
    to_stored,
)
from node.pixels import prepare
from node.writers.seg import LEFT_LUNG_SEGMENT, RIGHT_LUNG_SEGMENT

# How a grid with each Patient Orientation is made from the standard display (rows to the patient's left, columns to
# the feet), written out independently of node.orientation: the stored grid from the display grid, and back.
Op = Callable[[np.ndarray], np.ndarray]
STORED_FROM_DISPLAY: dict[tuple[str, str], tuple[Op, Op]] = {
    ("L", "F"): (lambda a: a, lambda a: a),
    ("R", "F"): (lambda a: a[:, ::-1], lambda a: a[:, ::-1]),  # mirrored
    ("L", "H"): (lambda a: a[::-1], lambda a: a[::-1]),  # upside down
    ("R", "H"): (lambda a: np.rot90(a, 2), lambda a: np.rot90(a, 2)),  # turned 180°
    ("F", "L"): (lambda a: a.T, lambda a: a.T),  # transposed
    ("F", "R"): (lambda a: np.rot90(a, 1), lambda a: np.rot90(a, -1)),  # turned 90° counter-clockwise
    ("H", "L"): (lambda a: np.rot90(a, -1), lambda a: np.rot90(a, 1)),  # turned 90° clockwise
    ("H", "R"): (lambda a: np.rot90(a, 2).T, lambda a: np.rot90(a.T, 2)),  # anti-transposed
}


# -- the transforms ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("letters", list(STORED_FROM_DISPLAY), ids="\\".join)
def test_each_orientation_reaches_the_standard_display(letters: tuple[str, str]) -> None:
    display = np.arange(7 * 5).reshape(7, 5)  # not square: a transpose shows
    stored_from_display, display_from_stored = STORED_FROM_DISPLAY[letters]
    stored = stored_from_display(display)
    np.testing.assert_array_equal(display_from_stored(stored), display)  # the table itself is consistent
    transform = parse_patient_orientation(letters)
    assert transform.stored_orientation() == letters
    np.testing.assert_array_equal(to_display(stored, transform), display)
    np.testing.assert_array_equal(to_stored(display, transform), stored)
    assert display_shape(stored.shape, transform) == display.shape
    # a point at the centre of each display pixel lands at the centre of the stored pixel holding the same value
    for row in range(display.shape[0]):
        for column in range(display.shape[1]):
            x, y = point_to_stored(column + 0.5, row + 0.5, display.shape, transform)
            assert stored[int(y), int(x)] == display[row, column]


def test_the_eight_transforms_are_distinct_and_invertible() -> None:
    assert len(set(ALL_TRANSFORMS)) == 8 and ALL_TRANSFORMS[0] == IDENTITY
    assert {t.stored_orientation() for t in ALL_TRANSFORMS} == set(STORED_FROM_DISPLAY)
    image = np.random.default_rng(0).random((6, 9, 3))  # trailing axes (colour) follow the pixels
    for transform in ALL_TRANSFORMS:
        np.testing.assert_array_equal(to_stored(to_display(image, transform), transform), image)
        assert to_display(image, transform).flags.c_contiguous


@pytest.mark.parametrize("transform", ALL_TRANSFORMS, ids=lambda t: "\\".join(t.stored_orientation()))
def test_box_maps_with_its_pixels(transform: DisplayTransform) -> None:
    display = (40, 30)
    mask = np.zeros(display, bool)
    mask[5:12, 20:27] = True  # box (20, 5, 27, 12), exclusive edges
    x0, y0, x1, y1 = box_to_stored((20.0, 5.0, 27.0, 12.0), display, transform)
    rows, columns = np.nonzero(to_stored(mask, transform))
    assert (x0, y0, x1, y1) == (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1)


def test_refined_values_use_their_principal_letter() -> None:
    assert parse_patient_orientation(["RA", "FL"]) == parse_patient_orientation(["R", "F"])
    assert parse_patient_orientation(("L", "F")) == IDENTITY


@pytest.mark.parametrize(
    ("values", "words"),
    [
        (["L"], "1 value"),
        (["L", "F", "A"], "3 value"),
        (["X", "F"], "letters A P R L H F"),
        (["", "F"], "letters A P R L H F"),
        (["A", "F"], "not a frontal"),
        (["L", "P"], "not a frontal"),
        (["L", "R"], "one axis twice"),
        (["F", "F"], "one axis twice"),
    ],
)
def test_unusable_orientation_is_refused_by_name(values: list[str], words: str) -> None:
    with pytest.raises(OrientationError, match=words):
        parse_patient_orientation(values)


def header(orientation: object = None, view: str = "PA") -> Dataset:
    ds = Dataset()
    ds.ViewPosition = view
    if orientation is not None:
        ds.PatientOrientation = orientation
    return ds


def test_no_orientation_assumes_the_standard_display_and_says_so() -> None:
    for ds in (header(), header(""), header([])):
        orientation = display_orientation(ds)
        assert orientation.transform == IDENTITY
        assert orientation.note and "absent" in orientation.note and "assumed" in orientation.note
    lateral = display_orientation(header(["A", "F"], view="PA"))
    assert lateral.transform == IDENTITY and lateral.patient_orientation == "A\\F"
    assert lateral.note and "not a frontal" in lateral.note and "PA" in lateral.note and "assumed" in lateral.note
    mirrored = display_orientation(header(["R", "F"]))
    assert mirrored.transform == DisplayTransform(flip_left_right=True) and mirrored.note is None
    assert display_orientation(header("R\\F")).transform == mirrored.transform  # one string, as some readers give it


def test_finding_to_stored_keeps_the_numbers_and_the_sides() -> None:
    display = (60, 50)
    right = np.zeros(display, bool)
    right[10:50, 5:22] = True  # image left in the display: the patient's right
    left = np.zeros(display, bool)
    left[10:50, 28:45] = True
    opacity_mask = np.zeros(display, bool)
    opacity_mask[20:30, 8:18] = True
    severity, extent = lung_involvement(opacity_mask, right, left)
    finding = Finding(
        display,
        (Opacity((8.0, 20.0, 18.0, 30.0), 0.9, opacity_mask),),
        right,
        left,
        severity,
        extent,
        0.9,
        True,
        Thresholds(0.5, 0.5, 0.5),
        "test",
    )
    for transform in ALL_TRANSFORMS:
        stored = finding_to_stored(finding, transform)
        assert stored.image_shape == to_stored(right, transform).shape
        np.testing.assert_array_equal(stored.right_lung, to_stored(right, transform))
        np.testing.assert_array_equal(stored.left_lung, to_stored(left, transform))
        np.testing.assert_array_equal(stored.opacity_mask, to_stored(opacity_mask, transform))
        assert stored.opacities[0].box == box_to_stored(finding.opacities[0].box, display, transform)
        assert (stored.severity, stored.extent) == lung_involvement(
            stored.opacity_mask, stored.right_lung, stored.left_lung
        )
        assert (stored.severity, stored.extent, stored.scores.tolist()) == (severity, extent, [0.9])


# -- with the demo weights -----------------------------------------------------------------------------------------


def radiograph(seed: int = 901) -> Dataset:
    """A positive synthetic PA radiograph (Patient Orientation L\\F) with its one opacity in the patient's right
    lung: a mix-up of sides shows."""
    rng = np.random.default_rng(seed)
    picture = make_radiograph(rng, 420, 380, positive=True)
    return make_dataset(picture, patient_id=f"orientation-{seed}", modality="DX", rng=rng)


def stored_copy(source: Dataset, letters: tuple[str, str] | None) -> Dataset:
    """`source` with its pixels rearranged as Patient Orientation `letters` says (None: the original pixels, the
    attribute removed), under a new SOP Instance UID."""
    ds = copy.deepcopy(source)
    if letters is None:
        del ds.PatientOrientation
    else:
        pixels = np.ascontiguousarray(STORED_FROM_DISPLAY[letters][0](source.pixel_array))
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.astype(source.pixel_array.dtype).tobytes()
        ds.PatientOrientation = list(letters)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def analyse(predictor: Predictor, source: Dataset) -> Finding:
    """What the worker does: display grid for the models, the Finding back on the stored grid."""
    transform = display_orientation(source).transform
    return finding_to_stored(predictor.predict([to_display(prepare(source), transform)])[0], transform)


def sides(finding: Finding) -> list[set[str]]:
    """For each box, the lungs (by the patient) its mask overlaps, as the SR's laterality says."""
    return [
        {name for name, lung in (("right", finding.right_lung), ("left", finding.left_lung)) if (o.mask & lung).any()}
        for o in finding.opacities
    ]


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.load(device="cpu")


@pytest.fixture(scope="module")
def original(predictor: Predictor) -> tuple[Dataset, Finding]:
    source = radiograph()
    finding = analyse(predictor, source)
    assert finding.opacities and finding.severity.right - finding.severity.left > 10  # the picture it is meant to be
    assert sides(finding) == [{"right"}]
    return source, finding


@pytest.mark.parametrize("letters", [("R", "F"), ("F", "R"), ("H", "L"), ("R", "H")], ids="\\".join)
def test_mirrored_and_rotated_copies_give_the_same_patient_sides(
    predictor: Predictor, original: tuple[Dataset, Finding], letters: tuple[str, str]
) -> None:
    source, expected = original
    copied = stored_copy(source, letters)
    finding = analyse(predictor, copied)
    assert finding.image_shape == (copied.Rows, copied.Columns)
    for name in ("right", "left", "total"):
        assert getattr(finding.severity, name) == pytest.approx(getattr(expected.severity, name), abs=1.0), name
        assert abs(getattr(finding.extent, name) - getattr(expected.extent, name)) <= 1, name
    back = STORED_FROM_DISPLAY[letters][1]
    # the right-lung mask still covers the patient's right lung, on the copy's own grid
    for mine, theirs in ((finding.right_lung, expected.right_lung), (finding.left_lung, expected.left_lung)):
        assert (back(mine) != theirs).sum() <= 0.01 * theirs.sum()
    assert sides(finding) == sides(expected)
    assert len(finding.opacities) == len(expected.opacities)
    for mine, theirs in zip(finding.opacities, expected.opacities, strict=True):
        box = np.zeros(finding.image_shape, bool)
        x0, y0, x1, y1 = (round(v) for v in mine.box)
        box[y0:y1, x0:x1] = True
        rows, columns = np.nonzero(back(box))
        np.testing.assert_allclose((columns.min(), rows.min(), columns.max() + 1, rows.max() + 1), theirs.box, atol=1.0)


def test_without_the_orientation_the_sides_would_be_swapped(
    predictor: Predictor, original: tuple[Dataset, Finding]
) -> None:
    """The check above can fail: the models on the mirrored pixels as stored put the opacity in the left lung."""
    source, expected = original
    naive = predictor.predict([prepare(stored_copy(source, ("R", "F")))])[0]
    assert naive.severity.left == pytest.approx(expected.severity.right, abs=5.0)
    assert naive.severity.right < 1.0
    assert sides(naive) == [{"left"}]


def test_cxrnode_predict_handles_the_orientation(
    original: tuple[Dataset, Finding], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, expected = original
    mirrored = tmp_path / "mirrored.dcm"
    stored_copy(source, ("R", "F")).save_as(mirrored, enforce_file_format=True)
    unoriented = tmp_path / "unoriented.dcm"
    stored_copy(source, None).save_as(unoriented, enforce_file_format=True)
    assert cxrnode(["predict", str(mirrored), str(unoriented), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    by_file = {Path(line["file"]).name: line for line in lines}
    assert by_file["mirrored.dcm"]["orientation_note"] is None
    assert by_file["unoriented.dcm"]["orientation_note"] and "absent" in by_file["unoriented.dcm"]["orientation_note"]
    for line in lines:
        assert line["severity_percent"]["right"] == pytest.approx(expected.severity.right, abs=1.0)
        assert line["severity_percent"]["left"] == pytest.approx(expected.severity.left, abs=1.0)
    (mirrored_box,) = by_file["mirrored.dcm"]["boxes"]
    (box,) = by_file["unoriented.dcm"]["boxes"]
    columns = int(source.Columns)
    assert mirrored_box[0] == pytest.approx(columns - box[2], abs=0.5)  # mirrored: x0 ↔ columns - x1
    assert mirrored_box[1] == pytest.approx(box[1], abs=0.5)


@pytest.mark.slow
def test_node_writes_the_seg_on_the_stored_grid_by_the_patient_sides(
    original: tuple[Dataset, Finding], tmp_path: Path
) -> None:
    """The worker: the SEG of a mirrored and of a rotated copy has its Right lung segment over the patient's right
    lung on the copy's own grid; a copy without orientation is analysed as the standard display, and the log says
    so by UID only."""
    require_dcmtk()
    source, expected = original
    copies = {letters: stored_copy(source, letters) for letters in (("R", "F"), ("F", "R"), None)}
    paths = []
    for number, ds in enumerate(copies.values()):
        paths.append(tmp_path / f"copy{number}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    with running_node(tmp_path, destination_port=None, objects=("SEG",)) as node:
        assert storescu(node.port, paths).returncode == 0

        def done() -> bool:
            jobs = json.loads(node.cli("jobs", "--json").stdout)["jobs"]
            return sum(job["state"] == "done" for job in jobs) == len(paths)

        wait_until(done, timeout=180, what="three SEGs")
        log = node.log.read_text()
    segs = {
        str(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID): seg
        for seg in (hd.seg.segread(path) for path in (tmp_path / "node-data").rglob("seg-*.dcm"))
    }
    assert len(segs) == len(paths)
    for letters, ds in copies.items():
        seg = segs[str(ds.SOPInstanceUID)]
        masks = seg.get_pixels_by_source_instance(
            [ds.SOPInstanceUID], segment_numbers=[RIGHT_LUNG_SEGMENT, LEFT_LUNG_SEGMENT]
        )[0].astype(bool)
        assert masks.shape[:2] == (ds.Rows, ds.Columns)
        back = STORED_FROM_DISPLAY[letters or ("L", "F")][1]
        for index, lung in enumerate((expected.right_lung, expected.left_lung)):
            assert (back(masks[:, :, index]) != lung).sum() <= 0.01 * lung.sum(), (letters, index)
    unoriented = str(copies[None].SOPInstanceUID)
    assert any(unoriented in line and "Patient Orientation absent" in line for line in log.splitlines())
    assert str(source.PatientID) not in log and str(source.PatientName) not in log
    assert pydicom.dcmread(paths[0], stop_before_pixels=True).PatientOrientation == ["R", "F"]
