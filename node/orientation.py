"""Patient orientation: bring a frontal chest radiograph to the standard display before the models, and their
Finding back to the stored pixel grid afterwards.

PS3.3 C.7.6.1.1.1: Patient Orientation (0020,0020) holds two values, "the anatomical direction of the positive row
axis (left to right) and the positive column axis (top to bottom)", in the letters A (anterior), P (posterior),
R (right), L (left), H (head), F (foot); "the letters shall be ordered with the principal orientation designated in
the first character" (one or two more letters refine an oblique direction).

The standard display of a frontal (PA or AP) chest radiograph is the one a radiologist reads: as if facing the
patient, the patient's right on the image's left and the head up, i.e. Patient Orientation `L\\F` (rows run to the
patient's left, columns to the feet). The models are trained on that picture: the lung segmenter labels the lung on
the image's left as the right lung. A grid stored otherwise is one of the 8 flips and rotations of it (the symmetries
of a rectangle): `R\\F` mirrored, `L\\H` upside down, `R\\H` turned 180°, `F\\R` / `H\\L` / `F\\L` / `H\\R` transposed
and turned 90° one way or the other. The principal letters decide; a principal A or P describes no frontal
image (a lateral view), and, like an absent, empty or malformed value, is unusable: the standard display is assumed,
and the `Orientation` carries a note that the writers put in the SR and the worker logs.

View Position (0018,5101) PA and AP are displayed alike (it names the projection, not the display), so it does not
change the transform; it is read to say, in the note, what the orientation contradicts. Image Laterality
(0020,0062) of a chest is U (unpaired) or B (both) and says nothing about the pixel grid; it is not used.

    orientation = display_orientation(source)           # from the source's header
    display = to_display(pixels, orientation.transform)  # what the models see
    finding = finding_to_stored(predictor.predict([display])[0], orientation.transform)  # on the stored grid
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from pydicom import Dataset

from models.finding import Finding

STANDARD = ("L", "F")
"""Patient Orientation of the standard display of a frontal chest radiograph: rows to the patient's left, columns to
the feet."""

LETTERS = frozenset("APRLHF")
OPPOSITE = {"L": "R", "R": "L", "H": "F", "F": "H", "A": "P", "P": "A"}


@dataclass(frozen=True)
class DisplayTransform:
    """stored grid → standard display: transpose first (when set), then flip the rows' order (up-down), then the
    columns' order (left-right). The 8 combinations are the 8 flips and rotations of a pixel grid."""

    transpose: bool = False
    flip_up_down: bool = False
    flip_left_right: bool = False

    @property
    def is_identity(self) -> bool:
        return not (self.transpose or self.flip_up_down or self.flip_left_right)

    def stored_orientation(self) -> tuple[str, str]:
        """The Patient Orientation of a stored grid that this transform brings to the standard display."""
        left_right = "R" if self.flip_left_right else "L"
        head_foot = "H" if self.flip_up_down else "F"
        return (head_foot, left_right) if self.transpose else (left_right, head_foot)


IDENTITY = DisplayTransform()

ALL_TRANSFORMS = tuple(
    DisplayTransform(transpose, up_down, left_right)
    for transpose in (False, True)
    for up_down in (False, True)
    for left_right in (False, True)
)
"""The 8 transforms, identity first."""


@dataclass(frozen=True)
class Orientation:
    """How one source's pixels reach the standard display, and why."""

    transform: DisplayTransform
    patient_orientation: str
    """The source's Patient Orientation as read (values joined by a backslash; empty when absent)."""
    note: str | None = None
    """Set when the standard display was assumed (no usable Patient Orientation): what was wrong. The SR carries it."""


class OrientationError(ValueError):
    """A Patient Orientation that does not describe a frontal radiograph's pixel grid."""


def parse_patient_orientation(values: Sequence[str]) -> DisplayTransform:
    """The transform from a grid with Patient Orientation `values` (row direction, column direction) to the standard
    display. Raises OrientationError naming what is wrong: not two values, a letter outside A P R L H F, A or P as
    the principal direction (not a frontal image), or both values along one axis."""
    if len(values) != 2:
        raise OrientationError(f"Patient Orientation has {len(values)} value(s), not 2 (row and column direction)")
    principal = []
    for value in values:
        text = str(value).strip().upper()
        if not text or not set(text) <= LETTERS or len(text) > 3:
            raise OrientationError(f"Patient Orientation value {value!r} is not 1-3 of the letters A P R L H F")
        principal.append(text[0])
    row, column = principal
    if {row, column} & {"A", "P"}:
        raise OrientationError(
            f"Patient Orientation {row}\\{column} has an anterior/posterior direction in the image plane: "
            "not a frontal (PA/AP) image"
        )
    if OPPOSITE[row] == column or row == column:
        raise OrientationError(f"Patient Orientation {row}\\{column} names one axis twice")
    if row in "LR":  # rows along the patient's left-right axis: no transpose
        return DisplayTransform(False, flip_up_down=column == "H", flip_left_right=row == "R")
    # rows along head-foot: after the transpose the stored columns' direction runs along the rows
    return DisplayTransform(True, flip_up_down=row == "H", flip_left_right=column == "R")


