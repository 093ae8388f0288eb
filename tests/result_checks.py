"""Checks that a SEG and an SR read back with highdicom say exactly what a Finding says (used by the writer tests and
the integration tests)."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pydicom_codes

from models.finding import Finding
from node.writers import codes as writer_codes
from node.writers import uids
from node.writers.seg import LEFT_LUNG_SEGMENT, OPACITY_SEGMENT, RIGHT_LUNG_SEGMENT
from node.writers.sr import IMAGE_TRACKING_IDENTIFIER, PRECISION_DECIMALS, box_polyline, whole_image_polyline


def check_segmentation(source: Dataset, finding: Finding, seg: hd.seg.Segmentation, model_version: str) -> None:
    assert seg.SegmentationType == "BINARY"
    assert int(seg.NumberOfFrames) == 3  # an empty opacity segment keeps its all-zero frame
    labels = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    assert labels == {OPACITY_SEGMENT: "Lung opacity", RIGHT_LUNG_SEGMENT: "Right lung", LEFT_LUNG_SEGMENT: "Left lung"}
    types = {int(s.SegmentNumber): s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence}
    assert types == {OPACITY_SEGMENT: "112001", RIGHT_LUNG_SEGMENT: "3341006", LEFT_LUNG_SEGMENT: "44029006"}
    for segment in seg.SegmentSequence:
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmVersion == model_version
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    pixels = seg.get_pixels_by_source_instance(
        [source.SOPInstanceUID], segment_numbers=[OPACITY_SEGMENT, RIGHT_LUNG_SEGMENT, LEFT_LUNG_SEGMENT]
    )
    assert pixels.shape == (1, *finding.image_shape, 3)
    np.testing.assert_array_equal(pixels[0, :, :, 0].astype(bool), finding.opacity_mask)
    np.testing.assert_array_equal(pixels[0, :, :, 1].astype(bool), finding.right_lung)
    np.testing.assert_array_equal(pixels[0, :, :, 2].astype(bool), finding.left_lung)
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert referenced.ReferencedSOPClassUID == source.SOPClassUID


def measurement_value(group, name, laterality=None) -> float | None:
    matches = []
    for measurement in group.get_measurements(name=name):
        sites = measurement.finding_sites
        if laterality is None or (sites and sites[0].laterality == laterality):
            matches.append(measurement)
    assert len(matches) <= 1
    return None if not matches else float(matches[0].value)


def opacity_present(sr: hd.sr.EnhancedSR) -> bool:
    """The report's Opacity = Yes / No, from its Qualitative Evaluations container (TID 1500 row 12)."""
    (container,) = [
        item
        for item in sr.ContentSequence
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "C0034375"
    ]
    (present,) = [item for item in container.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "112001"]
    return present.ConceptCodeSequence[0].CodeValue == writer_codes.YES.value


def image_level_group(sr: hd.sr.EnhancedSR):
    """The group with the image-level numbers: the SEG's opacity segment's group, else the whole-image group (both
    TID 1410; no TID 1501 group is written)."""
    report = sr.content
    assert report.get_image_measurement_groups() == []
    by_segment = report.get_planar_roi_measurement_groups(reference_type=pydicom_codes.DCM.ReferencedSegmentationFrame)
    if by_segment:
        (group,) = [g for g in by_segment if g.tracking_identifier == "Lung opacity"]
        return group
    (group,) = [g for g in box_and_image_groups(sr) if g.tracking_identifier == IMAGE_TRACKING_IDENTIFIER]
    return group


def box_and_image_groups(sr: hd.sr.EnhancedSR) -> list:
    """Every TID 1410 group with an Image Region (SCOORD): the boxes' and, without a SEG, the whole image's."""
    return sr.content.get_planar_roi_measurement_groups(reference_type=pydicom_codes.DCM.ImageRegion)


def box_groups(sr: hd.sr.EnhancedSR) -> list:
    """The boxes' groups, in the order written (1 = highest score)."""
    return [g for g in box_and_image_groups(sr) if g.tracking_identifier != IMAGE_TRACKING_IDENTIFIER]


