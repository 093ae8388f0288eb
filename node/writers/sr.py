"""Measurement Report (TID 1500) of one chest radiograph, as an Enhanced SR document.

Content tree (highdicom builds every template; PS3.16 row numbers in brackets):

Imaging Measurement Report (TID 1500)
- Language, Observer Context: a device observer (TID 1004): cxrnode, with a UID derived from the model version and
  the Device Serial Number of the writers (`uids.device_serial_number`)
- Procedure Reported [row 4]: SCT 363679005 "Imaging procedure" (CID 100 has no projection-radiography entry; the
  chest X-ray itself is the source image's study)
- Imaging Measurements [row 6]
  - Algorithm Identification (TID 4019) [row 6b]: name, version (the model version), parameters (the thresholds),
    family DCM 123110 "Artificial Intelligence", once for every group below: one algorithm made them all
  - with a SEG: one Planar ROI group (TID 1410) per SEG segment, the empty opacity segment of a negative image
    included, each referencing its frame of the SEG (Referenced Segmentation Frame [row 7]) and the source image
    (Source image for segmentation [row 8]) and carrying the segment's Tracking ID and UID:
      "Lung opacity": Certainty of Finding (%) = image-level opacity probability;
      Area (mm2) of the opacity; Extent (%) and Geographic extent score ({score}) with finding site Lung and
      laterality Right, Left, Bilateral (both lungs);
      "Right lung", "Left lung": Area (mm2)
  - without a SEG: one Planar ROI group (TID 1410) "Lung opacity, whole image" whose Image Region [row 5] is the
    whole source image (a closed SCOORD POLYLINE along its border) and the image-level items of "Lung opacity"
    except its Area (without the SEG there is no opacity region to give the area of)
  - one Planar ROI group (TID 1410) per reported opacity, finding site Lung with the laterality of the lung(s) it
    overlaps: its box as a closed SCOORD POLYLINE (5 points) on the source image [row 5], Certainty of Finding (%)
    = detector score, Area (mm2) of the box
- Qualitative Evaluations [row 12]: Opacity = Yes / No (CID 230) for the whole image [row 13]; when the image's
  orientation was assumed, a TEXT Comment [row 14] saying so
- Current Requested Procedure Evidence Sequence: the source image and the SEG

Numbers are rounded to two decimal places (percent, mm2; `PRECISION_DECIMALS`), areas are written only when the
image says how large a pixel is (`node.writers.pixel_spacing_mm`).

Why TID 1410 with a Referenced Segmentation Frame rather than TID 1411 with a Referenced Segment: each segment of
our SEG is one frame on the single-frame source image, which is what TID 1410 describes; TID 1411 is for a volume
(and DCMTK's TID 1411 class requires a "Source series for segmentation"). highdicom writes the frame reference with
both Referenced Frame Number and Referenced Segment Number, which the Image SOP Instance Reference Macro (PS3.3
Table 10-3) makes alternatives; the Segment Number is removed, the frame identifies the segment.

Why a TID 1410 group on the whole image rather than a TID 1501 group with no region, for an SR without a SEG: the
image-level numbers are the classifier's over the whole image (and, with a finding site, over each lung in it), so
the image is the region they are measured on; TID 1410 says that explicitly and needs no inference from the
evidence. It also makes every group of Imaging Measurements a TID 1410 group, as with a SEG, which PixelMed's
DicomSRValidator (20220618) needs: it chooses the template it checks every group against from counts over the
whole container, and with exactly one Image Region in it (an SR alone with one box) it held a TID 1501 group to
TID 1410's region rows.

Why Enhanced SR (1.2.840.10008.5.1.4.1.1.88.22): the content needs 2-D SCOORDs, references and numbers, nothing 3-D
and no by-reference relationships, so the least powerful SR class that holds it is Enhanced SR; it has been in the
standard since 2000 and is stored by virtually every PACS, where Comprehensive 3D SR (88.34, 2013) can still be
refused at association negotiation. It is also what DCMTK/dcmqi (3D Slicer) write for TID 1500.
"""

from __future__ import annotations

import datetime
import logging

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pydicom_codes
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage

