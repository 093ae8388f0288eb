"""Writers: one module per DICOM object cxrnode sends back, each turning a `models.Finding` into one dataset.

- `node.writers.seg.segmentation` — Segmentation (SEG): lung opacity, right lung, left lung.
- `node.writers.sr.measurement_report` — Enhanced SR with a TID 1500 Measurement Report.
- `node.writers.gsps.presentation_state` — Grayscale Softcopy Presentation State drawing the finding over the image.
- `node.writers.sc.burned_in_capture` — Secondary Capture with the finding burned in.
- `node.writers.identity` — what every result object's identity is made of (UIDs, numbers, equipment, dates).
- `node.writers.contours` — outlines of a mask as polylines; `node.writers.grayscale` — a GSPS's grayscale pipeline.
- `node.writers.uids` — the deterministic UIDs they assign.
- `node.writers.codes` — the coded concepts they use.

This module holds what every writer shares: `source_header` turns the received dataset into a header that highdicom
accepts (once, at the edge), `check_finding` that the finding fits it, `pixel_spacing_mm` says how large a pixel is in
the patient, `pin_clock_values` makes a written object independent of the clock.
The writers never decode pixel data; highdicom needs only the source's header.
"""

from __future__ import annotations

import copy
import datetime
import importlib.metadata
import json
import logging

from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName, validate_value

from models.finding import Finding
from node.writers import uids

logger = logging.getLogger(__name__)

# The single-frame projection radiographs cxrnode reads.
SUPPORTED_SOURCE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}

# Type 1 in the source and needed by every writer.
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "Rows", "Columns")

# Type 2 attributes of the Patient and General Study modules that highdicom reads from the source without checking
# that they exist; a source that lacks one gets it empty, as the standard's Type 2 allows.
_TYPE_2_READ_BY_HIGHDICOM = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

# Enumerated values of Patient's Sex (PS3.3 C.7.1.1).
_PATIENT_SEX_VALUES = ("M", "F", "O")


class SourceImageError(ValueError):
    """The source dataset cannot be described by a result object (wrong SOP Class, missing Type 1 attribute...)."""


def source_header(source: Dataset) -> Dataset:
    """A copy of `source` without pixel data, fit to be given to highdicom as the source image of a result object.

    The copy
    - has every top-level attribute except Pixel Data (and Float / Double Float Pixel Data), so nothing is decoded;
    - has the Type 2 Patient and Study attributes highdicom reads, empty where the source lacks them;
    - lacks attributes whose value is invalid for its VR (e.g. Patient's Age "62" instead of "062Y"), which highdicom
      would copy into the result and make it invalid; Type 2 ones stay, empty; each is logged as a warning;
    - lacks Frame of Reference UID (and Position Reference Indicator) when the source has no Image Position
      (Patient): a projection radiograph's frame of reference gives no patient coordinates, and a SEG that claims
      one must place its frames in it (PS3.3 A.51.5.1), which it cannot. The SEG stays aligned with the source pixel
      for pixel through its Derivation Image references instead.

    Raises `SourceImageError` when the source is not a single-frame CR, DX or SC image or lacks a Type 1 attribute.
    `source` itself is not modified.
    """
    sop_class_uid = str(source.get("SOPClassUID", ""))
    if sop_class_uid not in SUPPORTED_SOURCE_SOP_CLASSES:
        supported = ", ".join(f'"{uid}" ({name})' for uid, name in SUPPORTED_SOURCE_SOP_CLASSES.items())
        raise SourceImageError(f'Source SOP Class UID "{sop_class_uid}" is not supported; supported are {supported}.')
    missing = [keyword for keyword in _REQUIRED if source.get(keyword) in (None, "")]
    if missing:
        raise SourceImageError(f"Source image lacks the Type 1 attribute(s) {', '.join(missing)}.")
    number_of_frames = source.get("NumberOfFrames")
    if number_of_frames not in (None, "") and int(number_of_frames) != 1:
        raise SourceImageError(f"Source image has {number_of_frames} frames; only single-frame images are supported.")

    header = Dataset()
    for element in source:
        if element.tag.group == 0x7FE0:  # Pixel Data, Float Pixel Data, Double Float Pixel Data
            continue
        header.add(copy.deepcopy(element))
    if hasattr(source, "file_meta"):
        header.file_meta = copy.deepcopy(source.file_meta)

    for element in list(header):
        if element.VR == "SQ" or element.keyword in _REQUIRED or element.is_private:
            continue
        problem = _invalid_value(element)
        if problem is None:
            continue
        if element.keyword in _TYPE_2_READ_BY_HIGHDICOM:
            logger.warning("Source %s: %s; it is left empty in the results.", source.SOPInstanceUID, problem)
            header[element.tag].value = None
        else:
            logger.warning("Source %s: %s; it is left out of the results.", source.SOPInstanceUID, problem)
            del header[element.tag]

    for keyword in _TYPE_2_READ_BY_HIGHDICOM:
        if keyword not in header:
            setattr(header, keyword, None)
    if header.PatientSex not in (None, "", *_PATIENT_SEX_VALUES):
        logger.warning(
            'Source %s: Patient\'s Sex "%s" is not one of "M", "F", "O"; it is left empty in the results.',
            source.SOPInstanceUID,
            header.PatientSex,
        )
        header.PatientSex = None

    charsets = header.get("SpecificCharacterSet")
    if isinstance(charsets, MultiValue) and charsets and charsets[0] == "":
        # An empty first value means the default repertoire with ISO 2022 code extensions (PS3.3 C.12.1.1.2);
        # highdicom accepts only the term, so write it out.
        header.SpecificCharacterSet = ["ISO 2022 IR 6", *charsets[1:]]

    if "FrameOfReferenceUID" in header and "ImagePositionPatient" not in header:
        del header.FrameOfReferenceUID
        if "PositionReferenceIndicator" in header:
            del header.PositionReferenceIndicator
    return header


