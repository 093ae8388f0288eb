"""Lung involvement: how much of each lung the opacity covers, and the geographic-extent score.

severity % = area(opacity ∩ lung) / area(lung) × 100, per lung and for both lungs together.
The geographic-extent score follows Wong et al. (Radiology 2020) and Cohen et al. (arXiv 2005.11856):
per lung 0 = none, 1 = < 25 %, 2 = 25-50 %, 3 = 50-75 %, 4 = > 75 %; the total (0-8) is the sum.
"""

from __future__ import annotations

import numpy as np

from models.finding import ExtentScore, Severity


def involvement_percent(opacity: np.ndarray, lung: np.ndarray) -> float:
    """Percent of `lung` covered by `opacity` (both boolean masks of one shape); 0 for an empty lung."""
    if opacity.shape != lung.shape:
        raise ValueError(f"opacity mask shape {opacity.shape} differs from lung mask shape {lung.shape}")
    lung_area = int(np.count_nonzero(lung))
    if lung_area == 0:
        return 0.0
    return 100.0 * int(np.count_nonzero(opacity & lung)) / lung_area


def extent_score(percent: float) -> int:
    """Geographic-extent score of one lung from its involvement in percent (0-4)."""
    if percent <= 0.0:
        return 0
    if percent < 25.0:
        return 1
    if percent < 50.0:
        return 2
    if percent <= 75.0:
        return 3
    return 4


def lung_involvement(
    opacity: np.ndarray, right_lung: np.ndarray, left_lung: np.ndarray
) -> tuple[Severity, ExtentScore]:
    """Severity (percent) and geographic-extent score for each lung and in total."""
    opacity = opacity.astype(bool, copy=False)
    right = involvement_percent(opacity, right_lung)
    left = involvement_percent(opacity, left_lung)
    severity = Severity(right=right, left=left, total=involvement_percent(opacity, right_lung | left_lung))
    extent = ExtentScore(
        right=extent_score(right), left=extent_score(left), total=extent_score(right) + extent_score(left)
    )
    return severity, extent