from models.finding import Finding, Opacity
from node.writers import codes, pin_clock_values, pixel_spacing_mm, uids
from node.writers.identity import ResultNames, checked_header, result_identity, threshold_parameters
from node.writers.seg import LEFT_LUNG_SEGMENT, OPACITY_SEGMENT, RIGHT_LUNG_SEGMENT

logger = logging.getLogger(__name__)

KIND = "sr"
"""The `kind` of the SR's UIDs (`uids.ResultKey.instance_uid`, `uids.ResultKey.series_uid`)."""

SERIES_DESCRIPTION = "lung opacity report"
"""Series Description after the algorithm's name, unless the call gives one."""

DEFAULT_SERIES_NUMBER = 7702
"""Series Number of cxrnode's SR series (one per study, model version and settings)."""

PRECISION_DECIMALS = 2
"""Decimal places of every number in the SR (percent and mm2)."""

IMAGE_TRACKING_IDENTIFIER = "Lung opacity, whole image"
"""Tracking Identifier of the group with the image-level numbers in an SR without a SEG (with a SEG they are in the
opacity segment's group, which carries the segment's Tracking ID)."""


def measurement_report(
    source: Dataset,
    finding: Finding,
    segmentation: Dataset | None,
    *,
    algorithm_name: str = "cxrnode",
    manufacturer: str = "cxrnode",
    software_version: str | None = None,
    series_number: int = DEFAULT_SERIES_NUMBER,
    instance_number: int | None = None,
    series_description: str | None = None,
    content_datetime: datetime.datetime | None = None,
    orientation_note: str | None = None,
    key: uids.ResultKey | None = None,
) -> hd.sr.EnhancedSR:
    """The TID 1500 Measurement Report of `finding` on `source`, referencing `segmentation` (the SEG written by
    `node.writers.seg.segmentation` for the same source and finding) when one is given.

    `orientation_note` (when the image had no usable Patient Orientation and the standard display was assumed) is
    written as a Comment under Qualitative Evaluations.

    Identity: SOP Instance UID `key.instance_uid("sr", options)`, in the series `key.series_uid("sr")` (see
    `node.writers.uids`); the options are this call's keyword arguments, the SEG's SOP Instance UID and the note.
    Same patient and study as the source. Completion flag COMPLETE, verification flag UNVERIFIED, preliminary flag
    PRELIMINARY (no person has read it). `content_datetime` (default: now) fixes every date/time, as for the SEG.

    Raises `node.writers.SourceImageError` for an unsupported source, ValueError when the finding or the SEG does
    not fit the source.
    """
    header = checked_header(source, finding)
    if segmentation is not None:
        _check_segmentation(segmentation, header)
    if orientation_note is not None and not orientation_note.strip():
        raise ValueError('Argument "orientation_note" may not be empty; pass None when there is nothing to note.')
    names = ResultNames(
        algorithm_name, manufacturer, series_number, instance_number, series_description, SERIES_DESCRIPTION
    )
    options = {
        "segmentation": None if segmentation is None else str(segmentation.SOPInstanceUID),
        "orientation_note": orientation_note,
    }
    identity = result_identity(source, header, finding, KIND, key, software_version, content_datetime, names, options)
    key, model_version = identity.key, identity.model_version
    spacing = pixel_spacing_mm(header)
    algorithm = hd.sr.AlgorithmIdentification(
        name=algorithm_name,
        version=model_version,
        family=codes.ARTIFICIAL_INTELLIGENCE,
        parameters=[f"{name}={value}" for name, value in threshold_parameters(finding.thresholds).items()],
    )

    groups: list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = []
    if segmentation is not None:
        groups += _segment_groups(segmentation, header, finding, spacing)
    else:
        groups.append(_image_level_group(header, key, finding))
    groups += [
        _opacity_group(header, key, finding, number, opacity, spacing)
        for number, opacity in enumerate(finding.opacities, start=1)
    ]

    observer = hd.sr.ObserverContext(
        observer_type=pydicom_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.device_observer_uid(model_version),
            name=algorithm_name,
            manufacturer_name=manufacturer,
            model_name=model_version,
            serial_number=identity.device_serial_number,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.IMAGING_PROCEDURE,
        imaging_measurements=groups,
    )
    content = report[0]
    _identify_algorithm(content, algorithm)
    _drop_alternative_segment_numbers(content)
    _add_evaluations(content, finding, orientation_note)

    document = hd.sr.EnhancedSR(
        evidence=[header] if segmentation is None else [header, segmentation],
        content=content,
        **identity.highdicom_arguments(),
        is_complete=True,
        is_final=False,
        is_verified=False,
        **identity.content_date_and_time(),
        coding_schemes=[codes.cxrnode_coding_scheme()],
    )
    document.DeviceSerialNumber = identity.device_serial_number
    pin_clock_values(document, identity.content_datetime)
    return document


