"""Measurement Report (TID 1500) of one chest radiograph, as an Enhanced SR document.

Content tree (highdicom builds every template):

Imaging Measurement Report (TID 1500)
- Language, Observer Context: a device observer (TID 1004): cxrnode, with a UID derived from the model version
- Procedure Reported: SCT 399208008 "Plain chest X-ray"
- Imaging Measurements
  - Image-level group (TID 1501), finding DCM "Opacity", source image referenced:
      Opacity = Yes / No (CID 230); Certainty of Finding (%) = image-level opacity probability;
      Extent (%) and Geographic extent score ({score}) for Lung with laterality Right, Left, Bilateral (both lungs)
  - one group per reported opacity (TID 1410), finding DCM "Opacity", finding site Lung with the laterality of
    the lung(s) it overlaps: its box as a closed SCOORD POLYLINE (5 points) on the source image,
    Certainty of Finding (%) = detector score, Area (mm2) of the box when the pixel spacing is known
  - with a SEG: one group per non-empty segment (TID 1411), referencing that segment of the SEG and carrying the
    segment's Tracking UID, Area (mm2) of the segment when the pixel spacing is known
- Current Requested Procedure Evidence Sequence: the source image and the SEG

Why Enhanced SR (1.2.840.10008.5.1.4.1.1.88.22): the content needs 2-D SCOORDs, references and numbers, nothing 3-D
and no by-reference relationships, so the least powerful SR class that holds it is Enhanced SR; it has been in the
standard since 2000 and is stored by virtually every PACS, where Comprehensive 3D SR (88.34, 2013) can still be
refused at association negotiation. It is also what DCMTK/dcmqi (3D Slicer) write for TID 1500. Comprehensive SR and
Comprehensive 3D SR validate as well (dciodvfy); switching is one line.
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
from node.writers import (
    check_finding,
    codes,
    cxrnode_version,
    pin_clock_values,
    pixel_spacing_mm,
    source_header,
    source_instance_number,
    uids,
)
from node.writers.seg import LEFT_LUNG_SEGMENT, OPACITY_SEGMENT, RIGHT_LUNG_SEGMENT

logger = logging.getLogger(__name__)

KIND = "sr"
"""The `kind` of the SR's UIDs (`uids.result_uid`, `uids.result_series_uid`)."""

DEFAULT_SERIES_NUMBER = 7702
"""Series Number of cxrnode's SR series (one per study and model version)."""


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
) -> hd.sr.EnhancedSR:
    """The TID 1500 Measurement Report of `finding` on `source`, referencing `segmentation` (the SEG written by
    `node.writers.seg.segmentation` for the same source and finding) when one is given.

    Identity: SOP Instance UID `uids.result_uid(source SOP Instance UID, model version, "sr")`, in the series
    `uids.result_series_uid(Study Instance UID, model version, "sr")`; same patient and study as the source.
    Completion flag COMPLETE, verification flag UNVERIFIED, preliminary flag PRELIMINARY (no person has read it).
    `content_datetime` (default: now) fixes every date/time, as for the SEG.

    Raises `node.writers.SourceImageError` for an unsupported source, ValueError when the finding or the SEG does
    not fit the source.
    """
    header = source_header(source)
    check_finding(header, finding)
    if segmentation is not None:
        _check_segmentation(segmentation, header)
    if content_datetime is None:
        content_datetime = datetime.datetime.now()
    model_version = finding.model_version
    source_uid = str(header.SOPInstanceUID)
    spacing = pixel_spacing_mm(header)
    algorithm = hd.sr.AlgorithmIdentification(
        name=algorithm_name,
        version=model_version,
        family=codes.ARTIFICIAL_INTELLIGENCE,
        manufacturer=manufacturer,
        parameters=[
            f"score_threshold={finding.thresholds.score:g}",
            f"mask_threshold={finding.thresholds.mask:g}",
            f"present_threshold={finding.thresholds.present:g}",
        ],
    )

    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = [_image_level_group(header, finding, algorithm)]
    groups += [
        _opacity_group(header, finding, number, opacity, algorithm, spacing)
        for number, opacity in enumerate(finding.opacities, start=1)
    ]
    if segmentation is not None:
        groups += _segment_groups(segmentation, header, finding, algorithm, spacing)

    observer = hd.sr.ObserverContext(
        observer_type=pydicom_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.device_observer_uid(model_version),
            name=algorithm_name,
            manufacturer_name=manufacturer,
            model_name=model_version,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.PLAIN_CHEST_X_RAY,
        imaging_measurements=groups,
    )
    sop_instance_uid = uids.result_uid(source_uid, model_version, KIND)
    document = hd.sr.EnhancedSR(
        evidence=[header] if segmentation is None else [header, segmentation],
        content=report[0],
        series_instance_uid=uids.result_series_uid(header.StudyInstanceUID, model_version, KIND),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number if instance_number is not None else source_instance_number(header),
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm_name,
        software_versions=software_version or cxrnode_version(),
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description or f"{algorithm_name} lung opacity report",
        content_date=content_datetime.date(),
        content_time=content_datetime.time(),
        coding_schemes=[codes.cxrnode_coding_scheme()],
    )
    pin_clock_values(document, content_datetime)
    return document


