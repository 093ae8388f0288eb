"""The GSPS and SC writers: write, validate with dciodvfy, read back with pydicom, compare with the Finding.

Sources come from tests/test_writers.py (`make_source`, `make_finding`), given windows, VOI LUTs and MONOCHROME1 here;
the two real JPEG-baseline files in shared/data are used as well (their headers for the GSPS, their decoded pixels
for the SC).
"""

from __future__ import annotations

import datetime
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.uid import UID
from scipy import ndimage

from dicom_validation import assert_valid_dicom
from models.finding import Finding
from node.overlay import BOX_COLOUR
from node.pixels import prepare
from node.writers import SourceImageError, cxrnode_version, uids
from node.writers.gsps import (
    BOX_LAYER,
    LABEL_LAYER,
    MAX_OUTLINE_POINTS,
    OUTLINE_LAYER,
    SUMMARY_LAYER,
    outline_polylines,
    presentation_state,
)
from node.writers.sc import burned_in_capture
from node.writers.sr import box_polyline, opacity_tracking_uid
from test_writers import (
    ALLOWED_WARNINGS,
    CR,
    DX_PRESENTATION,
    DX_PROCESSING,
    REAL_CXR_FILES,
    SC,
    make_finding,
    make_source,
)

CONTENT_DATETIME = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456)


# --- Inputs --------------------------------------------------------------------------------------------------------


def with_window(source: Dataset, centers: list[float], widths: list[float], explanations: list[str]) -> Dataset:
    source.WindowCenter = centers
    source.WindowWidth = widths
    source.WindowCenterWidthExplanation = explanations
    return source


def with_voi_lut(source: Dataset) -> Dataset:
    """A 16-bit VOI LUT (a square-root curve over the stored range), as Fuji and Agfa CRs send."""
    entries = 1 << int(source.BitsStored)
    item = Dataset()
    item.LUTDescriptor = [entries, 0, 16]
    item.LUTExplanation = "SQRT"
    item.add_new("LUTData", "OW", (np.sqrt(np.arange(entries) / (entries - 1)) * 65535).astype("<u2").tobytes())
    source.VOILUTSequence = [item]
    return source


@dataclass(frozen=True)
class Case:
    name: str
    source: Dataset
    n_opacities: int
    window: tuple[list[float], list[float]] | None  # expected GSPS (centers, widths); None: the source's VOI LUT
    bilateral: bool = False


CASES = [
    Case("cr-no-window-0", make_source(CR, number=11), 0, ([2048.0], [4096.0])),
    Case(
        "cr-two-windows-1",
        with_window(make_source(CR, number=12), [1500.0, 2500.0], [2000.0, 1000.0], ["LUNG", "BONE"]),
        1,
        ([1500.0], [2000.0]),
    ),  # one window per image in a GSPS (PS3.3 C.11.8): the first
    Case("dx-presentation-window-3", make_source(DX_PRESENTATION, number=13), 3, ([2048.0], [4096.0])),
    Case(
        "dx-processing-mono1-voi-lut-and-window-2",  # the LUT wins, as in models.data.dicom
        with_voi_lut(
            with_window(
                make_source(
                    DX_PROCESSING, photometric="MONOCHROME1", bits_stored=14, frame_of_reference=True, number=14
                ),
                [5000.0],
                [9000.0],
                ["SOFT"],
            )
        ),
        2,
        None,
    ),
    Case("sc-8bit-no-window-1", make_source(SC, bits_stored=8, spacing=False, number=15), 1, ([128.0], [256.0])),
    Case(
        "sc-mono1-window-3-bilateral",
        with_window(make_source(SC, photometric="MONOCHROME1", number=16), [1800.0], [3000.0], ["CHEST"]),
        3,
        ([1800.0], [3000.0]),
        bilateral=True,
    ),
]


def shape_of(source: Dataset) -> tuple[int, int]:
    return int(source.Rows), int(source.Columns)


def write(dataset: Dataset, path: Path) -> Path:
    dataset.save_as(path, enforce_file_format=True)
    return path


def layer_objects(gsps: Dataset, layer: str, kind: str) -> list[Dataset]:
    """The graphic ("GraphicObjectSequence") or text ("TextObjectSequence") objects of one layer."""
    return [
        obj
        for annotation in gsps.GraphicAnnotationSequence
        if annotation.GraphicLayer == layer
        for obj in annotation.get(kind, [])
    ]


