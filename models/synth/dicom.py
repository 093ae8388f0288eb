"""A synthetic radiograph as a DICOM CR Image (PS3.3 A.2) or Digital X-Ray Image - For Presentation (PS3.3 A.26)
object, with the attributes an acquisition device fills in (`make_dataset`)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, PYDICOM_ROOT_UID, ExplicitVRLittleEndian, generate_uid

from models.synth.radiograph import SyntheticRadiograph

GENERATOR_NAME = "cxrnode.models.synth"
GENERATOR_VERSION = "1.0.0"
"""In Software Versions and dataset.json; the name also seeds the UIDs, so changing it changes every file."""
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_STORAGE_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
SOP_CLASS_FOR_MODALITY = MappingProxyType({"CR": CR_IMAGE_STORAGE, "DX": DX_IMAGE_STORAGE_FOR_PRESENTATION})

_VIEW_CODES = MappingProxyType(
    {"PA": ("272479007", "SCT", "postero-anterior"), "AP": ("399348003", "SCT", "antero-posterior")}
)
_CHEST_CODE = ("816094009", "SCT", "Chest")
_BASE_DATE = np.datetime64("2015-01-01")


def _code_item(code: tuple[str, str, str]) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _ds(value: float) -> str:
    """A Decimal String value (at most 16 characters)."""
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.8e}"[:16]


def _uid(rng: np.random.Generator) -> str:
    """A UID under the pydicom root, derived from the generator's state (so the same seed gives the same UID)."""
    return generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=[GENERATOR_NAME, rng.bytes(16).hex()])


