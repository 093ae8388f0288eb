"""Grayscale Softcopy Presentation State (GSPS) of one chest radiograph: the finding drawn over the source image.

A viewer that supports presentation states draws it over the original pixels, with nothing burned in.
Graphic layers, bottom to top (each with a recommended grayscale value and a CIELab colour, the overlay's colours):

=============== ===================================================================== ============= ==========
layer           content                                                               units         colour
=============== ===================================================================== ============= ==========
OPACITY_OUTLINE the edge of the opacity mask: one closed POLYLINE per 8-connected     PIXEL         orange-red
                component (outer edge, along pixel borders, at most 200 points)
OPACITY_BOX     each reported opacity's box: a closed POLYLINE of 5 points (the same  PIXEL         yellow
                as the SR's SCOORD), tracked with the SR group's Tracking UID
OPACITY_LABEL   "Lung opacity 0.87" per box, just above it (inside it at the top)     PIXEL         yellow
SUMMARY         "Opacity present p=0.91 | severity 23.4% (R 30.1%, L 15.2%) |         DISPLAY       white
                extent 4/8 (R 3, L 1)" at the top, a disclaimer at the bottom
=============== ===================================================================== ============= ==========

Boxes are POLYLINEs because Graphic Type (0070,0023) has no rectangle (POINT, POLYLINE, INTERPOLATED, CIRCLE,
ELLIPSE). A layer is declared only when an annotation uses it: an image without opacity gets the summary alone.

How the pixels are shown is the source's own:
- Modality LUT: the source's rescale (highdicom copies it) or Modality LUT Sequence;
- VOI: one LUT or one window, as PS3.3 C.11.8 allows: the source's first VOI LUT, else its first window (Window
  Center/Width, explanation, VOI LUT Function), the view the models were given (`models.data.dicom`) and the one a
  viewer shows first; a source with neither gets the full range of its Bits Stored (through the rescale), unless the
  caller gives a window (e.g. one computed from the decoded pixels): the writers never decode pixels;
- Presentation LUT Shape INVERSE for a MONOCHROME1 source, IDENTITY otherwise: the presentation-state pipeline
  ignores Photometric Interpretation (PS3.4 N.2), so INVERSE is what keeps a MONOCHROME1 image's polarity;
- Presentation Pixel Aspect Ratio from the source's Pixel Aspect Ratio or pixel spacing (highdicom writes 1:1).
"""

from __future__ import annotations

import datetime
import logging
from fractions import Fraction

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from models.finding import Finding
from node.overlay import BOX_COLOUR, OPACITY_COLOUR
from node.writers import (  # noqa: F401 (body_part_examined: node.writers.sc takes it from here)
    body_part_examined,
    check_finding,
    cxrnode_version,
    options_token,
    pin_clock_values,
    result_key,
    source_header,
    source_instance_number,
    uids,
)
from node.writers import sr as sr_writer

logger = logging.getLogger(__name__)

KIND = "gsps"
"""The `kind` of the GSPS's UIDs (`uids.ResultKey.instance_uid`, `uids.ResultKey.series_uid`)."""

DEFAULT_SERIES_NUMBER = 7703
"""Series Number of cxrnode's GSPS series (one per study and model version)."""

CONTENT_LABEL = "CXRNODE"
"""Content Label (CS): the name viewers list the presentation state under."""

MAX_OUTLINE_POINTS = 200
"""Most points of one outline polyline (first = last included)."""

OUTLINE_TOLERANCE_PX = 1.0
"""Douglas-Peucker tolerance of the outlines: no pixel-border corner left out lies farther than this (raised until
a component's polyline has at most MAX_OUTLINE_POINTS points)."""

_TOLERANCE_STEP = 1.25  # how fast the tolerance grows: in small steps, so the outline stays as close as it can

OUTLINE_LAYER = "OPACITY_OUTLINE"
BOX_LAYER = "OPACITY_BOX"
LABEL_LAYER = "OPACITY_LABEL"
SUMMARY_LAYER = "SUMMARY"

