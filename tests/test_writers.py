"""The SEG and SR writers: write, validate with dciodvfy, re-read with highdicom, compare with the Finding.

Sources are built here (CR, DX for presentation / for processing, SC; MONOCHROME1 and 2; with and without pixel
spacing) and validated with dciodvfy themselves; the two real JPEG-baseline files in shared/data are used as well.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes as pydicom_codes
from pydicom.uid import UID, ExplicitVRLittleEndian

from conftest import REAL_CXR
from dicom_validation import assert_valid_dicom, dciodvfy_available, dciodvfy_report
from models.finding import Finding, Opacity, Thresholds
from models.severity import lung_involvement
from node.writers import SourceImageError, cxrnode_version, pixel_spacing_mm, source_header, uids
from node.writers.seg import segmentation
from node.writers.sr import measurement_report
from result_checks import check_report, check_segmentation

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"

REAL_CXR_DIR = REAL_CXR / "dicom"
REAL_CXR_FILES = sorted(REAL_CXR_DIR.glob("*.dcm")) if REAL_CXR_DIR.is_dir() else []

MODEL_VERSION = "maskrcnn-r50-test-0123abcd"
CONTENT_DATETIME = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456)

# dciodvfy warnings that are expected and harmless, with the reason:
ALLOWED_WARNINGS = (
    # cxrnode's private coding scheme (Geographic extent score): declared in the Coding Scheme Identification
    # Sequence, as PS3.3 8.2 asks; dciodvfy knows only the standard's designators.
    "Unrecognized defined term <99CXRNODE>",
    # The real files' Patient's Name is a UUID without "^": legal, but dciodvfy calls it the retired name form.
    "Retired Person Name form",
    # The real files' Study ID is empty (Type 2, copied as it is): a DICOMDIR on media would want one.
    "needed to build DICOMDIR - Study ID",
)


# --- Inputs --------------------------------------------------------------------------------------------------------


def make_source(
    sop_class_uid: str,
    *,
    rows: int = 160,
    columns: int = 128,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    spacing: bool = True,
    magnification: bool = True,
    frame_of_reference: bool = False,
    number: int = 1,
) -> Dataset:
    """A minimal valid single-frame CR, DX or SC image (non-square, so rows and columns cannot be swapped unseen)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.77.{number}.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.77.2"
    ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.77.{number}.3"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P-0001"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.PatientAge = "064Y"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC-1"
    ds.StudyID = "S1"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.StudyDescription = "XR CHEST PA"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 3
    ds.Manufacturer = "ACME"
    ds.PatientOrientation = ["L", "F"]
    ds.ContentDate = "20240102"
    ds.ContentTime = "101600"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits_stored == 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if frame_of_reference:
        ds.FrameOfReferenceUID = f"1.2.826.0.1.3680043.8.498.77.{number}.4"
        ds.PositionReferenceIndicator = ""
    if sop_class_uid == CR:
        ds.Modality = "CR"
        if spacing:
            ds.PixelSpacing = [0.5, 0.4]
    elif sop_class_uid in (DX_PRESENTATION, DX_PROCESSING):
        for_presentation = sop_class_uid == DX_PRESENTATION
        ds.Modality = "DX"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION" if for_presentation else "FOR PROCESSING"
        ds.ImageLaterality = "U"
        ds.AnatomicRegionSequence = [hd.sr.CodedConcept.from_code(pydicom_codes.SCT.Chest)]
        ds.ViewCodeSequence = [hd.sr.CodedConcept.from_code(pydicom_codes.SCT.PosteroAnterior)]
        ds.PositionerType = "COLUMN"
        ds.PixelIntensityRelationship = "LOG" if for_presentation else "LIN"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
        ds.LossyImageCompression = "00"
        ds.BurnedInAnnotation = "NO"
        ds.DetectorType = "DIRECT"
        ds.AcquisitionContextSequence = []
        if for_presentation:
            ds.WindowCenter = 1 << (bits_stored - 1)
            ds.WindowWidth = 1 << bits_stored
        ds.ImagerPixelSpacing = [0.2, 0.25]  # Type 1 in the DX Detector module
        if magnification:
            ds.EstimatedRadiographicMagnificationFactor = 1.25
    elif sop_class_uid == SC:
        ds.Modality = "OT"
        ds.ConversionType = "WSD"
        if spacing:
            ds.PixelSpacing = [0.3, 0.3]
    dtype = np.uint8 if ds.BitsAllocated == 8 else np.uint16
    ds.PixelData = (np.arange(rows * columns) % (1 << bits_stored)).astype(dtype).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def ellipse(shape: tuple[int, int], centre_row: float, centre_column: float, radius_rows: float, radius_columns: float):
    row, column = np.mgrid[: shape[0], : shape[1]]
    return ((row - centre_row) / radius_rows) ** 2 + ((column - centre_column) / radius_columns) ** 2 <= 1.0