def window_for(radiograph: SyntheticRadiograph) -> tuple[float, float]:
    """Window Center and Window Width (stored values) that show the whole radiograph, its lungs included."""
    pixels = radiograph.pixels
    step = max(1, min(pixels.shape) // 256)
    lo, hi = np.percentile(pixels[::step, ::step], [0.5, 99.5])
    width = max(float(hi - lo), 2.0)
    return float(round((lo + hi) / 2.0)), float(round(width))


def make_dataset(
    radiograph: SyntheticRadiograph, *, patient_id: str, modality: str, rng: np.random.Generator, **header: Any
) -> FileDataset:
    """A CR Image (modality "CR") or Digital X-Ray Image - For Presentation (modality "DX") object for the radiograph,
    with the modules its IOD requires and the attributes an acquisition device fills in.

    Dates, times and UIDs come from `rng`. Each keyword argument sets that DICOM attribute afterwards (for example
    PatientName="SYNTH^TEST", StudyInstanceUID=...)."""
    if modality not in SOP_CLASS_FOR_MODALITY:
        raise ValueError(f'Argument "modality" must be one of {tuple(SOP_CLASS_FOR_MODALITY)}, got {modality!r}.')
    if not patient_id:
        raise ValueError('Argument "patient_id" may not be empty.')
    unknown = [k for k in header if pydicom.datadict.tag_for_keyword(k) is None]
    if unknown:
        raise ValueError(f"Header keyword(s) {', '.join(unknown)} are not DICOM keywords (e.g. PatientName, StudyID).")
    rows, cols = radiograph.pixels.shape
    bits = radiograph.bits_stored
    monochrome1 = radiograph.photometric_interpretation == "MONOCHROME1"
    ap = radiograph.view_position == "AP"
    sop_class = SOP_CLASS_FOR_MODALITY[modality]
    study_uid, series_uid, sop_uid = _uid(rng), _uid(rng), _uid(rng)

    day = _BASE_DATE + np.timedelta64(int(rng.integers(0, 5 * 365)), "D")
    date = str(day).replace("-", "")
    seconds = int(rng.integers(7 * 3600, 20 * 3600))
    study_time = f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
    seconds += int(rng.integers(30, 300))
    acquisition_time = f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
    age = int(rng.integers(18, 91))
    birth = f"{int(date[:4]) - age - 1}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"CXRNODE_{GENERATOR_VERSION}".replace(".", "")[:16]
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)

    # SOP Common
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = acquisition_time
    # Patient, Patient Study
    ds.PatientName = f"SYNTH^{patient_id.replace('-', '')[:6].upper()}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth
    ds.PatientSex = radiograph.patient_sex
    ds.PatientAge = f"{age:03d}Y"
    # General Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = date
    ds.StudyTime = study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{int(rng.integers(1, 10**6)):06d}"
    ds.AccessionNumber = f"SYN{int(rng.integers(0, 10**9)):09d}"
    ds.StudyDescription = f"CHEST {radiograph.view_position}"
    # General Series + CR Series / DX Series
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDate = date
    ds.SeriesTime = acquisition_time
    ds.SeriesDescription = f"CHEST {radiograph.view_position}"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = radiograph.view_position
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    # General Equipment
    ds.Manufacturer = "CXRNODE"
    ds.InstitutionName = "SYNTHETIC"
    ds.StationName = f"SYNTH{int(rng.integers(1, 20)):02d}"
    ds.ManufacturerModelName = "SYNTHETIC CR" if modality == "CR" else "SYNTHETIC DR"
    ds.DeviceSerialNumber = f"{int(rng.integers(10**5, 10**6))}"
    ds.SoftwareVersions = f"{GENERATOR_NAME} {GENERATOR_VERSION}"
    # General Acquisition, General Image
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = date
    ds.AcquisitionTime = acquisition_time
    ds.ContentDate = date
    ds.ContentTime = acquisition_time
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]  # rows run to the patient's left, columns to the feet
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = radiograph.photometric_interpretation
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    # Acquisition technique (CR Image module; X-Ray Generation / DX Positioning for DX)
    kvp = rng.uniform(80, 95) if ap else rng.uniform(110, 125)
    current = int(rng.integers(200, 400))
    exposure_time = int(rng.integers(5, 20)) if not ap else int(rng.integers(10, 40))
    sid = 1000.0 if ap else 1800.0
    ds.KVP = _ds(round(kvp))
    ds.DistanceSourceToDetector = _ds(sid)
    ds.ExposureTime = exposure_time
    ds.XRayTubeCurrent = current
    ds.Exposure = max(1, round(current * exposure_time / 1000))
    spacing = [_ds(radiograph.pixel_spacing_mm)] * 2
    ds.ImagerPixelSpacing = spacing
    if modality == "CR":
        ds.PixelSpacing = spacing
        ds.Sensitivity = _ds(float(rng.choice([200, 400])))
        ds.PlateType = "STANDARD"
    else:
        # DX Anatomy Imaged
        ds.ImageLaterality = "U"
        ds.AnatomicRegionSequence = DicomSequence([_code_item(_CHEST_CODE)])
        # DX Image
        ds.PixelIntensityRelationship = "LOG"
        # +1: lower values mean less X-ray intensity (MONOCHROME1 stores air high); -1 the reverse.
        ds.PixelIntensityRelationshipSign = 1 if monochrome1 else -1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
        # DX Detector
        ds.DetectorType = "SCINTILLATOR"
        ds.DetectorConfiguration = "AREA"
        ds.DetectorID = f"D{int(rng.integers(10**5, 10**6))}"
        # DX Positioning
        ds.ViewCodeSequence = DicomSequence([_code_item(_VIEW_CODES[radiograph.view_position])])
        ds.DistanceSourceToPatient = _ds(sid - (150.0 if ap else 250.0))
        ds.EstimatedRadiographicMagnificationFactor = _ds(round(sid / (sid - (150.0 if ap else 250.0)), 4))
        ds.PositionerType = "NONE" if ap else "COLUMN"
        # Acquisition Context
        ds.AcquisitionContextSequence = DicomSequence([])
    # VOI LUT
    center, width = window_for(radiograph)
    ds.WindowCenter = _ds(center)
    ds.WindowWidth = _ds(width)
    ds.WindowCenterWidthExplanation = "NORMAL"

    pixels = radiograph.pixels.astype(np.uint8 if bits == 8 else "<u2")
    data = pixels.tobytes()
    ds.add_new(0x7FE00010, "OB" if bits == 8 else "OW", data + b"\0" if len(data) % 2 else data)  # Pixel Data

    for keyword, value in header.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    return ds
