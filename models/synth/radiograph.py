"""One synthetic radiograph: anatomy, opacities and the rendered picture put together as stored values with their
ground truth (lung and opacity masks, RSNA boxes)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.synth.anatomy import lung_masks, sample_anatomy
from models.synth.lesions import Opacity, place_opacities
from models.synth.render import render
from models.synth.stats import load_box_stats, sample_box_count

PHOTOMETRIC_INTERPRETATIONS = ("MONOCHROME1", "MONOCHROME2")
VIEW_POSITIONS = ("PA", "AP")


@dataclass(frozen=True)
class SyntheticRadiograph:
    """One synthetic frontal chest radiograph and its ground truth."""

    pixels: np.ndarray
    """2-D uint16 stored values as written to Pixel Data, in the file's polarity (inverted for MONOCHROME1),
    within 0 .. 2**bits_stored - 1."""
    bits_stored: int
    """Bits Stored, 8 to 16."""
    photometric_interpretation: str
    """"MONOCHROME1" (minimum value displayed white) or "MONOCHROME2" (minimum value displayed black)."""
    lung_mask: np.ndarray
    """Boolean (rows, columns): both lungs."""
    right_lung: np.ndarray
    """Boolean: the patient's right lung, on the image's left side."""
    left_lung: np.ndarray
    """Boolean: the patient's left lung, on the image's right side."""
    opacity_mask: np.ndarray
    """Boolean: the union of all opacities, always inside the lungs."""
    boxes: list[tuple[int, int, int, int]]
    """(x, y, width, height) in pixels per opacity, the RSNA convention: the bounding box of that opacity's mask."""
    kinds: list[str]
    """Per box: "consolidation" or "ground-glass"."""
    pixel_spacing_mm: float
    """Size of one (square) pixel at the detector, in mm."""
    view_position: str
    """"PA" or "AP"."""
    patient_sex: str = "O"
    """"M", "F" or "O" (Patient's Sex); breast shadows are drawn for "F"."""


def make_radiograph(
    rng: np.random.Generator,
    rows: int,
    cols: int,
    *,
    positive: bool,
    n_boxes: int | None = None,
    bits_stored: int = 12,
    photometric_interpretation: str = "MONOCHROME2",
    view_position: str = "PA",
) -> SyntheticRadiograph:
    """Draw one frontal chest radiograph.

    A positive image gets `n_boxes` opacities (drawn from the RSNA frequencies when None); a negative one none, with the
    same variation of anatomy, exposure and devices. The scene depends only on `rng`, `rows`, `cols`, `positive`,
    `n_boxes` and `view_position`: the same generator state with MONOCHROME1 instead of MONOCHROME2 gives the inverted
    stored values of the same picture, and another `bits_stored` the same picture at another depth.
    """
    if rows < 32 or cols < 32:
        raise ValueError(f'Argument "rows"/"cols" must be at least 32 pixels, got {rows} x {cols}.')
    if not 8 <= bits_stored <= 16:
        raise ValueError(f'Argument "bits_stored" must be 8..16, got {bits_stored}.')
    if photometric_interpretation not in PHOTOMETRIC_INTERPRETATIONS:
        raise ValueError(
            f'Argument "photometric_interpretation" must be one of {PHOTOMETRIC_INTERPRETATIONS}, '
            f"got {photometric_interpretation!r}."
        )
    if view_position not in VIEW_POSITIONS:
        raise ValueError(f'Argument "view_position" must be one of {VIEW_POSITIONS}, got {view_position!r}.')
    if n_boxes is not None and not positive and n_boxes != 0:
        raise ValueError(f'Argument "n_boxes" must be 0 or None for a negative image, got {n_boxes}.')
    if n_boxes is not None and positive and not 1 <= n_boxes <= 8:
        raise ValueError(f'Argument "n_boxes" must be 1..8 for a positive image, got {n_boxes}.')

    stats = load_box_stats()
    sex = "F" if rng.random() < 0.45 else "M"
    anatomy = sample_anatomy(rng, rows, cols, view_position, sex)
    right, left = lung_masks(anatomy, (rows, cols), 1.0)
    opacities: list[Opacity] = []
    masks: list[np.ndarray] = []
    boxes: list[tuple[int, int, int, int]] = []
    if positive:
        wanted = n_boxes if n_boxes is not None else sample_box_count(rng, stats)
        opacities, masks, boxes = place_opacities(rng, anatomy, (right, left), wanted, stats)
        if not boxes:
            raise RuntimeError(
                f"could not place an opacity in a {rows} x {cols} image; try another seed or a larger size"
            )
    opacity_mask = np.zeros((rows, cols), dtype=bool)
    for mask in masks:
        opacity_mask |= mask

    presentation = render(rng, anatomy, rows, cols, opacities)
    max_value = (1 << bits_stored) - 1
    low = rng.uniform(0.0, 0.06)
    high = rng.uniform(0.88, 1.0)
    stored = np.rint((low + (high - low) * presentation) * max_value).astype(np.uint16)
    if photometric_interpretation == "MONOCHROME1":
        stored = (max_value - stored).astype(np.uint16)
    body_width_px = 2.0 * anatomy.chest_half_width * anatomy.body.scale
    spacing = round(rng.uniform(350.0, 430.0) / body_width_px, 4)
    return SyntheticRadiograph(
        pixels=stored,
        bits_stored=bits_stored,
        photometric_interpretation=photometric_interpretation,
        lung_mask=right | left,
        right_lung=right,
        left_lung=left,
        opacity_mask=opacity_mask,
        boxes=boxes,
        kinds=[o.kind for o in opacities],
        pixel_spacing_mm=spacing,
        view_position=view_position,
        patient_sex=sex,
    )


def presentation_image(radiograph: SyntheticRadiograph) -> np.ndarray:
    """Stored values as a viewer shows them (MONOCHROME1 inverted), 0..1 float32: for previews and checks."""
    max_value = (1 << radiograph.bits_stored) - 1
    p = radiograph.pixels.astype(np.float32) / max_value
    return 1.0 - p if radiograph.photometric_interpretation == "MONOCHROME1" else p