def boundary_pixel_centres(mask: np.ndarray) -> np.ndarray:
    """(column, row) centres of the mask pixels with a 4-neighbour outside it."""
    boundary = mask & ~ndimage.binary_erosion(mask, border_value=0)
    rows, columns = np.nonzero(boundary)
    return np.stack([columns + 0.5, rows + 0.5], axis=1)


def assert_on_boundary(points: np.ndarray, mask: np.ndarray) -> None:
    centres = boundary_pixel_centres(mask)
    distances = np.hypot(*(points[:, None, :] - centres[None, :, :]).transpose(2, 0, 1)).min(axis=1)
    assert distances.max() <= 1.0, points[distances > 1.0]


def rasterize(polyline: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The pixels whose centres the closed polyline encloses."""
    picture = Image.new("1", (shape[1] * 4, shape[0] * 4))
    ImageDraw.Draw(picture).polygon([(x * 4, y * 4) for x, y in polyline], fill=1)
    return np.asarray(picture)[2::4, 2::4]


# --- GSPS ----------------------------------------------------------------------------------------------------------


def check_presentation_state(
    source: Dataset, finding: Finding, path: Path, window: tuple[list[float], list[float]] | None
) -> Dataset:
    gsps = pydicom.dcmread(path)
    assert gsps.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1" and gsps.Modality == "PR"
    key = uids.result_key(source, finding, cxrnode_version())
    assert gsps.SOPInstanceUID.startswith("2.25.") and UID(gsps.SOPInstanceUID).is_valid
    assert gsps.SeriesInstanceUID == key.series_uid("gsps")
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "AccessionNumber",
    ):
        assert gsps.get(keyword) == source.get(keyword), keyword
    assert gsps.PresentationCreationDate == "20240506" and gsps.PresentationCreationTime.startswith("070809")

    (series,) = gsps.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    (image,) = series.ReferencedImageSequence
    assert (image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID) == (source.SOPClassUID, source.SOPInstanceUID)
    for annotation in gsps.GraphicAnnotationSequence:
        assert [item.ReferencedSOPInstanceUID for item in annotation.ReferencedImageSequence] == [source.SOPInstanceUID]
    assert [a.GraphicLayer for a in gsps.GraphicAnnotationSequence] == [
        layer.GraphicLayer for layer in gsps.GraphicLayerSequence
    ]

    # One closed 5-point POLYLINE per box, exactly the box (Graphic Data is FL), tracked like the SR's group.
    boxes = layer_objects(gsps, BOX_LAYER, "GraphicObjectSequence")
    assert len(boxes) == len(finding.opacities)
    for number, (box, opacity) in enumerate(zip(boxes, finding.opacities, strict=True), start=1):
        assert box.GraphicType == "POLYLINE" and box.GraphicAnnotationUnits == "PIXEL"
        assert box.NumberOfGraphicPoints == 5 and box.GraphicFilled == "N"
        np.testing.assert_array_equal(
            np.reshape(box.GraphicData, (-1, 2)), box_polyline(opacity.box).astype(np.float32)
        )
        assert box.TrackingID == f"Lung opacity {number}"
        assert box.TrackingUID == opacity_tracking_uid(key, number)

    # One closed POLYLINE per 8-connected component of the opacity mask, every vertex on its edge.
    mask = finding.opacity_mask
    outlines = layer_objects(gsps, OUTLINE_LAYER, "GraphicObjectSequence")
    _, components = ndimage.label(mask, structure=np.ones((3, 3)))
    assert len(outlines) == components
    for outline in outlines:
        points = np.reshape(outline.GraphicData, (-1, 2)).astype(np.float64)
        assert outline.GraphicType == "POLYLINE" and outline.GraphicAnnotationUnits == "PIXEL"
        assert 4 <= len(points) <= MAX_OUTLINE_POINTS and np.array_equal(points[0], points[-1])
        assert_on_boundary(points, mask)

    # A label per box, with its score; the summary with probability, severity and extent.
    labels = layer_objects(gsps, LABEL_LAYER, "TextObjectSequence")
    assert [label.UnformattedTextValue for label in labels] == [
        f"Lung opacity {opacity.score:.2f}" for opacity in finding.opacities
    ]
    for label, opacity in zip(labels, finding.opacities, strict=True):
        assert list(label.AnchorPoint) == [opacity.box[0], opacity.box[1]]
        left, top = label.BoundingBoxTopLeftHandCorner
        right, bottom = label.BoundingBoxBottomRightHandCorner
        assert 0 <= left < right <= source.Columns and 0 <= top < bottom <= source.Rows
    summary = layer_objects(gsps, SUMMARY_LAYER, "TextObjectSequence")[0].UnformattedTextValue
    severity, extent = finding.severity, finding.extent
    for number in (
        f"p={finding.opacity_probability:.2f}",
        f"severity {severity.total:.1f}%",
        f"R {severity.right:.1f}%",
        f"L {severity.left:.1f}%",
        f"extent {extent.total}/8",
    ):
        assert number in summary, (number, summary)
    assert ("present" if finding.opacity_present else "absent") in summary

    # The source's display: VOI window or LUT, polarity.
    (voi,) = gsps.SoftcopyVOILUTSequence
    if window is None:
        (lut,) = voi.VOILUTSequence
        (source_lut,) = source.VOILUTSequence
        assert list(lut.LUTDescriptor) == list(source_lut.LUTDescriptor)
        assert bytes(lut.LUTData) == bytes(source_lut.LUTData)
        assert "WindowCenter" not in voi
    else:
        centers, widths = window
        assert [float(v) for v in np.atleast_1d(voi.WindowCenter)] == centers
        assert [float(v) for v in np.atleast_1d(voi.WindowWidth)] == widths
    expected_shape = "INVERSE" if source.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY"
    assert gsps.PresentationLUTShape == expected_shape
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        assert gsps.get(keyword) == source.get(keyword)
    assert_valid_dicom(
        path, allowed_warnings=ALLOWED_WARNINGS
    )  # last: where dciodvfy is missing, content still checked
    return gsps


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_presentation_state(case: Case, tmp_path: Path) -> None:
    finding = make_finding(shape_of(case.source), case.n_opacities, bilateral=case.bilateral)
    gsps = presentation_state(case.source, finding, content_datetime=CONTENT_DATETIME)
    check_presentation_state(case.source, finding, write(gsps, tmp_path / "gsps.dcm"), case.window)


@pytest.mark.skipif(shutil.which("dcmp2pgm") is None or shutil.which("dcmj2pnm") is None, reason="DCMTK is missing")
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_dcmtk_shows_the_image_through_the_gsps_as_without_it(case: Case, tmp_path: Path) -> None:
    """DCMTK's presentation-state renderer (dcmp2pgm), given the GSPS, draws the source as DCMTK's image renderer
    (dcmj2pnm) draws it with its first VOI LUT or window: same window, same polarity (MONOCHROME1 included)."""
    finding = make_finding(shape_of(case.source), case.n_opacities, bilateral=case.bilateral)
    source_path = write(case.source, tmp_path / "source.dcm")
    gsps_path = write(presentation_state(case.source, finding), tmp_path / "gsps.dcm")
    if "VOILUTSequence" in case.source:
        voi = ["+Wl", "1"]
    elif "WindowCenter" in case.source:
        voi = ["+Wi", "1"]
    else:
        voi = []  # DCMTK's default without VOI: the full range, as the GSPS says
    for command in (
        ["dcmp2pgm", "-p", gsps_path, source_path, tmp_path / "through-gsps.pgm"],
        ["dcmj2pnm", *voi, source_path, tmp_path / "image.pgm"],
    ):
        completed = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=60, check=False)
        assert completed.returncode == 0, completed.stdout + completed.stderr
    through_gsps = np.asarray(Image.open(tmp_path / "through-gsps.pgm"), dtype=np.int16)
    image = np.asarray(Image.open(tmp_path / "image.pgm"), dtype=np.int16)
    assert through_gsps.shape == image.shape == shape_of(case.source)
    assert np.abs(through_gsps - image).max() <= 1  # rounding
    assert through_gsps.max() - through_gsps.min() > 100  # a picture, not a flat field


@pytest.mark.skipif(not REAL_CXR_FILES, reason="shared/data/real-cxr/dicom is not available")
@pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name")
@pytest.mark.parametrize("path", REAL_CXR_FILES, ids=[p.name for p in REAL_CXR_FILES])
def test_presentation_state_of_a_real_source(path: Path, tmp_path: Path) -> None:
    source = pydicom.dcmread(path)  # with its (JPEG) pixel data: hashed for the UIDs, never decoded
    finding = make_finding(shape_of(source), 3)
    gsps = presentation_state(source, finding, content_datetime=CONTENT_DATETIME)
    # 8-bit, no window: the full range 0-255.
    check_presentation_state(source, finding, write(gsps, tmp_path / "gsps.dcm"), ([128.0], [256.0]))


def test_presentation_state_of_a_sparse_source(tmp_path: Path) -> None:
    """Only Type 1 attributes: no Body Part Examined (CHEST is assumed), no window, no Patient's Name."""
    full = make_source(CR, number=17)
    source = Dataset()
    for keyword in (
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PixelData",
    ):
        setattr(source, keyword, full[keyword].value)
    finding = make_finding(shape_of(source), 1)
    path = write(presentation_state(source, finding, content_datetime=CONTENT_DATETIME), tmp_path / "gsps.dcm")
    assert pydicom.dcmread(path).BodyPartExamined == "CHEST"
    assert_valid_dicom(path, allowed_warnings=("needed to build DICOMDIR",))


def test_given_window_and_aspect_ratio(tmp_path: Path) -> None:
    source = make_source(DX_PRESENTATION, number=18)  # Imager Pixel Spacing 0.2 x 0.25: rows 4 : columns 5
    finding = make_finding(shape_of(source), 1)
    gsps = presentation_state(source, finding, window=(900.0, 1200.0), content_datetime=CONTENT_DATETIME)
    path = write(gsps, tmp_path / "gsps.dcm")
    written = pydicom.dcmread(path)
    assert (
        float(written.SoftcopyVOILUTSequence[0].WindowCenter),
        float(written.SoftcopyVOILUTSequence[0].WindowWidth),
    ) == (900.0, 1200.0)
    assert list(written.DisplayedAreaSelectionSequence[0].PresentationPixelAspectRatio) == [4, 5]
    assert_valid_dicom(path, allowed_warnings=ALLOWED_WARNINGS)
    with pytest.raises(ValueError, match='"window"'):
        presentation_state(source, finding, window=(900.0, 0.0))


def test_same_input_gives_identical_gsps_and_sc(tmp_path: Path) -> None:
    source = make_source(CR, number=19)
    finding = make_finding(shape_of(source), 2)
    pixels = np.random.default_rng(0).random(shape_of(source)).astype(np.float32)
    for name in ("first", "second"):
        write(presentation_state(source, finding, content_datetime=CONTENT_DATETIME), tmp_path / f"{name}.pr.dcm")
        write(
            burned_in_capture(source, pixels, finding, content_datetime=CONTENT_DATETIME), tmp_path / f"{name}.sc.dcm"
        )
    for suffix in (".pr.dcm", ".sc.dcm"):
        assert (tmp_path / f"first{suffix}").read_bytes() == (tmp_path / f"second{suffix}").read_bytes(), suffix
    # And without a fixed clock, still the same UIDs.
    first, second = presentation_state(source, finding), presentation_state(source, finding)
    assert first.SOPInstanceUID == second.SOPInstanceUID and first.SeriesInstanceUID == second.SeriesInstanceUID


def test_unsupported_source_and_bad_box_are_refused() -> None:
    source = make_source(CR, number=20)
    finding = make_finding(shape_of(source), 1)
    outside = replace(finding.opacities[0], box=(10.0, 10.0, 500.0, 20.0))
    with pytest.raises(ValueError, match="box"):
        presentation_state(source, replace(finding, opacities=(outside,)))
    source.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT
    with pytest.raises(SourceImageError):
        presentation_state(source, finding)


# --- Outlines ------------------------------------------------------------------------------------------------------


def test_outline_of_one_pixel_and_of_diagonal_neighbours() -> None:
    mask = np.zeros((6, 6), dtype=bool)
    mask[1, 1] = True
    (square,) = outline_polylines(mask)
    np.testing.assert_array_equal(square, [[1, 1], [2, 1], [2, 2], [1, 2], [1, 1]])
    mask[2, 2] = True  # touches (1, 1) at a corner: one 8-connected component, one outline around both
    (pair,) = outline_polylines(mask)
    assert {tuple(p) for p in pair} == {(1, 1), (2, 1), (2, 2), (3, 2), (3, 3), (2, 3), (1, 2)}


def test_outline_fills_holes_and_separates_components() -> None:
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:15, 5:15] = True
    mask[8:11, 8:11] = False  # a hole: not outlined
    mask[20:30, 22:35] = True
    first, second = outline_polylines(mask)
    np.testing.assert_array_equal(first, [[5, 5], [15, 5], [15, 15], [5, 15], [5, 5]])
    np.testing.assert_array_equal(second, [[22, 20], [35, 20], [35, 30], [22, 30], [22, 20]])


