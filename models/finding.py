"""What the Predictor returns for one image: the `Finding`.

Coordinates are pixels of the image as it was passed to `Predictor.predict` (column x, row y, origin at the top-left
corner of the top-left pixel). "Right" and "left" are the patient's: on a frontal radiograph displayed in the usual
orientation (patient facing the viewer) the patient's right lung is on the image's left side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Thresholds:
    """The cut-offs that turned network outputs into this Finding."""

    score: float
    """An opacity candidate is reported when its score is at least this."""
    mask: float
    """A pixel belongs to an opacity (or a lung) when its probability is at least this."""
    present: float
    """The image is called "opacity present" when `opacity_probability` is at least this."""
    severity_mask: float | None = None
    """A pixel of a reported opacity counts towards lung involvement (`Finding.severity`) when its probability is at
    least this; None = `mask`. The masks the Finding reports keep `mask`."""

    @property
    def severity_mask_or_mask(self) -> float:
        """The pixel probability at which an opacity's pixel counts towards lung involvement."""
        return self.mask if self.severity_mask is None else self.severity_mask


@dataclass(frozen=True)
class Opacity:
    """One detected region of lung opacity."""

    box: tuple[float, float, float, float]
    """(x0, y0, x1, y1) in original pixel coordinates, x1/y1 exclusive edges."""
    score: float
    """Detector confidence in [0, 1]."""
    mask: np.ndarray = field(repr=False)
    """Boolean (rows, columns) mask at the original resolution."""


@dataclass(frozen=True)
class Severity:
    """area(opacity ∩ lung) / area(lung) × 100 for the patient's right lung, left lung and both together (percent)."""

    right: float
    left: float
    total: float


@dataclass(frozen=True)
class ExtentScore:
    """Geographic-extent score: per lung 0 none, 1 <25 %, 2 25-50 %, 3 50-75 %, 4 >75 %; total = right + left (0-8)."""

    right: int
    left: int
    total: int


@dataclass(frozen=True)
class Finding:
    """Everything the models say about one frontal chest radiograph."""

    image_shape: tuple[int, int]
    """(rows, columns) of the input image."""
    opacities: tuple[Opacity, ...]
    """Reported opacities (score >= thresholds.score), highest score first."""
    right_lung: np.ndarray = field(repr=False)
    """Boolean mask of the patient's right lung (image left on a PA/AP view)."""
    left_lung: np.ndarray = field(repr=False)
    """Boolean mask of the patient's left lung."""
    severity: Severity
    extent: ExtentScore
    opacity_probability: float
    """Image-level probability that lung opacity is present: the highest detection score (0 when none)."""
    opacity_present: bool
    """`opacity_probability >= thresholds.present`."""
    thresholds: Thresholds
    model_version: str
    """Identifies the weights that produced this Finding (name and checksum prefix)."""

    @property
    def boxes(self) -> np.ndarray:
        """(N, 4) float array of reported boxes, (x0, y0, x1, y1)."""
        return np.array([o.box for o in self.opacities], dtype=np.float64).reshape(-1, 4)

    @property
    def scores(self) -> np.ndarray:
        return np.array([o.score for o in self.opacities], dtype=np.float64)

    @property
    def opacity_mask(self) -> np.ndarray:
        """Union of the reported opacity masks (boolean, original resolution)."""
        union = np.zeros(self.image_shape, dtype=bool)
        for opacity in self.opacities:
            union |= opacity.mask
        return union