def check_report(
    source: Dataset, finding: Finding, seg: Dataset | None, sr: hd.sr.EnhancedSR, spacing, model_version: str
) -> None:
    """`sr` says what `finding` says, numbers to the SR's stated precision (`PRECISION_DECIMALS`)."""
    tolerance = 0.5 * 10**-PRECISION_DECIMALS + 1e-9
    report = sr.content
    evidence = {uid for _, _, uid, _ in sr.get_evidence(current_procedure_only=True)}
    assert evidence == {source.SOPInstanceUID} | ({seg.SOPInstanceUID} if seg is not None else set())

    (observer,) = report.get_observer_contexts(observer_type=pydicom_codes.DCM.Device)
    device = observer.observer_identifying_attributes
    assert device.uid == uids.device_observer_uid(model_version)
    assert device.name == "cxrnode" and device.model_name == model_version
    assert opacity_present(sr) == finding.opacity_present

    image_group = image_level_group(sr)
    assert image_group.finding_type == writer_codes.OPACITY
    assert measurement_value(image_group, writer_codes.CERTAINTY_OF_FINDING) == pytest.approx(
        100 * finding.opacity_probability, abs=tolerance
    )
    sides = (
        (writer_codes.RIGHT, finding.severity.right, finding.extent.right),
        (writer_codes.LEFT, finding.severity.left, finding.extent.left),
        (writer_codes.BILATERAL, finding.severity.total, finding.extent.total),
    )
    for laterality, percent, score in sides:
        assert measurement_value(image_group, writer_codes.EXTENT, laterality) == pytest.approx(percent, abs=tolerance)
        assert measurement_value(image_group, writer_codes.GEOGRAPHIC_EXTENT_SCORE, laterality) == score
    if seg is None:  # the whole image is the region, so the group has no area (the opacity's is the SEG's)
        assert image_group.tracking_identifier == IMAGE_TRACKING_IDENTIFIER
        assert image_group.tracking_uid not in {g.tracking_uid for g in box_groups(sr)}
        assert image_group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        np.testing.assert_array_equal(image_group.roi.value, whole_image_polyline(*finding.image_shape))
        image = image_group.roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert (image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID) == (
            source.SOPClassUID,
            source.SOPInstanceUID,
        )
        assert measurement_value(image_group, writer_codes.AREA) is None
        assert [s.laterality for s in image_group.finding_sites] == [None]

    boxes = box_groups(sr)
    assert len(boxes) == len(finding.opacities) == len(box_and_image_groups(sr)) - (seg is None)
    for number, (group, opacity) in enumerate(zip(boxes, finding.opacities, strict=True), start=1):
        assert group.tracking_identifier == f"Lung opacity {number}"
        assert group.finding_type == writer_codes.OPACITY
        region = group.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        # Graphic Data is FL: the box survives to float32 precision.
        np.testing.assert_array_equal(region.value, box_polyline(opacity.box).astype(np.float32))
        image = region.ContentSequence[0].ReferencedSOPSequence[0]  # SELECTED FROM: the source image
        assert image.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert image.ReferencedSOPClassUID == source.SOPClassUID
        assert measurement_value(group, writer_codes.CERTAINTY_OF_FINDING) == pytest.approx(
            100 * opacity.score, abs=tolerance
        )
        area = measurement_value(group, writer_codes.AREA)
        if spacing is None:
            assert area is None
        else:
            x0, y0, x1, y1 = opacity.box
            assert area == pytest.approx((x1 - x0) * (y1 - y0) * spacing[0] * spacing[1], abs=tolerance)

    segments = report.get_planar_roi_measurement_groups(reference_type=pydicom_codes.DCM.ReferencedSegmentationFrame)
    if seg is None:
        assert segments == []
        return
    masks = {
        OPACITY_SEGMENT: finding.opacity_mask,
        RIGHT_LUNG_SEGMENT: finding.right_lung,
        LEFT_LUNG_SEGMENT: finding.left_lung,
    }
    seg_tracking = {int(s.SegmentNumber): (s.TrackingID, s.TrackingUID) for s in seg.SegmentSequence}
    frames = {
        int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber): index
        for index, item in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1)
    }
    # One group per segment, the empty opacity segment of a negative image included.
    assert len(segments) == len(seg.SegmentSequence) == 3
    for group in segments:
        (number,) = [n for n, (label, _) in seg_tracking.items() if label == group.tracking_identifier]
        assert group.tracking_uid == seg_tracking[number][1]
        reference = group.referenced_segmentation_frame
        frame_item = reference[0].ReferencedSOPSequence[0]
        assert frame_item.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert [int(f) for f in np.atleast_1d(frame_item.ReferencedFrameNumber)] == [frames[number]]
        assert "ReferencedSegmentNumber" not in frame_item  # the frame is the reference (PS3.3 Table 10-3)
        assert reference[1].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        area = measurement_value(group, writer_codes.AREA)
        if spacing is None:
            assert area is None
        else:
            assert area == pytest.approx(masks[number].sum() * spacing[0] * spacing[1], abs=tolerance)


def check_close(source: Dataset, finding: Finding, seg: hd.seg.Segmentation, sr: hd.sr.EnhancedSR) -> None:
    """The SEG and SR say what `finding` says, up to floating-point differences: the same image run by itself and
    in a batch with others gives results that differ in the last bits (the math library picks other kernels for
    other batch sizes), which can move a box by a millionth of a pixel and a mask by a pixel at its edge."""
    pixels = seg.get_pixels_by_source_instance(
        [source.SOPInstanceUID], segment_numbers=[OPACITY_SEGMENT, RIGHT_LUNG_SEGMENT, LEFT_LUNG_SEGMENT]
    )[0]
    for index, mask in enumerate((finding.opacity_mask, finding.right_lung, finding.left_lung)):
        differing = int(np.count_nonzero(pixels[:, :, index].astype(bool) != mask))
        assert differing <= max(10, 0.001 * mask.sum()), f"segment {index + 1}: {differing} pixels differ"
    boxes = np.array([g.roi.value[[0, 2]].reshape(-1) for g in box_groups(sr)], dtype=np.float64).reshape(-1, 4)
    assert boxes.shape == finding.boxes.shape
    np.testing.assert_allclose(boxes, finding.boxes, atol=0.01)
    image_group = image_level_group(sr)
    for laterality, percent, score in (
        (writer_codes.RIGHT, finding.severity.right, finding.extent.right),
        (writer_codes.LEFT, finding.severity.left, finding.extent.left),
        (writer_codes.BILATERAL, finding.severity.total, finding.extent.total),
    ):
        assert measurement_value(image_group, writer_codes.EXTENT, laterality) == pytest.approx(percent, abs=0.05)
        assert measurement_value(image_group, writer_codes.GEOGRAPHIC_EXTENT_SCORE, laterality) == score
    evidence = {uid for _, _, uid, _ in sr.get_evidence(current_procedure_only=True)}
    assert evidence == {source.SOPInstanceUID, seg.SOPInstanceUID}