def test_outline_of_a_ragged_blob_is_short_and_on_its_edge() -> None:
    rng = np.random.default_rng(1)
    shape = (300, 260)
    blob = ndimage.binary_opening(ndimage.gaussian_filter(rng.random(shape), 4) > 0.5, iterations=2)
    labels, count = ndimage.label(blob, structure=np.ones((3, 3)))
    polylines = outline_polylines(blob)
    assert len(polylines) == count > 3
    for number, polyline in enumerate(polylines, start=1):
        component = ndimage.binary_fill_holes(labels == number)
        assert len(polyline) <= MAX_OUTLINE_POINTS and np.array_equal(polyline[0], polyline[-1])
        assert_on_boundary(polyline, component)
        if component.sum() > 400:  # the simplified outline still encloses the component
            enclosed = rasterize(polyline, shape)
            assert (enclosed & component).sum() / (enclosed | component).sum() > 0.9
    tight = outline_polylines(blob, max_points=12)
    assert all(3 < len(polyline) <= 12 for polyline in tight)


# --- SC ------------------------------------------------------------------------------------------------------------


def box_colour_at(picture: np.ndarray, column: float, row: float) -> bool:
    """Whether the box colour is within one pixel of (column, row) of the picture."""
    c, r = int(round(column)), int(round(row))
    window = picture[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2].reshape(-1, 3)
    return bool((window == BOX_COLOUR).all(axis=1).any())