def box_polyline(box: tuple[float, float, float, float]) -> np.ndarray:
    """The closed POLYLINE (5 (column, row) points, first = last) of an (x0, y0, x1, y1) box.

    The Finding and DICOM image coordinates agree: origin at the top-left corner of the top-left pixel, x to the
    right (column), y down (row), so the box corners are used as they are. Graphic Data is FL (32-bit) in the file.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)


def whole_image_polyline(rows: int, columns: int) -> np.ndarray:
    """The closed POLYLINE along the border of a `rows` x `columns` image: from the top-left corner of its top-left
    pixel (0, 0) to the bottom-right corner of its bottom-right pixel (Columns, Rows), PS3.3 C.18.6.1.1."""
    return box_polyline((0.0, 0.0, float(columns), float(rows)))


def opacity_tracking_identifier(number: int) -> str:
    """Tracking Identifier of reported opacity `number` (1 = highest score), in the SR and the GSPS alike."""
    return f"Lung opacity {number}"


def opacity_tracking_uid(key: uids.ResultKey, number: int) -> str:
    """Tracking UID of reported opacity `number`, in the SR and the GSPS alike."""
    return key.tracking_uid(f"{KIND}/opacity-{number}")


def _image_level(finding: Finding, spacing: tuple[float, float] | None) -> dict:
    """The image-level measurements (the Opacity Yes/No evaluation is the report's: `_add_evaluations`)."""
    severity, extent = finding.severity, finding.extent
    measurements = [_percent(codes.CERTAINTY_OF_FINDING, 100.0 * finding.opacity_probability)]
    if spacing is not None:
        measurements.append(_area(int(np.count_nonzero(finding.opacity_mask)), spacing))
    for laterality, percent in (
        (codes.RIGHT, severity.right),
        (codes.LEFT, severity.left),
        (codes.BILATERAL, severity.total),
    ):
        measurements.append(_percent(codes.EXTENT, percent, site=_lung(laterality)))
    for laterality, score in ((codes.RIGHT, extent.right), (codes.LEFT, extent.left), (codes.BILATERAL, extent.total)):
        measurements.append(
            hd.sr.Measurement(
                name=codes.GEOGRAPHIC_EXTENT_SCORE,
                value=int(score),
                unit=codes.SCORE,
                finding_sites=[_lung(laterality)],
            )
        )
    return {"measurements": measurements}


def _image_level_group(
    header: Dataset, key: uids.ResultKey, finding: Finding
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410, for an SR without a SEG: the image-level items on the whole source image (`whole_image_polyline`).
    Its area is left out: the area of a TID 1410 group is that of its region, here the image, not the opacity."""
    rows, columns = finding.image_shape
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=key.tracking_uid(f"{KIND}/image"), identifier=IMAGE_TRACKING_IDENTIFIER
        ),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=whole_image_polyline(rows, columns),
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=header.SOPClassUID,
                referenced_sop_instance_uid=header.SOPInstanceUID,
            ),
        ),
        finding_type=codes.OPACITY,
        finding_sites=[hd.sr.FindingSite(codes.LUNG)],
        **_image_level(finding, None),
    )


def _opacity_group(
    header: Dataset,
    key: uids.ResultKey,
    finding: Finding,
    number: int,
    opacity: Opacity,
    spacing: tuple[float, float] | None,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    x0, y0, x1, y1 = opacity.box
    rows, columns = finding.image_shape
    if not (0 <= x0 < x1 <= columns and 0 <= y0 < y1 <= rows):
        raise ValueError(
            f"Opacity {number} box {opacity.box} is not a non-empty box inside the {rows}x{columns} image."
        )
    measurements = [_percent(codes.CERTAINTY_OF_FINDING, 100.0 * opacity.score)]
    if spacing is not None:
        measurements.append(
            hd.sr.Measurement(
                name=codes.AREA,
                value=round((x1 - x0) * (y1 - y0) * spacing[0] * spacing[1], PRECISION_DECIMALS),
                unit=codes.SQUARE_MILLIMETER,
            )
        )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=opacity_tracking_uid(key, number), identifier=opacity_tracking_identifier(number)
        ),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=box_polyline(opacity.box),
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=header.SOPClassUID,
                referenced_sop_instance_uid=header.SOPInstanceUID,
            ),
        ),
        finding_type=codes.OPACITY,
        finding_sites=[_lung(_laterality(opacity.mask, finding))],
        measurements=measurements,
    )


def _segment_groups(
    segmentation: Dataset,
    header: Dataset,
    finding: Finding,
    spacing: tuple[float, float] | None,
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """One TID 1410 group per segment of the SEG, empty ones included, referencing the segment's frame and sharing
    its Tracking ID and UID; the opacity segment's group carries the image-level items."""
    masks = {
        OPACITY_SEGMENT: finding.opacity_mask,
        RIGHT_LUNG_SEGMENT: finding.right_lung,
        LEFT_LUNG_SEGMENT: finding.left_lung,
    }
    frames = _frame_of_segment(segmentation)
    groups = []
    for segment in segmentation.SegmentSequence:
        number = int(segment.SegmentNumber)
        if number == OPACITY_SEGMENT:
            items = _image_level(finding, spacing)
        else:
            pixels = int(np.count_nonzero(masks[number]))
            items = {"measurements": [_area(pixels, spacing)] if spacing is not None else None}
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=segment.TrackingUID, identifier=segment.TrackingID),
                referenced_segment=hd.sr.ReferencedSegmentationFrame(
                    sop_class_uid=segmentation.SOPClassUID,
                    sop_instance_uid=segmentation.SOPInstanceUID,
                    frame_number=frames[number],
                    segment_number=number,
                    source_image=hd.sr.SourceImageForSegmentation(header.SOPClassUID, header.SOPInstanceUID),
                ),
                finding_type=hd.sr.CodedConcept.from_dataset(segment.SegmentedPropertyTypeCodeSequence[0]),
                finding_sites=[hd.sr.FindingSite(codes.LUNG)] if number == OPACITY_SEGMENT else None,
                **items,
            )
        )
    return groups