def box_polyline(box: tuple[float, float, float, float]) -> np.ndarray:
    """The closed POLYLINE (5 (column, row) points, first = last) of an (x0, y0, x1, y1) box.

    The Finding and DICOM image coordinates agree: origin at the top-left corner of the top-left pixel, x to the
    right (column), y down (row), so the box corners are used as they are. Graphic Data is FL (32-bit) in the file.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)


def _image_level_group(
    header: Dataset, finding: Finding, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    severity, extent = finding.severity, finding.extent
    measurements = [_percent(codes.CERTAINTY_OF_FINDING, 100.0 * finding.opacity_probability)]
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
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.tracking_uid(header.SOPInstanceUID, finding.model_version, f"{KIND}/image"),
            identifier="Lung opacity, whole image",
        ),
        finding_type=codes.OPACITY,
        finding_category=codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        finding_sites=[hd.sr.FindingSite(codes.LUNG)],
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=codes.OPACITY, value=codes.YES if finding.opacity_present else codes.NO)
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(header)],
    )


def _opacity_group(
    header: Dataset,
    finding: Finding,
    number: int,
    opacity: Opacity,
    algorithm: hd.sr.AlgorithmIdentification,
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
                name=codes.AREA, value=(x1 - x0) * (y1 - y0) * spacing[0] * spacing[1], unit=codes.SQUARE_MILLIMETER
            )
        )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.tracking_uid(header.SOPInstanceUID, finding.model_version, f"{KIND}/opacity-{number}"),
            identifier=f"Lung opacity {number}",
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
        finding_category=codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        finding_sites=[_lung(_laterality(opacity.mask, finding))],
        algorithm_id=algorithm,
        measurements=measurements,
    )


def _segment_groups(
    segmentation: Dataset,
    header: Dataset,
    finding: Finding,
    algorithm: hd.sr.AlgorithmIdentification,
    spacing: tuple[float, float] | None,
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """One group per segment of the SEG that has pixels, referencing the segment and sharing its Tracking UID.

    TID 1411 with a Referenced Segment (the whole segment: here its one frame) rather than TID 1410 with a Referenced
    Segmentation Frame: highdicom 0.28 writes the latter with both Referenced Frame Number and Referenced Segment
    Number, which the Image SOP Instance Reference Macro (PS3.3 Table 10-3) makes mutually exclusive, and gives the
    single-frame source image a frame number.
    """
    masks = {
        OPACITY_SEGMENT: finding.opacity_mask,
        RIGHT_LUNG_SEGMENT: finding.right_lung,
        LEFT_LUNG_SEGMENT: finding.left_lung,
    }
    groups = []
    for segment in segmentation.SegmentSequence:
        number = int(segment.SegmentNumber)
        mask = masks[number]
        pixels = int(np.count_nonzero(mask))
        if pixels == 0:
            continue
        measurements = []
        if spacing is not None:
            measurements.append(
                hd.sr.Measurement(name=codes.AREA, value=pixels * spacing[0] * spacing[1], unit=codes.SQUARE_MILLIMETER)
            )
        category = hd.sr.CodedConcept.from_dataset(segment.SegmentedPropertyCategoryCodeSequence[0])
        property_type = hd.sr.CodedConcept.from_dataset(segment.SegmentedPropertyTypeCodeSequence[0])
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=segment.TrackingUID, identifier=segment.TrackingID),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=segmentation.SOPClassUID,
                    sop_instance_uid=segmentation.SOPInstanceUID,
                    segment_number=number,
                    source_images=[hd.sr.SourceImageForSegmentation(header.SOPClassUID, header.SOPInstanceUID)],
                ),
                finding_type=property_type,
                finding_category=category,
                finding_sites=[hd.sr.FindingSite(codes.LUNG)] if number == OPACITY_SEGMENT else None,
                algorithm_id=algorithm,
                measurements=measurements or None,
            )
        )
    return groups


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
        name=name, value=float(value), unit=codes.PERCENT, finding_sites=None if site is None else [site]
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