def check_capture(source: Dataset, finding: Finding, path: Path, scale: float) -> np.ndarray:
    sc = pydicom.dcmread(path)
    assert sc.SOPClassUID == SC
    assert sc.SOPInstanceUID.startswith("2.25.") and UID(sc.SOPInstanceUID).is_valid
    assert sc.SeriesInstanceUID == uids.result_key(source, finding, cxrnode_version()).series_uid("sc")
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert (sc.PatientID, sc.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
    assert sc.BurnedInAnnotation == "YES" and sc.ConversionType == "WSD"
    assert "not for diagnosis" in sc.SeriesDescription
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3 and sc.BitsAllocated == 8
    (reference,) = sc.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert (sc.Rows, sc.Columns) == tuple(max(1, round(side * scale)) for side in shape_of(source))
    picture = sc.pixel_array
    for opacity in finding.opacities:
        x0, y0, x1, y1 = (v * scale for v in opacity.box)
        for column, row in ((x0, (y0 + y1) / 2), (x1 - 1, (y0 + y1) / 2), ((x0 + x1) / 2, y1 - 1)):
            assert box_colour_at(picture, column, row), (opacity.box, column, row)
        assert not box_colour_at(picture, (x0 + x1) / 2, (y0 + y1) / 2)  # the inside is not box colour
    assert_valid_dicom(
        path, allowed_warnings=ALLOWED_WARNINGS
    )  # last: where dciodvfy is missing, content still checked
    return picture


# models.data.dicom applies the VOI LUT to the rescaled (float) values; with slope 1 and intercept 0 they are whole.
@pytest.mark.filterwarnings("ignore:Applying a VOI LUT on a float input array")
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_burned_in_capture(case: Case, tmp_path: Path) -> None:
    finding = make_finding(shape_of(case.source), case.n_opacities, bilateral=case.bilateral)
    pixels = prepare(case.source)
    sc = burned_in_capture(case.source, pixels, finding, content_datetime=CONTENT_DATETIME)
    check_capture(case.source, finding, write(sc, tmp_path / "sc.dcm"), scale=1.0)


def test_burned_in_capture_is_scaled_down(tmp_path: Path) -> None:
    source = make_source(CR, rows=600, columns=480, number=21)
    finding = make_finding(shape_of(source), 3)
    pixels = np.random.default_rng(2).random(shape_of(source)).astype(np.float32)
    sc = burned_in_capture(source, pixels, finding, max_side=300, content_datetime=CONTENT_DATETIME)
    check_capture(source, finding, write(sc, tmp_path / "sc.dcm"), scale=0.5)
    with pytest.raises(ValueError, match='"pixels"'):
        burned_in_capture(source, pixels[:100], finding)


@pytest.mark.skipif(not REAL_CXR_FILES, reason="shared/data/real-cxr/dicom is not available")
@pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name")
def test_burned_in_capture_of_a_real_source(tmp_path: Path) -> None:
    source = pydicom.dcmread(REAL_CXR_FILES[-1])  # MONOCHROME1, JPEG baseline: decoded as the node decodes it
    finding = make_finding(shape_of(source), 2)
    sc = burned_in_capture(source, prepare(source), finding, content_datetime=CONTENT_DATETIME)
    path = write(sc, tmp_path / "sc.dcm")
    check_capture(source, finding, path, scale=1.0)
    assert pydicom.dcmread(path).LossyImageCompression == "01"  # derived from lossy pixels: said so