def _frame_of_segment(segmentation: Dataset) -> dict[int, int]:
    """Segment Number -> the number of the SEG frame that holds it (each of our segments is one frame)."""
    frames = {}
    for index, item in enumerate(segmentation.PerFrameFunctionalGroupsSequence, start=1):
        frames[int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)] = index
    return frames


def _imaging_measurements(content: Dataset) -> Dataset:
    (container,) = [
        item
        for item in content.ContentSequence
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "126010"
    ]
    return container


def _identify_algorithm(content: Dataset, algorithm: hd.sr.AlgorithmIdentification) -> None:
    """TID 4019 once, at the head of Imaging Measurements (TID 1500 row 6b): it made every group in it."""
    container = _imaging_measurements(content)
    container.ContentSequence = [*algorithm, *container.ContentSequence]


def _drop_alternative_segment_numbers(content: Dataset) -> None:
    """A Referenced Segmentation Frame names the frame; Referenced Segment Number, its alternative in the Image SOP
    Instance Reference Macro (PS3.3 Table 10-3), goes. The code meaning of "Source image for segmentation" is the
    one PS3.16 gives (pydicom's table capitalises it)."""
    for group in _imaging_measurements(content).ContentSequence:
        for item in group.get("ContentSequence", []):
            name = item.ConceptNameCodeSequence[0]
            if name.CodeValue == "121214" and name.CodingSchemeDesignator == "DCM":
                for reference in item.ReferencedSOPSequence:
                    if "ReferencedSegmentNumber" in reference:
                        del reference.ReferencedSegmentNumber
            if name.CodeValue == "121233" and name.CodingSchemeDesignator == "DCM":
                name.CodeMeaning = "Source image for segmentation"


