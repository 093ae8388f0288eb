"""Segmentation (SEG) of one chest radiograph: lung opacity, right lung, left lung.

A BINARY segmentation with three segments, one frame each, pixel for pixel on the source image:

====== ============== =========================================== ====================== ===========
number label          segmented property type                     category               colour
====== ============== =========================================== ====================== ===========
1      Lung opacity   DCM 112001 "Opacity" (region: SCT Lung)     Morphologically        orange-red
                                                                  abnormal structure
2      Right lung     SCT 3341006 "Right lung"                    Anatomical structure   blue
3      Left lung      SCT 44029006 "Left lung"                    Anatomical structure   green
====== ============== =========================================== ====================== ===========

Frame n is segment n, always: an image without opacity keeps segment 1 with an all-zero frame
(``omit_empty_frames=False``). highdicom would otherwise drop the frame and leave a segment without pixels, which is
valid but which some viewers fail on, and which an SR could not reference; three 1-bit frames cost nothing.
"""

from __future__ import annotations

import datetime
import logging

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import UID

from models.finding import Finding
from node.writers import body_part_examined, codes, pin_clock_values, uids
from node.writers.identity import ResultNames, checked_header, result_identity, threshold_parameters

logger = logging.getLogger(__name__)

KIND = "seg"
"""The `kind` of the SEG's UIDs (`uids.ResultKey.instance_uid`, `uids.ResultKey.series_uid`)."""

SERIES_DESCRIPTION = "lung opacity SEG"
"""Series Description after the algorithm's name, unless the call gives one."""

DEFAULT_SERIES_NUMBER = 7701
"""Series Number of cxrnode's SEG series (one per study and model version)."""

OPACITY_SEGMENT = 1
RIGHT_LUNG_SEGMENT = 2
LEFT_LUNG_SEGMENT = 3

# Recommended display colours (given in sRGB, stored as CIELab): the finding warm and bright, the lungs cool.
OPACITY_COLOUR_RGB = (255, 64, 0)
RIGHT_LUNG_COLOUR_RGB = (0, 128, 255)
LEFT_LUNG_COLOUR_RGB = (0, 200, 83)


def segmentation(
    source: Dataset,
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
    key: uids.ResultKey | None = None,
) -> hd.seg.Segmentation:
    """The SEG of `finding` on `source` (a single-frame CR, DX or SC image; its pixel data is not read).

    Identity: SOP Instance UID `key.instance_uid("seg", options)`, in the series `key.series_uid("seg")`, where `key`
    (default: `uids.result_key` of `source` and `finding`) covers the source's content and the settings, and the
    options are this call's keyword arguments; same patient and study as the source. Device Serial Number defaults
    to `uids.device_serial_number` (the cxrnode build and model version).
    `instance_number` defaults to the source's Instance Number (else 1), so a study's SEGs sort like its images.
    `content_datetime` (default: now) becomes Content Date/Time and every other date/time highdicom would take from
    the clock: with it fixed, writing the same finding twice gives identical datasets.

    Raises `node.writers.SourceImageError` for an unsupported source, ValueError when the finding does not fit it.
    """
    header = checked_header(source, finding)
    names = ResultNames(
        algorithm_name, manufacturer, series_number, instance_number, series_description, SERIES_DESCRIPTION
    )
    options = {"device_serial_number": device_serial_number}
    identity = result_identity(source, header, finding, KIND, key, software_version, content_datetime, names, options)
    key, model_version = identity.key, identity.model_version

    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name,
        family=codes.ARTIFICIAL_INTELLIGENCE,
        version=model_version,
        source=manufacturer,
        parameters=_algorithm_parameters(finding),
    )
    descriptions = [
        _segment(
            OPACITY_SEGMENT,
            "Lung opacity",
            codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            codes.OPACITY,
            OPACITY_COLOUR_RGB,
            algorithm,
            key,
            anatomic_regions=[codes.LUNG],
        ),
        _segment(
            RIGHT_LUNG_SEGMENT,
            "Right lung",
            codes.ANATOMICAL_STRUCTURE,
            codes.RIGHT_LUNG,
            RIGHT_LUNG_COLOUR_RGB,
            algorithm,
            key,
        ),
        _segment(
            LEFT_LUNG_SEGMENT,
            "Left lung",
            codes.ANATOMICAL_STRUCTURE,
            codes.LEFT_LUNG,
            LEFT_LUNG_COLOUR_RGB,
            algorithm,
            key,
        ),
    ]
    # Stacked-segments style: (frames, rows, columns, segments), segment n in [..., n - 1].
    pixel_array = np.stack([finding.opacity_mask, finding.right_lung, finding.left_lung], axis=-1)[np.newaxis]

    seg = hd.seg.Segmentation(
        source_images=[_without_pixel_spacing(header)],
        pixel_array=pixel_array.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        **identity.highdicom_arguments(),
        device_serial_number=identity.device_serial_number,
        omit_empty_frames=False,
        content_label="LUNG_OPACITY",
        content_description=_content_description(algorithm_name, model_version),
        **identity.content_date_and_time(),
    )
    _add_patient_orientation(seg, header)
    seg.BodyPartExamined = body_part_examined(header)
    _pin_dimension_organization_uid(seg, key, identity.sop_instance_uid)
    pin_clock_values(seg, identity.content_datetime)
    return seg


