"""Lung opacities: consolidation and ground-glass shapes placed at real RSNA box positions and sizes, clipped to the lung
they lie in, with their masks and RSNA boxes."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from models.data import rsna
from models.synth.anatomy import Anatomy, Stroke
from models.synth.stats import BoxStats, sample_box_sides, sample_rsna_box

logger = logging.getLogger(__name__)

OPACITY_KINDS = ("consolidation", "ground-glass")

# The canonical chest that the RSNA box positions are read against: the mean of `sample_anatomy` on a 1024 x 1024
# image (pixels per body unit, image row of the lung apices, apex-to-costophrenic height in body units).
_RSNA_SCALE_PX = 445.0
_RSNA_APEX_Y = 140.0
_RSNA_HEIGHT = 1.43
# Real boxes reach past the lung outline (behind the heart and the diaphragm domes); a box drawn from the clipped mask
# comes out smaller, so the target box is enlarged by this much (width, height) to keep the RSNA size distribution.
_RSNA_INFLATE = (1.1, 1.0)


@dataclass(frozen=True)
class Opacity:
    """One opacity in full-resolution pixel coordinates: a union of soft ellipses with an irregular border."""

    kind: str
    lobes: np.ndarray
    """(L, 5): centre x, centre y, half-axis a, half-axis b, angle; the first lobe is the main one."""
    border_waves: np.ndarray
    """(K, 4): frequency x, frequency y, phase, amplitude; coordinates normalised by the main lobe's half-axes."""
    texture_waves: np.ndarray
    density: float
    """Fraction of the lung's air the opacity replaces at its centre."""
    edge: float
    """Width of the soft border, as a fraction of the lobe radius."""
    bronchi: tuple[Stroke, ...]
    """Air bronchograms (points in full-resolution pixels)."""

    def extent(self) -> tuple[float, float, float, float]:
        """x0, y0, x1, y1 that surely contain the opacity, its soft border included."""
        x, y, a, b = (self.lobes[:, i] for i in range(4))
        r = np.maximum(a, b) * (1.0 + self.edge + float(np.abs(self.border_waves[:, 3]).sum()))
        return float((x - r).min()), float((y - r).min()), float((x + r).max()), float((y + r).max())

    def signed(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """> 0 inside the opacity, < 0 outside (x, y continuous full-resolution coordinates, broadcastable)."""
        g = np.full(np.broadcast_shapes(x.shape, y.shape), -np.inf, dtype=np.float32)
        for cx, cy, a, b, angle in self.lobes.tolist():
            c, s = math.cos(angle), math.sin(angle)
            dx, dy = x - cx, y - cy
            rho = np.sqrt(((c * dx + s * dy) / a) ** 2 + ((-s * dx + c * dy) / b) ** 2)
            g = np.maximum(g, 1.0 - rho)
        return g + self._waves(self.border_waves, x, y)

    def texture(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return 1.0 + self._waves(self.texture_waves, x, y)

    def _waves(self, waves: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        cx, cy, a, b, _ = self.lobes[0].tolist()
        xn, yn = (x - cx) / a, (y - cy) / b
        out = np.zeros(np.broadcast_shapes(x.shape, y.shape), dtype=np.float32)
        for fx, fy, phase, amplitude in waves.tolist():
            out += amplitude * np.sin(fx * xn + fy * yn + phase)
        return out

    def soft(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """0..1 presence with a soft border; > 0.5 exactly where `signed` > 0."""
        t = np.clip(0.5 + self.signed(x, y) / (2.0 * self.edge), 0.0, 1.0)
        return t * t * (3.0 - 2.0 * t)


def _random_waves(rng: np.random.Generator, n: int, freq: tuple[float, float], total_amplitude: float) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi, n)
    k = rng.uniform(*freq, n)
    amp = rng.uniform(0.5, 1.0, n)
    amp *= total_amplitude / amp.sum()
    return np.stack([k * np.cos(angle), k * np.sin(angle), rng.uniform(0, 2 * np.pi, n), amp], axis=1)


def _make_opacity(
    rng: np.random.Generator, kind: str, box: tuple[float, float, float, float], hilum_px: tuple[float, float]
) -> Opacity:
    """An opacity that fills `box` (x0, y0, x1, y1 in full-resolution pixels)."""
    x0, y0, x1, y1 = box
    cx, cy, a, b = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    lobes = [(cx, cy, a * rng.uniform(0.9, 0.98), b * rng.uniform(0.9, 0.98), rng.uniform(-0.12, 0.12))]
    for _ in range(int(rng.integers(1, 5))):
        fa, fb = rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.6)
        lobes.append(
            (
                cx + rng.uniform(-1, 1) * a * (1 - fa) * 0.8,
                cy + rng.uniform(-1, 1) * b * (1 - fb) * 0.8,
                a * fa,
                b * fb,
                rng.uniform(0, np.pi),
            )
        )
    consolidation = kind == "consolidation"
    bronchi: list[Stroke] = []
    if consolidation and rng.random() < 0.6:
        hx, hy = hilum_px
        start_angle = math.atan2(cy - hy, cx - hx)
        stack = [
            (cx - 0.6 * a * math.cos(start_angle), cy - 0.6 * b * math.sin(start_angle), start_angle, 0.06 * min(a, b))
        ]
        while stack and len(bronchi) < 24:
            x, y, ang, w = stack.pop()
            if w < 0.012 * min(a, b):
                continue
            step = 0.18 * min(a, b)
            ang += rng.normal(0, 0.25)
            x2, y2 = x + step * math.cos(ang), y + step * math.sin(ang)
            bronchi.append(Stroke(np.array([(x, y), (x2, y2)]), w, 1.0))
            if rng.random() < 0.3:
                stack += [(x2, y2, ang - 0.45, w * 0.75), (x2, y2, ang + 0.45, w * 0.75)]
            else:
                stack.append((x2, y2, ang, w * 0.88))
    return Opacity(
        kind=kind,
        lobes=np.array(lobes, dtype=np.float64),
        border_waves=_random_waves(rng, 6, (2.0, 5.0), rng.uniform(0.08, 0.16)),
        texture_waves=_random_waves(rng, 8, (3.0, 10.0), 0.25 if consolidation else 0.3),
        density=rng.uniform(0.65, 0.85) if consolidation else rng.uniform(0.45, 0.58),
        edge=rng.uniform(0.2, 0.35) if consolidation else rng.uniform(0.3, 0.45),
        bronchi=tuple(bronchi),
    )


def _opacity_mask(opacity: Opacity, lung: np.ndarray) -> np.ndarray:
    """Full-resolution mask of the opacity inside `lung`, evaluated only around the opacity."""
    rows, cols = lung.shape
    ex0, ey0, ex1, ey1 = opacity.extent()
    c0, c1 = max(0, int(math.floor(ex0))), min(cols, int(math.ceil(ex1)) + 1)
    r0, r1 = max(0, int(math.floor(ey0))), min(rows, int(math.ceil(ey1)) + 1)
    mask = np.zeros_like(lung)
    if c0 >= c1 or r0 >= r1:
        return mask
    x = (np.arange(c0, c1, dtype=np.float32) + 0.5)[None, :]
    y = (np.arange(r0, r1, dtype=np.float32) + 0.5)[:, None]
    mask[r0:r1, c0:c1] = (opacity.signed(x, y) > 0) & lung[r0:r1, c0:c1]
    return mask


def _bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x, y, width, height) of the True pixels."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / float(a[2] * a[3] + b[2] * b[3] - inter)


def place_opacities(
    rng: np.random.Generator, anatomy: Anatomy, lungs: tuple[np.ndarray, np.ndarray], n_boxes: int, stats: BoxStats
) -> tuple[list[Opacity], list[np.ndarray], list[tuple[int, int, int, int]]]:
    """Opacities at real RSNA positions and sizes (read against the canonical chest, moved onto this one), each
    centred in the lung it belongs to, clipped to that lung; masks and RSNA boxes from the clipped shapes."""
    body = anatomy.body
    rows, cols = lungs[0].shape
    k = body.scale / _RSNA_SCALE_PX
    opacities: list[Opacity] = []
    masks: list[np.ndarray] = []
    boxes: list[tuple[int, int, int, int]] = []
    for side in sample_box_sides(rng, n_boxes, stats):
        lung = lungs[side]
        lx, ly, lw, lh = _bounding_box(lung)
        hilum = body.to_px(np.array(anatomy.hila[side][0]), np.array(anatomy.hila[side][1]))
        kind = OPACITY_KINDS[0] if rng.random() < 0.55 else OPACITY_KINDS[1]
        for attempt in range(60):
            x, y, w, h = sample_rsna_box(rng, side, stats)
            if attempt < 40:
                u = (x + w / 2 - rsna.IMAGE_SIZE / 2) / _RSNA_SCALE_PX
                v = (y + h / 2 - _RSNA_APEX_Y) / _RSNA_SCALE_PX * anatomy.height / _RSNA_HEIGHT
                px, py = (float(p) for p in body.to_px(np.array(u), np.array(v)))
            else:  # rare: no real position fell inside this lung; take any point of it
                ys, xs = np.nonzero(lung[:: max(1, rows // 128), :: max(1, cols // 128)])
                i = int(rng.integers(len(xs)))
                px, py = (xs[i] + 0.5) * max(1, cols // 128), (ys[i] + 0.5) * max(1, rows // 128)
            if not (0 <= int(py) < rows and 0 <= int(px) < cols and lung[int(py), int(px)]):
                continue
            bw, bh = w * k * _RSNA_INFLATE[0], h * k * _RSNA_INFLATE[1]
            target = (max(px - bw / 2, lx), max(py - bh / 2, ly), min(px + bw / 2, lx + lw), min(py + bh / 2, ly + lh))
            if target[2] - target[0] < 2 or target[3] - target[1] < 2:
                continue
            opacity = _make_opacity(rng, kind, target, (float(hilum[0]), float(hilum[1])))
            mask = _opacity_mask(opacity, lung)
            area = int(np.count_nonzero(mask))
            if area < 0.35 * (target[2] - target[0]) * (target[3] - target[1]) or area < 4:
                continue
            box = _bounding_box(mask)
            if any(_iou(box, other) > 0.3 for other in boxes):
                continue
            opacities.append(opacity)
            masks.append(mask)
            boxes.append(box)
            break
        else:
            logger.debug("no room for another opacity in lung %d after 60 tries", side)
    return opacities, masks, boxes
