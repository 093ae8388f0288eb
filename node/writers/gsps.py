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
from pydicom.dataset import Dataset

from models.finding import Finding
from node.overlay import BOX_COLOUR, OPACITY_COLOUR
from node.writers import body_part_examined, pin_clock_values, uids
from node.writers import sr as sr_writer
from node.writers.contours import MAX_OUTLINE_POINTS, outline_polylines
from node.writers.grayscale import modality_lut_transformation, presentation_lut_shape, voi_lut_transformation
from node.writers.identity import ResultNames, checked_header, result_identity

logger = logging.getLogger(__name__)

KIND = "gsps"
"""The `kind` of the GSPS's UIDs (`uids.ResultKey.instance_uid`, `uids.ResultKey.series_uid`)."""

SERIES_DESCRIPTION = "lung opacity annotations"
"""Series Description after the algorithm's name, unless the call gives one."""

DEFAULT_SERIES_NUMBER = 7703
"""Series Number of cxrnode's GSPS series (one per study and model version)."""

CONTENT_LABEL = "CXRNODE"
"""Content Label (CS): the name viewers list the presentation state under."""

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
    header = checked_header(source, finding)
    if int(header.get("SamplesPerPixel", 1)) != 1:
        raise ValueError(f"Source image has {header.SamplesPerPixel} samples per pixel; a GSPS needs grayscale.")
    if window is not None and not float(window[1]) > 0:
        raise ValueError(f'Argument "window" {window} must be (center, width) with a positive width.')
    if max_outline_points < 8:
        raise ValueError(f'Argument "max_outline_points" must be at least 8, not {max_outline_points}.')
    names = ResultNames(
        algorithm_name, manufacturer, series_number, instance_number, series_description, SERIES_DESCRIPTION
    )
    options = {
        "device_serial_number": device_serial_number,
        "window": window,
        "max_outline_points": max_outline_points,
    }
    identity = result_identity(source, header, finding, KIND, key, software_version, content_datetime, names, options)
    key, model_version = identity.key, identity.model_version

    annotations = _annotations(header, key, finding, max_outline_points)
    used = {annotation.GraphicLayer for annotation in annotations}
    layers = [_layer(name) for name in _LAYERS if name in used]

    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[header],
        **identity.highdicom_arguments(),
        device_serial_number=identity.device_serial_number,
        content_label=CONTENT_LABEL,
        content_description=_content_description(algorithm_name, model_version),
        graphic_annotations=annotations,
        graphic_layers=layers,
        modality_lut_transformation=modality_lut_transformation(header),
        voi_lut_transformations=[voi_lut_transformation(header, window)],
        presentation_lut_transformation=hd.PresentationLUTTransformation(
            presentation_lut_shape=presentation_lut_shape(header)
        ),
    )
    gsps.DisplayedAreaSelectionSequence[0].PresentationPixelAspectRatio = presentation_pixel_aspect_ratio(header)
    gsps.BodyPartExamined = body_part_examined(header)
    gsps.PresentationCreationDate = identity.content_datetime.strftime("%Y%m%d")
    gsps.PresentationCreationTime = identity.content_datetime.strftime("%H%M%S.%f")
    pin_clock_values(gsps, identity.content_datetime)
    return gsps


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