_WHITE = 0xFFFF  # Graphic Layer Recommended Display Grayscale Value: a P-value, 0xFFFF = white
_LAYERS = {  # name: (order, description, grayscale P-value, sRGB colour)
    OUTLINE_LAYER: (1, "Edge of the lung opacity found", 0xC000, OPACITY_COLOUR),
    BOX_LAYER: (2, "Box of each lung opacity found", _WHITE, BOX_COLOUR),
    LABEL_LAYER: (3, "Detector score of each lung opacity", _WHITE, BOX_COLOUR),
    SUMMARY_LAYER: (4, "Opacity probability, severity and extent score", _WHITE, (255, 255, 255)),
}

# Text sizes in the image: label line height as a share of the image height (at least a few pixels), and the
# width of one character as a share of the line height (a typical sans-serif font).
_LABEL_HEIGHT_SHARE = 1 / 40
_MIN_LABEL_HEIGHT_PX = 8.0
_CHARACTER_WIDTH_SHARE = 0.6
_SUMMARY_BOX = (0.01, 0.01, 0.99, 0.05)  # DISPLAY units: the top of the displayed area
_DISCLAIMER_BOX = (0.01, 0.95, 0.99, 0.99)  # and its bottom
_DISCLAIMER = "cxrnode AI result - not for diagnostic use"


def presentation_state(
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
    window: tuple[float, float] | None = None,
    max_outline_points: int = MAX_OUTLINE_POINTS,
    key: uids.ResultKey | None = None,
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """The GSPS that draws `finding` over `source` (a single-frame CR, DX or SC image; its pixel data is not read).

    Identity: SOP Instance UID `key.instance_uid("gsps", options)`, in the series `key.series_uid("gsps")` (see
    `node.writers.uids`; the options are this call's keyword arguments); same patient and study as the source.
    `instance_number` defaults to the source's Instance Number (else 1). `content_datetime` (default: now) becomes
    Presentation Creation Date/Time and every other date/time highdicom would take from the clock.
    `window` (center, width) replaces the source's VOI; without it the source's is used (see the module docstring).

    Raises `node.writers.SourceImageError` for an unsupported source, ValueError when the finding does not fit it.
    """
    header = source_header(source)
    check_finding(header, finding)
    if int(header.get("SamplesPerPixel", 1)) != 1:
        raise ValueError(f"Source image has {header.SamplesPerPixel} samples per pixel; a GSPS needs grayscale.")
    if window is not None and not float(window[1]) > 0:
        raise ValueError(f'Argument "window" {window} must be (center, width) with a positive width.')
    if max_outline_points < 8:
        raise ValueError(f'Argument "max_outline_points" must be at least 8, not {max_outline_points}.')
    if content_datetime is None:
        content_datetime = datetime.datetime.now()
    model_version = finding.model_version
    software_version = software_version or cxrnode_version()
    key = result_key(source, finding, key, software_version)
    sop_instance_uid = key.instance_uid(
        KIND,
        options_token(
            algorithm_name=algorithm_name,
            manufacturer=manufacturer,
            device_serial_number=device_serial_number,
            series_number=series_number,
            instance_number=instance_number,
            series_description=series_description,
            window=window,
            max_outline_points=max_outline_points,
        ),
    )

    annotations = _annotations(header, key, finding, max_outline_points)
    used = {annotation.GraphicLayer for annotation in annotations}
    layers = [_layer(name) for name in _LAYERS if name in used]

    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[header],
        series_instance_uid=key.series_uid(KIND),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number if instance_number is not None else source_instance_number(header),
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm_name,
        software_versions=software_version,
        device_serial_number=device_serial_number or uids.device_serial_number(software_version, model_version),
        content_label=CONTENT_LABEL,
        content_description=_content_description(algorithm_name, model_version),
        graphic_annotations=annotations,
        graphic_layers=layers,
        modality_lut_transformation=_modality_lut(header),
        voi_lut_transformations=[_voi(header, window)],
        presentation_lut_transformation=hd.PresentationLUTTransformation(
            presentation_lut_shape=presentation_lut_shape(header)
        ),
        series_description=series_description or f"{algorithm_name} lung opacity annotations",
    )
    gsps.DisplayedAreaSelectionSequence[0].PresentationPixelAspectRatio = presentation_pixel_aspect_ratio(header)
    gsps.BodyPartExamined = body_part_examined(header)
    gsps.PresentationCreationDate = content_datetime.strftime("%Y%m%d")
    gsps.PresentationCreationTime = content_datetime.strftime("%H%M%S.%f")
    pin_clock_values(gsps, content_datetime)
    return gsps


