"""Secondary Capture (SC) of one chest radiograph with the finding burned in: for viewers that show neither SEG nor
presentation states, every viewer shows an RGB image.

The picture is `node.overlay.render_overlay` (as `cxrnode predict --png` draws it): the radiograph as the models saw
it, lung outlines, the opacity tinted and outlined, the boxes with their scores, the severity line at the top and
"not for diagnostic use" at the bottom, every line on a dark band in a font that has all its glyphs (readable on any
image). It is scaled down to at most `max_side` pixels on its long side (default 2048: the long side of a 3-megapixel
diagnostic display; a 2048 x 2048 RGB image is 12 MiB uncompressed), never up.

The SC is its own series (SOP Instance UID and Series Instance UID of kind "sc"), says BURNED IN ANNOTATION YES,
Conversion Type WSD (workstation), Image Type DERIVED\\SECONDARY\\OTHER, and references the radiograph as its source
(Source Image Sequence, purpose DCM 121322) with a Derivation Description. It has no Pixel Spacing: it is a picture to
look at, not to measure on.
"""

from __future__ import annotations

import datetime
import logging

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pydicom_codes
from pydicom.uid import ExplicitVRLittleEndian

from models.finding import Finding
from node.overlay import render_overlay
from node.writers import body_part_examined, pin_clock_values, uids
from node.writers.identity import ResultNames, checked_header, result_identity

logger = logging.getLogger(__name__)

KIND = "sc"
"""The `kind` of the SC's UIDs (`uids.ResultKey.instance_uid`, `uids.ResultKey.series_uid`)."""

SERIES_DESCRIPTION = "lung opacity overlay - not for diagnosis"
"""Series Description after the algorithm's name, unless the call gives one."""

DEFAULT_SERIES_NUMBER = 7704
"""Series Number of cxrnode's SC series (one per study and model version)."""

DEFAULT_MAX_SIDE = 2048
"""Long side of the picture, at most (pixels)."""

# highdicom wants a Patient Orientation to build an SC of a patient, and accepts single letters only; the SC's
# orientation is the source's (scaling keeps it), set after construction (empty where the source has none).
_PLACEHOLDER_ORIENTATION = ("L", "F")


def burned_in_capture(
    source: Dataset,
    pixels: np.ndarray,
    finding: Finding,
    *,
    algorithm_name: str = "cxrnode",
    manufacturer: str = "cxrnode",
    software_version: str | None = None,
    device_serial_number: str | None = None,
    series_number: int = DEFAULT_SERIES_NUMBER,
    instance_number: int | None = None,
    series_description: str | None = None,
    content_datetime: datetime.datetime | None = None,
    max_side: int = DEFAULT_MAX_SIDE,
    key: uids.ResultKey | None = None,
) -> hd.sc.SCImage:
    """The RGB Secondary Capture of `finding` drawn over `pixels`, the source's presentation pixels (Modality and
    VOI LUT applied, MONOCHROME1 inverted: `node.pixels.prepare`), of the source's (Rows, Columns).

    Identity: SOP Instance UID `key.instance_uid("sc", options)`, in the series `key.series_uid("sc")` (see
    `node.writers.uids`; the options are this call's keyword arguments); same patient and study as the source.
    `content_datetime` (default: now) fixes every date/time, as for the SEG.

    Raises `node.writers.SourceImageError` for an unsupported source, ValueError when the finding or the pixels do
    not fit it.
    """
    header = checked_header(source, finding)
    shape = (int(header.Rows), int(header.Columns))
    if not isinstance(pixels, np.ndarray) or pixels.shape != shape:
        raise ValueError(f'Argument "pixels" has shape {getattr(pixels, "shape", None)}; the source image is {shape}.')
    if max_side < 1:
        raise ValueError(f'Argument "max_side" must be positive, not {max_side}.')
    names = ResultNames(
        algorithm_name, manufacturer, series_number, instance_number, series_description, SERIES_DESCRIPTION
    )
    options = {"device_serial_number": device_serial_number, "max_side": max_side}
    identity = result_identity(source, header, finding, KIND, key, software_version, content_datetime, names, options)
    key, model_version = identity.key, identity.model_version

    picture = np.ascontiguousarray(np.asarray(render_overlay(pixels, finding, max_side=max_side).convert("RGB")))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=picture,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        **identity.highdicom_arguments(),
        patient_orientation=_PLACEHOLDER_ORIENTATION,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        device_serial_number=identity.device_serial_number,
        **identity.content_date_and_time(),
    )
    sc.copy_patient_and_study_information(header)
    sc.PatientOrientation = header.get("PatientOrientation") or None
    sc.BodyPartExamined = body_part_examined(header)
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    rows, columns = picture.shape[:2]
    sc.DerivationDescription = (
        f"Radiograph {shape[0]}x{shape[1]} (presentation values, percentile-stretched) scaled to {rows}x{columns}, "
        f"lung fields and lung opacity found by {algorithm_name} {model_version} burned in"
    )
    sc.SourceImageSequence = [_source_image_item(header)]
    _carry_lossy_compression(sc, header)
    sc.DateOfSecondaryCapture = identity.content_datetime.strftime("%Y%m%d")
    sc.TimeOfSecondaryCapture = identity.content_datetime.strftime("%H%M%S.%f")
    pin_clock_values(sc, identity.content_datetime)
    return sc


def _source_image_item(header: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(pydicom_codes.DCM.SourceImageForImageProcessingOperation)
    ]
    return item


def _carry_lossy_compression(sc: Dataset, header: Dataset) -> None:
    """An image derived from lossy-compressed pixels says so, with the source's ratio and method (PS3.3
    C.7.6.1.1.5: once "01", never reset)."""
    if str(header.get("LossyImageCompression", "")).strip() != "01":
        return
    sc.LossyImageCompression = "01"
    for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if header.get(keyword):
            setattr(sc, keyword, header[keyword].value)