def make_finding(
    shape: tuple[int, int], n_opacities: int, *, model_version: str = MODEL_VERSION, bilateral: bool = False
) -> Finding:
    """Two rectangular lungs (patient's right = image left) and up to three elliptic opacities, highest score first."""
    rows, columns = shape
    right_lung = np.zeros(shape, dtype=bool)
    left_lung = np.zeros(shape, dtype=bool)
    right_lung[rows // 8 : rows * 7 // 8, columns // 16 : columns * 7 // 16] = True
    left_lung[rows // 8 : rows * 7 // 8, columns * 9 // 16 : columns * 15 // 16] = True
    candidates = [
        (0.93, rows * 0.35, columns * 0.25, rows * 0.12, columns * 0.10),  # right upper zone
        (0.71, rows * 0.65, columns * 0.75, rows * 0.15, columns * 0.09),  # left lower zone
        (0.52, rows * 0.50, columns * 0.50, rows * 0.06, columns * 0.30),  # across both lungs
    ]
    if bilateral:
        candidates = [candidates[2], *candidates[:2]]
    opacities = []
    for score, *geometry in sorted(candidates[:n_opacities], key=lambda c: -c[0]):
        mask = ellipse(shape, *geometry)
        mask_rows, mask_columns = np.nonzero(mask)
        box = (
            float(mask_columns.min()),
            float(mask_rows.min()),
            float(mask_columns.max() + 1),
            float(mask_rows.max() + 1),
        )
        opacities.append(Opacity(box=box, score=score, mask=mask))
    union = np.zeros(shape, dtype=bool)
    for opacity in opacities:
        union |= opacity.mask
    severity, extent = lung_involvement(union, right_lung, left_lung)
    thresholds = Thresholds(score=0.5, mask=0.5, present=0.6)
    probability = max((o.score for o in opacities), default=0.0)
    return Finding(
        image_shape=shape,
        opacities=tuple(opacities),
        right_lung=right_lung,
        left_lung=left_lung,
        severity=severity,
        extent=extent,
        opacity_probability=probability,
        opacity_present=probability >= thresholds.present,
        thresholds=thresholds,
        model_version=model_version,
    )


@dataclass(frozen=True)
class Case:
    name: str
    source: Dataset
    n_opacities: int
    spacing: tuple[float, float] | None
    bilateral: bool = False


def synthetic_cases() -> list[Case]:
    return [
        Case("cr-spacing-1", make_source(CR), 1, (0.5, 0.4)),
        Case("cr-no-spacing-0", make_source(CR, spacing=False, number=2), 0, None),
        Case("dx-presentation-3", make_source(DX_PRESENTATION, number=3), 3, (0.2 / 1.25, 0.25 / 1.25)),
        Case(
            "dx-processing-mono1-2",
            make_source(
                DX_PROCESSING,
                photometric="MONOCHROME1",
                magnification=False,
                frame_of_reference=True,
                bits_stored=14,
                number=4,
            ),
            2,
            (0.2, 0.25),
        ),
        Case("sc-8bit-no-spacing-1", make_source(SC, bits_stored=8, spacing=False, number=5), 1, None),
        Case(
            "sc-mono1-spacing-3-bilateral",
            make_source(SC, photometric="MONOCHROME1", number=6),
            3,
            (0.3, 0.3),
            bilateral=True,
        ),
    ]


CASES = synthetic_cases()


def write(dataset: Dataset, path: Path) -> Path:
    dataset.save_as(path, enforce_file_format=True)
    return path


def write_results(source: Dataset, finding: Finding, directory: Path) -> tuple[Path, Path]:
    seg = segmentation(source, finding, content_datetime=CONTENT_DATETIME)
    sr = measurement_report(source, finding, seg, content_datetime=CONTENT_DATETIME)
    return write(seg, directory / "seg.dcm"), write(sr, directory / "sr.dcm")


# --- Checks shared by synthetic and real sources -------------------------------------------------------------------


def check_results(source: Dataset, finding: Finding, seg_path: Path, sr_path: Path, spacing) -> None:
    """The content checks first, dciodvfy last: where dciodvfy is missing (a skip) the content is still checked."""
    seg = hd.seg.segread(seg_path)
    sr = hd.sr.srread(sr_path)
    check_identity(source, finding, seg, sr)
    check_segmentation(source, finding, seg, MODEL_VERSION)
    check_report(source, finding, seg, sr, spacing, MODEL_VERSION)
    assert_valid_dicom(seg_path, allowed_warnings=ALLOWED_WARNINGS)
    assert_valid_dicom(sr_path, allowed_warnings=ALLOWED_WARNINGS)


def check_identity(source: Dataset, finding: Finding, seg: Dataset, sr: Dataset) -> None:
    key = uids.result_key(source, finding, cxrnode_version())
    for result in (seg, sr):
        assert UID(result.SOPInstanceUID).is_valid and result.SOPInstanceUID.startswith("2.25.")
    assert seg.SOPInstanceUID != sr.SOPInstanceUID
    assert seg.SeriesInstanceUID == key.series_uid("seg")
    assert sr.SeriesInstanceUID == key.series_uid("sr")
    assert seg.DeviceSerialNumber == uids.device_serial_number(cxrnode_version(), MODEL_VERSION)
    assert seg.SeriesInstanceUID not in (source.SeriesInstanceUID, sr.SeriesInstanceUID)
    for result in (seg, sr):
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "StudyInstanceUID",
            "StudyDate",
            "StudyTime",
            "AccessionNumber",
            "StudyID",
            "ReferringPhysicianName",
        ):
            assert result.get(keyword) == source.get(keyword), keyword
        assert result.ContentDate == "20240506" and result.ContentTime.startswith("070809")
    assert seg.Modality == "SEG" and sr.Modality == "SR"
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"


# --- Tests ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_synthetic_source_is_valid(case: Case, tmp_path: Path) -> None:
    assert_valid_dicom(write(case.source, tmp_path / "source.dcm"))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_write_validate_reread_compare(case: Case, tmp_path: Path) -> None:
    shape = (int(case.source.Rows), int(case.source.Columns))
    finding = make_finding(shape, case.n_opacities, bilateral=case.bilateral)
    assert pixel_spacing_mm(case.source) == (None if case.spacing is None else pytest.approx(case.spacing))
    seg_path, sr_path = write_results(case.source, finding, tmp_path)
    check_results(case.source, finding, seg_path, sr_path, case.spacing)


@pytest.mark.skipif(not REAL_CXR_FILES, reason="shared/data/real-cxr/dicom is not available")
@pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name")
@pytest.mark.parametrize("path", REAL_CXR_FILES, ids=[p.name for p in REAL_CXR_FILES])
def test_real_source_without_decoding_pixels(path: Path, tmp_path: Path, caplog, monkeypatch) -> None:
    # The writers hash the (JPEG baseline) pixel data for the UIDs but never decode it.
    source = pydicom.dcmread(path)
    monkeypatch.setattr(Dataset, "pixel_array", property(lambda ds: pytest.fail("the writers decoded pixel data")))
    finding = make_finding((int(source.Rows), int(source.Columns)), 2)
    with caplog.at_level(logging.WARNING, logger="node.writers"):
        seg_path, sr_path = write_results(source, finding, tmp_path)
    # Its Patient's Age "62" is not a valid AS value: left out of the results, with a warning that says so
    # without repeating the patient's value.
    assert any("PatientAge" in message and "invalid" in message for message in caplog.messages)
    assert not any("62" in message for message in caplog.messages)
    check_results(source, finding, seg_path, sr_path, (0.168, 0.168))
    seg = pydicom.dcmread(seg_path)
    assert "PatientAge" not in seg
    assert seg.LossyImageCompression == "01"  # derived from a lossy source: said so (PS3.3 C.7.6.1.1.5)


def test_sparse_source_gives_valid_results(tmp_path: Path) -> None:
    """A source with nothing but its Type 1 attributes (Type 2 ones absent, not even empty) still gives valid
    results: the Type 2 attributes the results need are written empty."""
    full = make_source(SC, spacing=False, number=7)
    source = Dataset()
    for keyword in (
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "ConversionType",
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
    source.file_meta = full.file_meta
    finding = make_finding((int(source.Rows), int(source.Columns)), 1)
    seg_path, sr_path = write_results(source, finding, tmp_path)
    for path in (seg_path, sr_path):
        result = pydicom.dcmread(path)
        assert (
            result.PatientID == "" and result.PatientName == "" and result.StudyInstanceUID == source.StudyInstanceUID
        )
    assert hd.seg.segread(seg_path).PatientOrientation == ""
    for path in (seg_path, sr_path):
        assert_valid_dicom(path, allowed_warnings=(*ALLOWED_WARNINGS, "needed to build DICOMDIR"))


def test_same_input_gives_identical_files(tmp_path: Path) -> None:
    source = make_source(CR)
    finding = make_finding((int(source.Rows), int(source.Columns)), 2)
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = write_results(source, finding, tmp_path / "first")
    second = write_results(source, finding, tmp_path / "second")
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_uids_do_not_depend_on_the_clock() -> None:
    source = make_source(CR)
    finding = make_finding((int(source.Rows), int(source.Columns)), 1)
    first = segmentation(source, finding)
    second = segmentation(source, finding)
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.DimensionOrganizationSequence[0].DimensionOrganizationUID == (
        second.DimensionOrganizationSequence[0].DimensionOrganizationUID
    )
    assert measurement_report(source, finding, first).SOPInstanceUID == (
        measurement_report(source, finding, second).SOPInstanceUID
    )


def test_another_model_version_gives_other_objects() -> None:
    source = make_source(CR)
    shape = (int(source.Rows), int(source.Columns))
    old = segmentation(source, make_finding(shape, 1, model_version="v1"))
    new = segmentation(source, make_finding(shape, 1, model_version="v2"))
    assert old.SOPInstanceUID != new.SOPInstanceUID
    assert old.SeriesInstanceUID != new.SeriesInstanceUID


def test_a_study_s_segs_share_one_series() -> None:
    first, second = make_source(CR, number=1), make_source(CR, number=2)
    shape = (int(first.Rows), int(first.Columns))
    seg_1 = segmentation(first, make_finding(shape, 1))
    seg_2 = segmentation(second, make_finding(shape, 0))
    assert seg_1.SeriesInstanceUID == seg_2.SeriesInstanceUID
    assert seg_1.SOPInstanceUID != seg_2.SOPInstanceUID


def test_report_without_segmentation(tmp_path: Path) -> None:
    source = make_source(DX_PRESENTATION)
    finding = make_finding((int(source.Rows), int(source.Columns)), 2)
    path = write(measurement_report(source, finding, None, content_datetime=CONTENT_DATETIME), tmp_path / "sr.dcm")
    sr = hd.sr.srread(path)
    assert {uid for _, _, uid, _ in sr.get_evidence()} == {source.SOPInstanceUID}
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    check_report(source, finding, None, sr, pixel_spacing_mm(source_header(source)), MODEL_VERSION)
    assert_valid_dicom(path, allowed_warnings=ALLOWED_WARNINGS)


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")
def test_writers_leave_the_source_alone() -> None:
    source = make_source(DX_PROCESSING, frame_of_reference=True)
    source.PatientAge = "64"  # invalid AS
    before = Dataset(source)
    segmentation(source, make_finding((int(source.Rows), int(source.Columns)), 1))
    assert source == before
    assert "FrameOfReferenceUID" in source and source.PatientAge == "64"


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")
def test_source_header_drops_pixel_data_invalid_values_and_a_frame_of_reference_without_position(caplog) -> None:
    source = make_source(DX_PROCESSING, frame_of_reference=True)
    source.PatientAge = "64"
    source.PatientSex = "FEMALE"
    del source.AccessionNumber
    with caplog.at_level(logging.WARNING, logger="node.writers"):
        header = source_header(source)
    assert "PixelData" not in header and "PixelData" in source
    assert "PatientAge" not in header
    assert header.PatientSex == "" or header.PatientSex is None
    assert "AccessionNumber" in header and not header.AccessionNumber
    assert "FrameOfReferenceUID" not in header
    assert any("PatientAge" in message for message in caplog.messages)


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({"PixelSpacing": [0.5, 0.4], "ImagerPixelSpacing": [0.2, 0.2]}, (0.5, 0.4)),
        ({"ImagerPixelSpacing": [0.2, 0.25], "EstimatedRadiographicMagnificationFactor": 1.25}, (0.16, 0.2)),
        ({"ImagerPixelSpacing": [0.2, 0.25]}, (0.2, 0.25)),
        ({}, None),
    ],
)
def test_pixel_spacing(attributes: dict, expected) -> None:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    assert pixel_spacing_mm(ds) == (pytest.approx(expected) if expected else None)