def _add_evaluations(content: Dataset, finding: Finding, orientation_note: str | None) -> None:
    """Qualitative Evaluations (TID 1500 row 12): Opacity = Yes / No for the whole image (row 13) and, when the
    image's orientation was assumed, a Comment (DCM 121106) saying so (row 14)."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    items: list[Dataset] = [
        hd.sr.CodeContentItem(
            name=codes.OPACITY, value=codes.YES if finding.opacity_present else codes.NO, relationship_type=contains
        )
    ]
    if orientation_note is not None:
        items.append(
            hd.sr.TextContentItem(name=codes.COMMENT, value=orientation_note.strip(), relationship_type=contains)
        )
    evaluations = hd.sr.ContainerContentItem(name=codes.QUALITATIVE_EVALUATIONS, relationship_type=contains)
    evaluations.ContentSequence = hd.sr.ContentSequence(items)
    content.ContentSequence.append(evaluations)


def _check_segmentation(segmentation: Dataset, header: Dataset) -> None:
    """The SEG must be one of ours, of this source: a Segmentation with segments 1-3 referencing the source."""
    if segmentation.get("SOPClassUID") != SegmentationStorage:
        raise ValueError(
            f'Argument "segmentation" has SOP Class UID "{segmentation.get("SOPClassUID")}", '
            f'not Segmentation Storage "{SegmentationStorage}".'
        )
    if segmentation.get("StudyInstanceUID") != header.StudyInstanceUID:
        raise ValueError(
            f'Argument "segmentation" belongs to study "{segmentation.get("StudyInstanceUID")}", '
            f'the source image to study "{header.StudyInstanceUID}".'
        )
    referenced = {
        str(instance.ReferencedSOPInstanceUID)
        for series in segmentation.get("ReferencedSeriesSequence", [])
        for instance in series.get("ReferencedInstanceSequence", [])
    }
    if str(header.SOPInstanceUID) not in referenced:
        raise ValueError(
            f'Argument "segmentation" ({segmentation.SOPInstanceUID}) does not reference the source image '
            f"{header.SOPInstanceUID}; it references {sorted(referenced)}."
        )
    numbers = sorted(int(segment.SegmentNumber) for segment in segmentation.get("SegmentSequence", []))
    if numbers != [OPACITY_SEGMENT, RIGHT_LUNG_SEGMENT, LEFT_LUNG_SEGMENT]:
        raise ValueError(f'Argument "segmentation" has segments {numbers}; a cxrnode SEG has segments 1, 2 and 3.')
    untracked = [int(s.SegmentNumber) for s in segmentation.SegmentSequence if not s.get("TrackingUID")]
    if untracked:
        raise ValueError(f'Argument "segmentation" has segment(s) {untracked} without a Tracking UID.')


def _percent(name: Code, value: float, site: hd.sr.FindingSite | None = None) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=name,
        value=round(float(value), PRECISION_DECIMALS),
        unit=codes.PERCENT,
        finding_sites=None if site is None else [site],
    )


def _area(pixels: int, spacing: tuple[float, float]) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=codes.AREA, value=round(pixels * spacing[0] * spacing[1], PRECISION_DECIMALS), unit=codes.SQUARE_MILLIMETER
    )


def _lung(laterality: Code | None) -> hd.sr.FindingSite:
    return hd.sr.FindingSite(codes.LUNG, laterality=laterality)


def _laterality(mask: np.ndarray, finding: Finding) -> Code | None:
    """Right, Left or Bilateral by the lung(s) the mask overlaps; None when it overlaps neither lung mask."""
    right = bool(np.any(mask & finding.right_lung))
    left = bool(np.any(mask & finding.left_lung))
    if right and left:
        return codes.BILATERAL
    if right:
        return codes.RIGHT
    if left:
        return codes.LEFT
    return None