def display_orientation(source: Dataset) -> Orientation:
    """Read Patient Orientation (and View Position, for the note) of `source`; never raises for a bad value: the
    standard display is assumed and the note says why."""
    values = _orientation_values(source.get("PatientOrientation"))
    read = "\\".join(values)
    view = str(source.get("ViewPosition", "") or "").strip().upper()
    if not values:
        return Orientation(IDENTITY, read, "Patient Orientation absent; the standard display (L\\F) was assumed")
    try:
        return Orientation(parse_patient_orientation(values), read)
    except OrientationError as error:
        seen = f" on a View Position {view} image" if view else ""
        return Orientation(IDENTITY, read, f"{error}{seen}; the standard display (L\\F) was assumed")


def _orientation_values(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        items = value.split("\\") if value.strip() else []
    elif isinstance(value, Sequence):
        items = [str(item) for item in value]
    else:
        items = [str(value)]
    return [item.strip() for item in items] if any(item.strip() for item in items) else []


# -- arrays, points, boxes, findings ----------------------------------------------------------------------------------


def to_display(array: np.ndarray, transform: DisplayTransform) -> np.ndarray:
    """A (rows, columns, ...) array on the stored grid → on the display grid (a contiguous copy, or `array` itself
    for the identity)."""
    if transform.is_identity:
        return array
    out = np.swapaxes(array, 0, 1) if transform.transpose else array
    if transform.flip_up_down:
        out = out[::-1]
    if transform.flip_left_right:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def to_stored(array: np.ndarray, transform: DisplayTransform) -> np.ndarray:
    """The inverse of `to_display`: a display-grid array → on the stored grid."""
    if transform.is_identity:
        return array
    out = array[:, ::-1] if transform.flip_left_right else array
    if transform.flip_up_down:
        out = out[::-1]
    if transform.transpose:
        out = np.swapaxes(out, 0, 1)
    return np.ascontiguousarray(out)


def display_shape(stored_shape: tuple[int, int], transform: DisplayTransform) -> tuple[int, int]:
    rows, columns = stored_shape
    return (columns, rows) if transform.transpose else (rows, columns)


def point_to_stored(x: float, y: float, display: tuple[int, int], transform: DisplayTransform) -> tuple[float, float]:
    """A point (column x, row y; origin at the top-left corner of the top-left pixel) on a display grid of shape
    `display` (rows, columns) → the same point on the stored grid."""
    rows, columns = display
    if transform.flip_left_right:
        x = columns - x
    if transform.flip_up_down:
        y = rows - y
    return (y, x) if transform.transpose else (x, y)


def box_to_stored(
    box: tuple[float, float, float, float], display: tuple[int, int], transform: DisplayTransform
) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) on the display grid (x1/y1 exclusive edges) → the same box on the stored grid."""
    xa, ya = point_to_stored(box[0], box[1], display, transform)
    xb, yb = point_to_stored(box[2], box[3], display, transform)
    return (min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb))


def finding_to_stored(finding: Finding, transform: DisplayTransform) -> Finding:
    """A Finding the models made on the display grid → the same Finding on the stored grid: masks and boxes moved,
    right and left still the patient's, the numbers (severity, extent, scores) unchanged (the transform only
    permutes pixels)."""
    if transform.is_identity:
        return finding
    display = finding.image_shape
    opacities = tuple(
        replace(o, box=box_to_stored(o.box, display, transform), mask=to_stored(o.mask, transform))
        for o in finding.opacities
    )
    return replace(
        finding,
        image_shape=display_shape(display, transform),  # the transpose is its own inverse on shapes
        opacities=opacities,
        right_lung=to_stored(finding.right_lung, transform),
        left_lung=to_stored(finding.left_lung, transform),
    )


__all__ = [
    "ALL_TRANSFORMS",
    "IDENTITY",
    "STANDARD",
    "DisplayTransform",
    "Orientation",
    "OrientationError",
    "box_to_stored",
    "display_orientation",
    "display_shape",
    "finding_to_stored",
    "parse_patient_orientation",
    "point_to_stored",
    "to_display",
    "to_stored",
]