def test_unsupported_source_is_refused() -> None:
    source = make_source(CR)
    source.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    with pytest.raises(SourceImageError, match=r"1\.2\.840\.10008\.5\.1\.4\.1\.1\.2.*not supported"):
        segmentation(source, make_finding((int(source.Rows), int(source.Columns)), 0))


def test_finding_of_another_size_is_refused() -> None:
    source = make_source(CR)
    with pytest.raises(ValueError, match=r"image_shape \(100, 100\) differs .* \(160, 128\)"):
        segmentation(source, make_finding((100, 100), 1))


def test_report_refuses_a_seg_of_another_image() -> None:
    first, second = make_source(CR, number=1), make_source(CR, number=2)
    finding = make_finding((int(first.Rows), int(first.Columns)), 1)
    seg_of_first = segmentation(first, finding)
    with pytest.raises(ValueError, match="does not reference the source image"):
        measurement_report(second, finding, seg_of_first)


def test_report_refuses_a_box_outside_the_image() -> None:
    source = make_source(CR)
    finding = make_finding((int(source.Rows), int(source.Columns)), 1)
    outside = replace(finding.opacities[0], box=(10.0, 10.0, 500.0, 20.0))
    with pytest.raises(ValueError, match="box"):
        measurement_report(source, replace(finding, opacities=(outside,)), None)


def test_dciodvfy_report_parses_errors_and_warnings(tmp_path: Path) -> None:
    if not dciodvfy_available():
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    source = make_source(CR)
    del source.PatientID  # Type 2: an error
    errors, _ = dciodvfy_report(write(source, tmp_path / "bad.dcm"))
    assert any("PatientID" in error for error in errors)