def presentation_lut_shape(header: Dataset) -> str:
    """INVERSE for a MONOCHROME1 image (minimum value white), IDENTITY for MONOCHROME2."""
    return "INVERSE" if str(header.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1" else "IDENTITY"


def presentation_pixel_aspect_ratio(header: Dataset) -> list[int]:
    """Presentation Pixel Aspect Ratio (row : column size of a pixel): the source's Pixel Aspect Ratio, else the
    ratio of its Pixel Spacing (or Imager Pixel Spacing), else 1:1."""
    ratio = header.get("PixelAspectRatio")
    if ratio is not None and len(ratio) == 2 and int(ratio[0]) > 0 and int(ratio[1]) > 0:
        return [int(ratio[0]), int(ratio[1])]
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = header.get(keyword)
        if spacing is not None and len(spacing) == 2 and float(spacing[0]) > 0 and float(spacing[1]) > 0:
            fraction = Fraction(float(spacing[0]) / float(spacing[1])).limit_denominator(1000)
            return [fraction.numerator, fraction.denominator]
    return [1, 1]


# --- Annotations ---------------------------------------------------------------------------------------------------


def _annotations(
    header: Dataset, key: uids.ResultKey, finding: Finding, max_outline_points: int
) -> list[hd.pr.GraphicAnnotation]:
    layers = {name: _layer(name) for name in _LAYERS}
    annotations = []
    outlines = [
        hd.pr.GraphicObject(
            graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
            graphic_data=polyline,
            units=hd.pr.AnnotationUnitsValues.PIXEL,
        )
        for polyline in outline_polylines(finding.opacity_mask, max_outline_points)
    ]
    if outlines:
        annotations.append(hd.pr.GraphicAnnotation([header], layers[OUTLINE_LAYER], graphic_objects=outlines))
    boxes, labels = [], []
    rows, columns = finding.image_shape
    for number, opacity in enumerate(finding.opacities, start=1):
        x0, y0, x1, y1 = opacity.box
        if not (0 <= x0 < x1 <= columns and 0 <= y0 < y1 <= rows):
            raise ValueError(
                f"Opacity {number} box {opacity.box} is not a non-empty box inside the {rows}x{columns} image."
            )
        tracking = {
            "tracking_id": sr_writer.opacity_tracking_identifier(number),
            # The SR's group of the same opacity carries this Tracking UID: a viewer can tie the two together.
            "tracking_uid": sr_writer.opacity_tracking_uid(key, number),
        }
        boxes.append(
            hd.pr.GraphicObject(
                graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                graphic_data=sr_writer.box_polyline(opacity.box),
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                **tracking,
            )
        )
        text = opacity_label(opacity.score)
        labels.append(
            hd.pr.TextObject(
                text_value=text,
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                bounding_box=_label_box(opacity.box, text, rows, columns),
                anchor_point=(float(x0), float(y0)),
                anchor_point_visible=False,
                text_justification=hd.pr.TextJustificationValues.LEFT,
                **tracking,
            )
        )
    if boxes:
        annotations.append(hd.pr.GraphicAnnotation([header], layers[BOX_LAYER], graphic_objects=boxes))
        annotations.append(hd.pr.GraphicAnnotation([header], layers[LABEL_LAYER], text_objects=labels))
    summary = [
        hd.pr.TextObject(
            text_value=summary_text(finding),
            units=hd.pr.AnnotationUnitsValues.DISPLAY,
            bounding_box=_SUMMARY_BOX,
            text_justification=hd.pr.TextJustificationValues.LEFT,
        ),
        hd.pr.TextObject(
            text_value=_DISCLAIMER,
            units=hd.pr.AnnotationUnitsValues.DISPLAY,
            bounding_box=_DISCLAIMER_BOX,
            text_justification=hd.pr.TextJustificationValues.LEFT,
        ),
    ]
    annotations.append(hd.pr.GraphicAnnotation([header], layers[SUMMARY_LAYER], text_objects=summary))
    return annotations


def opacity_label(score: float) -> str:
    """The label of one opacity box, e.g. "Lung opacity 0.87"."""
    return f"Lung opacity {score:.2f}"


def summary_text(finding: Finding) -> str:
    """The image-level line, e.g. "Opacity present p=0.91 | severity 23.4% (R 30.1%, L 15.2%) | extent 4/8 (R 3,
    L 1)" (R and L: the patient's lungs)."""
    severity, extent = finding.severity, finding.extent
    return (
        f"Opacity {'present' if finding.opacity_present else 'absent'} p={finding.opacity_probability:.2f} | "
        f"severity {severity.total:.1f}% (R {severity.right:.1f}%, L {severity.left:.1f}%) | "
        f"extent {extent.total}/8 (R {extent.right}, L {extent.left})"
    )


def _label_box(
    box: tuple[float, float, float, float], text: str, rows: int, columns: int
) -> tuple[float, float, float, float]:
    """Where a box's label goes (left, top, right, bottom in pixels): on the line just above the box, starting at
    its left edge, or inside its top when the box touches the top of the image; always inside the image."""
    x0, y0 = float(box[0]), float(box[1])
    height = min(max(rows * _LABEL_HEIGHT_SHARE, _MIN_LABEL_HEIGHT_PX), float(rows))
    width = min(len(text) * height * _CHARACTER_WIDTH_SHARE, float(columns))
    left = min(x0, columns - width)
    top = y0 - height if y0 >= height else min(y0, rows - height)
    return left, top, left + width, top + height


def _layer(name: str) -> hd.pr.GraphicLayer:
    order, description, grayscale, rgb = _LAYERS[name]
    layer = hd.pr.GraphicLayer(
        layer_name=name, order=order, description=description, display_color=hd.color.CIELabColor.from_rgb(*rgb)
    )
    layer.GraphicLayerRecommendedDisplayGrayscaleValue = grayscale
    return layer


def _content_description(algorithm_name: str, model_version: str) -> str:
    description = f"Lung opacity by {algorithm_name} {model_version}"
    return description if len(description) <= 64 else description[:61] + "..."  # LO holds 64 characters


# --- Outlines ------------------------------------------------------------------------------------------------------


def outline_polylines(mask: np.ndarray, max_points: int = MAX_OUTLINE_POINTS) -> list[np.ndarray]:
    """The outer edge of each 8-connected component of `mask` as a closed polyline: an (N, 2) float array of
    (column, row) points in PIXEL units (origin at the top-left corner of the top-left pixel), first = last.

    The edge runs along pixel borders (a component's holes are filled first), so every vertex is a corner of one of
    its boundary pixels; Douglas-Peucker keeps the corners that matter (tolerance OUTLINE_TOLERANCE_PX, raised in
    steps of 25 % until at most `max_points` points remain). Components come in raster order of their first pixel.
    """
    if mask.ndim != 2:
        raise ValueError(f'Argument "mask" must be 2-D, not of shape {mask.shape}.')
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    polylines = []
    for number, window in enumerate(ndimage.find_objects(labels), start=1):
        if window is None:
            continue
        component = ndimage.binary_fill_holes(labels[window] == number)
        corners = _trace_outer_edge(component) + np.array([window[1].start, window[0].start])
        ring = _simplify_ring(corners.astype(np.float64), max_points)
        polylines.append(np.vstack([ring, ring[:1]]))
    return polylines


def _trace_outer_edge(component: np.ndarray) -> np.ndarray:
    """The corners (x, y) of the outer edge of one 8-connected component without holes, clockwise on screen (the
    component on the right), starting at the top-left corner of its first pixel; the first is not repeated.

    Every pixel border between the component and the outside is a directed edge, clockwise around its pixel. At a
    corner shared by two diagonal pixels of the component (two edges leave it), the walk turns left, onto the other
    pixel: that is what makes them one 8-connected outline.
    """
    padded = np.pad(component, 1)
    inside = padded[1:-1, 1:-1]
    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = {}
    sides = (  # (outside neighbour, edge start (dx, dy), edge end (dx, dy)) relative to the pixel's top-left corner
        (padded[:-2, 1:-1], (0, 0), (1, 0)),  # top, heading right
        (padded[1:-1, 2:], (1, 0), (1, 1)),  # right, heading down
        (padded[2:, 1:-1], (1, 1), (0, 1)),  # bottom, heading left
        (padded[1:-1, :-2], (0, 1), (0, 0)),  # left, heading up
    )
    for neighbour, (sx, sy), (ex, ey) in sides:
        for row, column in zip(*np.nonzero(inside & ~neighbour), strict=True):
            outgoing.setdefault((int(column) + sx, int(row) + sy), []).append((int(column) + ex, int(row) + ey))

    first_row, first_column = (int(v[0]) for v in np.nonzero(inside))
    start = (first_column, first_row)
    corners = [start]
    previous, current = start, (first_column + 1, first_row)
    outgoing[start].remove(current)
    while current != start:
        heading = (current[0] - previous[0], current[1] - previous[1])
        candidates = outgoing[current]
        left = (current[0] + heading[1], current[1] - heading[0])
        following = left if len(candidates) > 1 and left in candidates else candidates[0]
        candidates.remove(following)
        if (following[0] - current[0], following[1] - current[1]) != heading:
            corners.append(current)  # a corner; points along a straight run are left out
        previous, current = current, following
    return np.array(corners, dtype=np.int64)


def _simplify_ring(ring: np.ndarray, max_points: int) -> np.ndarray:
    """Douglas-Peucker on a closed ring (first not repeated), leaving at most `max_points - 1` points (and never
    fewer than 3, so the polyline stays an area)."""
    tolerance = OUTLINE_TOLERANCE_PX
    simplified = ring
    while True:
        candidate = _douglas_peucker_ring(ring, tolerance)
        if len(candidate) < 3:
            break
        simplified = candidate
        if len(simplified) < max_points:
            break
        tolerance *= _TOLERANCE_STEP
    if len(simplified) >= max_points:  # only where no tolerance gives 3 to max_points - 1 points: evenly spaced
        simplified = simplified[np.linspace(0, len(simplified) - 1, max_points - 1).astype(int)]
    return simplified


def _douglas_peucker_ring(ring: np.ndarray, tolerance: float) -> np.ndarray:
    if len(ring) <= 3:
        return ring
    far = int(np.argmax(np.hypot(*(ring - ring[0]).T)))
    chain = np.vstack([ring, ring[:1]])  # split at the first point and the one farthest from it
    keep = np.zeros(len(chain), dtype=bool)
    keep[[0, far, len(chain) - 1]] = True
    stack = [(0, far), (far, len(chain) - 1)]
    while stack:
        i, j = stack.pop()
        if j <= i + 1:
            continue
        distances = _distance_to_segment(chain[i + 1 : j], chain[i], chain[j])
        k = int(np.argmax(distances))
        if distances[k] > tolerance:
            keep[i + 1 + k] = True
            stack += [(i, i + 1 + k), (i + 1 + k, j)]
    return chain[:-1][keep[:-1]]


def _distance_to_segment(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    direction = b - a
    length_squared = float(direction @ direction)
    if length_squared == 0.0:
        return np.hypot(*(points - a).T)
    t = np.clip((points - a) @ direction / length_squared, 0.0, 1.0)
    return np.hypot(*(points - (a + t[:, None] * direction)).T)


# --- Grayscale pipeline --------------------------------------------------------------------------------------------


def _modality_lut(header: Dataset) -> hd.ModalityLUTTransformation | None:
    """The source's Modality LUT Sequence; None leaves its rescale (if any) to highdicom, which copies it."""
    if "RescaleSlope" in header or not header.get("ModalityLUTSequence"):
        return None
    item = header.ModalityLUTSequence[0]
    first, data = _lut_first_and_data(item)
    return hd.ModalityLUTTransformation(
        modality_lut=hd.ModalityLUT(
            lut_type=str(item.get("ModalityLUTType") or "US"),
            first_mapped_value=first,
            lut_data=data,
            lut_explanation=item.get("LUTExplanation") or None,
        )
    )


def _voi(header: Dataset, window: tuple[float, float] | None) -> hd.pr.SoftcopyVOILUTTransformation:
    """The VOI stage, one LUT or one window (PS3.3 C.11.8 allows no more per image): `window`, else the source's
    first VOI LUT, else its first window (the view `models.data.dicom` prepares for the models, and a viewer shows
    first), else the full range of Bits Stored."""
    if window is not None:
        return _window(float(window[0]), float(window[1]), "cxrnode display window")
    if header.get("VOILUTSequence"):
        item = header.VOILUTSequence[0]
        first, data = _lut_first_and_data(item)
        return hd.pr.SoftcopyVOILUTTransformation(
            voi_luts=[
                hd.VOILUT(first_mapped_value=first, lut_data=data, lut_explanation=item.get("LUTExplanation") or None)
            ]
        )
    centers = _values(header.get("WindowCenter"))
    widths = _values(header.get("WindowWidth"))
    if centers and widths and widths[0] > 0:
        explanations = _values(header.get("WindowCenterWidthExplanation"), str)
        function = str(header.get("VOILUTFunction") or "").strip() or None
        return _window(centers[0], widths[0], explanations[0] if explanations else None, function)
    if centers or widths:
        logger.warning(
            "Source %s: Window Center %s / Width %s are unusable; the GSPS does not use them.",
            header.SOPInstanceUID,
            centers,
            widths,
        )
    center, width = full_range_window(header)
    logger.info(
        "Source %s has no VOI window or LUT; the GSPS shows the full range of its %s stored bits.",
        header.SOPInstanceUID,
        header.get("BitsStored"),
    )
    return _window(center, width, "Full range of Bits Stored")


def _window(
    center: float, width: float, explanation: str | None, function: str | None = None
) -> hd.pr.SoftcopyVOILUTTransformation:
    # Lists, not numbers: highdicom 0.28 turns a lone explanation string into a list of its characters.
    return hd.pr.SoftcopyVOILUTTransformation(
        window_center=[center],
        window_width=[width],
        window_explanation=[explanation] if explanation else None,
        voi_lut_function=function,
    )


def full_range_window(header: Dataset) -> tuple[float, float]:
    """(center, width) of a window spanning every value Bits Stored allows, after the source's rescale."""
    bits = int(header.get("BitsStored") or header.get("BitsAllocated") or 8)
    if int(header.get("PixelRepresentation") or 0) == 1:
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        low, high = 0, (1 << bits) - 1
    slope = float(header.get("RescaleSlope") or 1.0)
    intercept = float(header.get("RescaleIntercept") or 0.0)
    low, high = sorted((low * slope + intercept, high * slope + intercept))
    step = abs(slope)  # one stored step, so that LINEAR maps the lowest value to black and the highest to white
    return (low + high + step) / 2, high - low + step


def _lut_first_and_data(item: Dataset) -> tuple[int, np.ndarray]:
    """First Mapped Value and the entries of a LUT item (LUT Data as US values or OW bytes, 8 or 16 bits each).

    The First Mapped Value is kept as it is stored (a negative one of signed pixel data reads as US), so the copy
    says the same as the source."""
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    dtype = np.uint8 if bits == 8 else np.uint16
    raw = item.LUTData
    if isinstance(raw, (bytes, bytearray)):
        data = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))[:entries].astype(dtype)
    else:
        data = np.atleast_1d(np.asarray(raw, dtype=dtype))  # US values (a list, or one number)
    return first, data


def _values(value: object, kind: type = float) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [kind(value)]
    return [kind(v) for v in value]  # type: ignore[union-attr]