def _segment(
    number: int,
    label: str,
    category: Code,
    property_type: Code,
    colour_rgb: tuple[int, int, int],
    algorithm: hd.AlgorithmIdentificationSequence,
    key: uids.ResultKey,
    anatomic_regions: list[Code] | None = None,
) -> hd.seg.SegmentDescription:
    """One segment, tracked by its label: its Tracking UID is the one the SR's group for it carries."""
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=category,
        segmented_property_type=property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_id=label,
        tracking_uid=segment_tracking_uid(key, number),
        anatomic_regions=anatomic_regions,
        display_color=hd.color.CIELabColor.from_rgb(*colour_rgb),
    )


def segment_tracking_uid(key: uids.ResultKey, segment_number: int) -> UID:
    """Tracking UID of segment `segment_number` of the SEG of `key`'s image (the SR's group for it carries it too)."""
    return key.tracking_uid(f"{KIND}/segment-{segment_number}")


def _algorithm_parameters(finding: Finding) -> dict[str, str]:
    return threshold_parameters(finding.thresholds)


def _content_description(algorithm_name: str, model_version: str) -> str:
    description = f"Lung opacity and lung fields by {algorithm_name} {model_version}"
    return description if len(description) <= 64 else description[:61] + "..."  # LO holds 64 characters


def _without_pixel_spacing(header: Dataset) -> Dataset:
    """The header highdicom builds the SEG from: without Pixel Spacing when there is no frame of reference.

    For such a source highdicom 0.28 writes a Pixel Measures functional group holding Pixel Spacing alone, and then
    cannot read its own SEG back (`PixelMeasuresSequence.from_sequence` requires Slice Thickness). The group is only
    required with a frame of reference (PS3.3 A.51.5); without one, the SEG's frames are the source's pixel grid
    (Derivation Image Sequence, Spatial Locations Preserved YES), so they need no spacing of their own.
    """
    if "FrameOfReferenceUID" in header or "PixelSpacing" not in header:
        return header
    stripped = Dataset()
    for element in header:
        if element.keyword != "PixelSpacing":
            stripped.add(element)
    if hasattr(header, "file_meta"):
        stripped.file_meta = header.file_meta
    return stripped


def _add_patient_orientation(seg: hd.seg.Segmentation, header: Dataset) -> None:
    """Patient Orientation (General Image module), Type 2C: required when the image has no Image Orientation
    (Patient), as a SEG of a projection radiograph has not. highdicom 0.28 leaves it out; the SEG's frames lie on
    the source's pixel grid, so the source's value is the SEG's (empty when the source has none)."""
    if "PlaneOrientationSequence" in seg.SharedFunctionalGroupsSequence[0] or "PatientOrientation" in seg:
        return
    seg.PatientOrientation = header.get("PatientOrientation") or None


def _pin_dimension_organization_uid(seg: hd.seg.Segmentation, key: uids.ResultKey, sop_instance_uid: str) -> None:
    """highdicom draws the Dimension Organization UID at random; derive it from the SEG's key and own SOP Instance UID
    so the same input gives the same dataset."""
    dimension_uid = key.instance_uid(f"{KIND}/dimension-organization", sop_instance_uid)
    for keyword in ("DimensionOrganizationSequence", "DimensionIndexSequence"):
        for item in seg.get(keyword, []):
            item.DimensionOrganizationUID = dimension_uid
