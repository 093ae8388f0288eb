"""The overlay picture (`cxrnode predict --png`, the status page): boxes, outlines and text where they belong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from models.finding import Finding, Opacity, Thresholds
from models.severity import lung_involvement
from node.overlay import BOX_COLOUR, LEFT_LUNG_COLOUR, RIGHT_LUNG_COLOUR, render_overlay


def finding(shape: tuple[int, int], box: tuple[float, float, float, float]) -> Finding:
    right = np.zeros(shape, bool)
    left = np.zeros(shape, bool)
    right[100:700, 80:380] = True
    left[100:700, 520:820] = True
    mask = np.zeros(shape, bool)
    x0, y0, x1, y1 = (int(v) for v in box)
    mask[y0:y1, x0:x1] = True
    severity, extent = lung_involvement(mask, right, left)
    return Finding(
        shape, (Opacity(box, 0.87, mask),), right, left, severity, extent, 0.87, True, Thresholds(0.5, 0.5, 0.5), "test"
    )


def is_colour(pixel: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool(np.all(np.abs(pixel.astype(int) - np.array(colour)) <= 2))


def test_box_outline_is_at_the_expected_pixels(tmp_path: Path) -> None:
    shape = (900, 900)  # below max_side: drawn 1:1
    box = (150.0, 300.0, 330.0, 520.0)
    pixels = np.random.default_rng(0).normal(1000, 50, shape).astype(np.float32)
    path = tmp_path / "overlay.png"
    render_overlay(pixels, finding(shape, box)).save(path)
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape == (900, 900, 3)
    x0, y0, x1, y1 = (int(v) for v in box)
    # the rectangle's four sides (outline width 2 at this size), away from the label text in its top-left corner
    for x in range(x0 + 120, x1 - 5, 7):
        assert is_colour(picture[y1 - 1, x], BOX_COLOUR), (x, y1 - 1)
        assert is_colour(picture[y0, x], BOX_COLOUR), (x, y0)
    for y in range(y0 + 30, y1 - 5, 7):
        assert is_colour(picture[y, x0], BOX_COLOUR), (x0, y)
        assert is_colour(picture[y, x1 - 1], BOX_COLOUR), (x1 - 1, y)
    inside = picture[y0 + 60 : y1 - 60, x0 + 60 : x1 - 60]
    assert not any(is_colour(p, BOX_COLOUR) for p in inside.reshape(-1, 3)[::97])  # an outline, not a fill
    # lung outlines: the right lung's left edge, the left lung's right edge
    assert is_colour(picture[400, 80], RIGHT_LUNG_COLOUR) and is_colour(picture[400, 819], LEFT_LUNG_COLOUR)


def test_large_images_are_scaled_and_the_box_follows(tmp_path: Path) -> None:
    shape = (2000, 1800)
    box = (400.0, 600.0, 1000.0, 1400.0)
    pixels = np.zeros(shape, np.float32)
    pixels[::2] = 1.0
    big = finding(shape, box)
    picture = np.asarray(render_overlay(pixels, big, max_side=1000).convert("RGB"))
    assert picture.shape == (1000, 900, 3)
    scale = 0.5
    assert is_colour(picture[int(1400 * scale) - 1, 350], BOX_COLOUR)
    assert is_colour(picture[500, int(400 * scale)], BOX_COLOUR)