def _invalid_value(element: DataElement) -> str | None:
    """Why `element`'s value is invalid for its VR (PS3.5 6.2), or None when it is valid."""
    values = element.value if element.VM > 1 else [element.value]
    for value in values:
        if isinstance(value, PersonName):
            value = str(value)
        if not isinstance(value, str) or value == "":
            continue  # numbers (IS, DS, US...) were checked when pydicom parsed them
        try:
            validate_value(element.VR, value, pydicom_config.RAISE)
        except ValueError as error:
            if element.tag.group == 0x0010:  # patient attributes: never put their values in a log
                return f"{element.keyword or element.tag} {element.VR} value is invalid"
            return f'{element.keyword or element.tag} {element.VR} value "{element.value}" is invalid ({error})'
    return None


def pixel_spacing_mm(source: Dataset) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm at the patient, or None when the source does not say.

    Which attribute (PS3.3 10.7.1.3, Pixel Spacing Calibration Macro, and C.8.11.4 DX Detector):
    1. Pixel Spacing (0028,0030): when present it is the spacing in the patient (calibrated or nominal), so it wins.
    2. Imager Pixel Spacing (0018,1164) divided by Estimated Radiographic Magnification Factor (0018,1114): the
       detector spacing projected back to the patient plane (a PA chest is magnified about 1.1 at the detector).
    3. Imager Pixel Spacing alone when there is no magnification factor: the detector spacing, which overstates an
       area by the square of the (unknown) magnification; still the best figure the image offers.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = _positive_pair(source.get(keyword))
        if spacing is None:
            continue
        if keyword == "ImagerPixelSpacing":
            magnification = source.get("EstimatedRadiographicMagnificationFactor")
            if magnification not in (None, "") and float(magnification) > 0:
                spacing = (spacing[0] / float(magnification), spacing[1] / float(magnification))
        return spacing
    return None


def _positive_pair(value: object) -> tuple[float, float] | None:
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        row, column = (float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    if row > 0 and column > 0:
        return row, column
    return None


def check_finding(header: Dataset, finding: Finding) -> None:
    """Raise ValueError unless `finding` was made for an image of the source's size and names its model."""
    shape = (int(header.Rows), int(header.Columns))
    if tuple(finding.image_shape) != shape:
        raise ValueError(
            f"Finding image_shape {tuple(finding.image_shape)} differs from the source image's (Rows, Columns) {shape}."
        )
    masks = {"right_lung": finding.right_lung, "left_lung": finding.left_lung}
    masks.update({f"opacities[{i}].mask": opacity.mask for i, opacity in enumerate(finding.opacities)})
    for name, mask in masks.items():
        if mask.shape != shape:
            raise ValueError(f"Finding {name} has shape {mask.shape}; the source image is {shape}.")
    if not finding.model_version:
        raise ValueError("Finding model_version may not be empty.")


def source_instance_number(header: Dataset) -> int:
    """The source's Instance Number (a result object mirrors it, so a study's results sort like its images), else 1."""
    value = header.get("InstanceNumber")
    if value in (None, "") or int(value) < 1:
        return 1
    return int(value)


def cxrnode_version() -> str:
    """The installed cxrnode's version (Software Versions of the result objects)."""
    try:
        return importlib.metadata.version("cxrnode")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def pin_clock_values(dataset: Dataset, content_datetime: datetime.datetime) -> None:
    """Replace the dates/times highdicom takes from the clock with `content_datetime`, so that writing the same
    finding twice gives the same dataset: Instance Creation Date/Time, and the Contribution DateTime of highdicom's
    own Contributing Equipment item."""
    dataset.InstanceCreationDate = content_datetime.strftime("%Y%m%d")
    dataset.InstanceCreationTime = content_datetime.strftime("%H%M%S.%f")
    for item in dataset.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item and item.get("ManufacturerModelName") == "highdicom":
            item.ContributionDateTime = content_datetime.strftime("%Y%m%d%H%M%S.%f")


def result_key(
    source: Dataset, finding: Finding, key: uids.ResultKey | None, software_version: str | None
) -> uids.ResultKey:
    """`key` when the caller gives one (`node.outputs` computes it once for all objects of an image), else the key of
    `finding` on `source` without output options."""
    if key is not None:
        if key.source_sop_instance_uid != str(source.get("SOPInstanceUID", "")):
            raise ValueError(
                f'Argument "key" is for source {key.source_sop_instance_uid}, not for {source.get("SOPInstanceUID")}.'
            )
        return key
    return uids.result_key(source, finding, software_version or cxrnode_version())


def options_token(**options: object) -> str:
    """The options of one writer call that change its object, as one canonical string for `ResultKey.instance_uid`."""
    return json.dumps(options, sort_keys=True, separators=(",", ":"), default=str)


def body_part_examined(header: Dataset) -> str:
    """Body Part Examined of a result series: the source's, else CHEST (cxrnode reads chest radiographs).

    General Series Laterality is required for a paired body part; a result series that names its (unpaired) body
    part needs none, where without one validators ask for a Laterality that no value would describe."""
    return str(header.get("BodyPartExamined") or "").strip() or "CHEST"
