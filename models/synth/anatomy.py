"""One chest in body units: the body's place in the image, the lungs, heart, mediastinum, bones, vessels, soft tissue
and devices, drawn at random; and the lung masks rasterised from that geometry.

Geometry is drawn in *body units*: u runs across the image (image right = the patient's left is positive), v runs down,
the origin is the midline at the lung apices and 1 unit is the half-width of the rib cage. `Body` maps body units to
image pixels (scale, rotation, shift).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from models.synth.stats import read_only


@dataclass(frozen=True)
class Body:
    """Maps body units (u across, v down; 1 unit = rib-cage half-width) to continuous image pixel coordinates."""

    x0: float
    """Image x of the body origin (midline at the lung apices)."""
    y0: float
    scale: float
    """Pixels per body unit."""
    angle: float
    """Rotation in radians (positive turns the body clockwise on the display)."""

    def to_px(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(self.angle), math.sin(self.angle)
        return self.x0 + self.scale * (c * u - s * v), self.y0 + self.scale * (s * u + c * v)

    def to_body(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = (x - self.x0) / self.scale, (y - self.y0) / self.scale
        return c * dx + s * dy, -s * dx + c * dy


@dataclass(frozen=True)
class Stroke:
    """A polyline drawn with a width (body units) and a density."""

    points: np.ndarray
    width: float
    density: float


@dataclass(frozen=True)
class Anatomy:
    """Everything that makes up one chest, in body units."""

    body: Body
    sex: str
    view_position: str
    height: float
    """Apex to costophrenic angle, in body units."""
    chest_half_width: float
    """Half-width of the soft-tissue outline at the lower chest, in body units."""
    lungs: tuple[np.ndarray, np.ndarray]
    """Closed outlines of the patient's right lung (u < 0) and left lung (u > 0), before the heart is cut out."""
    heart: np.ndarray
    aortic_knob: tuple[float, float, float]
    """Centre u, v and radius."""
    body_half_width: tuple[np.ndarray, np.ndarray]
    """(v, half-width) samples of the soft-tissue outline."""
    ribs_posterior: tuple[Stroke, ...]
    ribs_anterior: tuple[Stroke, ...]
    clavicles: tuple[Stroke, ...]
    scapulae: tuple[np.ndarray, ...]
    humeral_heads: tuple[tuple[float, float, float], ...]
    spine_offset: float
    vertebra_levels: np.ndarray
    trachea: Stroke
    vessels: tuple[Stroke, ...]
    hila: tuple[tuple[float, float], ...]
    breasts: tuple[tuple[float, float, float, float], ...]
    """(u, v, half-width, half-height) of each breast shadow."""
    gastric_bubble: tuple[float, float, float, float] | None
    devices: tuple[Stroke, ...]
    electrodes: tuple[tuple[float, float, float], ...]
    tissue_density: float
    air_density: float


def _closed_spline(points: np.ndarray, per_segment: int = 10) -> np.ndarray:
    """A closed Catmull-Rom curve through `points` (N, 2), sampled `per_segment` times between control points."""
    p = np.asarray(points, dtype=np.float64)
    n = len(p)
    t = np.linspace(0.0, 1.0, per_segment, endpoint=False)[:, None]
    out = []
    for i in range(n):
        p0, p1, p2, p3 = p[(i - 1) % n], p[i], p[(i + 1) % n], p[(i + 2) % n]
        out.append(
            0.5
            * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3)
        )
    return np.concatenate(out)


def _bezier(
    p0: Sequence[float], p1: Sequence[float], p2: Sequence[float], p3: Sequence[float], n: int = 24
) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    a, b, c, d = (np.asarray(p, dtype=np.float64) for p in (p0, p1, p2, p3))
    return (1 - t) ** 3 * a + 3 * (1 - t) ** 2 * t * b + 3 * (1 - t) * t**2 * c + t**3 * d


def _rib_half_width(v: np.ndarray | float, apex_width: float) -> np.ndarray:
    """Half-width of the rib cage at height v: narrow at the apices, widest from the mid lungs down."""
    t = np.clip(np.asarray(v, dtype=np.float64) / 0.85, 0.0, 1.0)
    return apex_width + (1.0 - apex_width) * np.sin(t * np.pi / 2)


# The patient's right lung (u < 0), apex first, clockwise on the display: lateral wall, costophrenic angle, dome,
# cardiophrenic angle, medial border. The left lung mirrors it with its own dome and costophrenic angle.
_RIGHT_LUNG = read_only(
    np.array(
        [
            (-0.34, 0.00),
            (-0.50, 0.04),
            (-0.68, 0.18),
            (-0.81, 0.42),
            (-0.88, 0.72),
            (-0.91, 1.02),
            (-0.925, 1.28),
            (-0.93, 1.45),
            (-0.86, 1.40),
            (-0.72, 1.29),
            (-0.52, 1.20),
            (-0.36, 1.18),
            (-0.22, 1.22),
            (-0.13, 1.30),
            (-0.11, 1.05),
            (-0.105, 0.78),
            (-0.12, 0.52),
            (-0.13, 0.30),
            (-0.16, 0.12),
            (-0.24, 0.02),
        ]
    )
)
# The heart, from the superior vena cava round the right atrium, under the diaphragm, up the left ventricle.
_HEART = read_only(
    np.array(
        [
            (-0.10, 0.60),
            (-0.20, 0.74),
            (-0.27, 0.92),
            (-0.27, 1.12),
            (-0.20, 1.34),
            (0.05, 1.46),
            (0.40, 1.46),
            (0.55, 1.34),
            (0.59, 1.18),
            (0.55, 1.0),
            (0.44, 0.86),
            (0.30, 0.76),
            (0.24, 0.66),
            (0.12, 0.60),
        ]
    )
)


def sample_anatomy(rng: np.random.Generator, rows: int, cols: int, view_position: str, sex: str) -> Anatomy:
    """Draw one chest: shape, size, position and the structures in it."""
    ap = view_position == "AP"
    height = rng.uniform(1.34, 1.52) * (0.94 if ap else 1.0)  # apex to costophrenic angle, in half-widths
    fill_x = rng.uniform(0.40, 0.47)
    fill_y = rng.uniform(0.60, 0.70)
    scale = min(cols * fill_x, rows * fill_y / height)
    angle = math.radians(rng.uniform(-4.0, 4.0))
    lung_centre_y = rows * rng.uniform(0.44, 0.52)
    y_apex = lung_centre_y - scale * height / 2
    x_mid = cols * (0.5 + rng.uniform(-0.03, 0.03))
    body = Body(x0=x_mid, y0=y_apex, scale=scale, angle=angle)

    apex_width = rng.uniform(0.50, 0.60)
    lungs = []
    for side in (-1.0, 1.0):
        pts = _RIGHT_LUNG.copy()
        pts[:, 1] *= height / 1.45
        pts[:, 0] *= rng.uniform(0.95, 1.03)
        if side > 0:
            pts[:, 0] *= -1.0
            lower = pts[:, 1] > 1.1 * height / 1.45
            pts[lower, 1] += rng.uniform(0.03, 0.09)  # the left dome lies lower than the right
            pts[:, 0] = np.where(pts[:, 0] < 0.2, pts[:, 0] + 0.01, pts[:, 0])
        pts += rng.normal(0.0, 0.012, pts.shape)
        lungs.append(_closed_spline(pts))

    heart = _HEART.copy()
    ctr = rng.uniform(0.42, 0.50) + (0.06 if ap else 0.0)  # cardiothoracic ratio
    heart[:, 0] = (heart[:, 0] - 0.145) * ctr / 0.415 + 0.145 + rng.uniform(-0.03, 0.03)
    heart[:, 1] = (heart[:, 1] - 0.6) * rng.uniform(0.92, 1.08) * height / 1.45 + 0.6 * height / 1.45
    heart += rng.normal(0.0, 0.01, heart.shape)
    heart = _closed_spline(heart)
    knob = (rng.uniform(0.06, 0.1), 0.40 * height / 1.45 + rng.uniform(-0.03, 0.03), rng.uniform(0.08, 0.1))

    v_samples = np.array([-1.2, -0.6, -0.42, -0.3, -0.18, -0.05, 0.15, 0.5, 1.0, 1.6, 2.5])
    shoulder = rng.uniform(1.2, 1.4)
    chest = rng.uniform(1.10, 1.22) + (0.05 if sex == "F" else 0.0)
    neck = rng.uniform(0.26, 0.36)
    hw = np.array(
        [
            neck,
            neck * 1.05,
            neck * 1.6,
            0.62 * shoulder,
            0.85 * shoulder,
            0.97 * shoulder,
            shoulder,
            0.5 * (shoulder + chest),
            chest,
            chest * 0.98,
            chest * 0.95,
        ]
    )
    hw[:6] *= np.linspace(1.0, 1.0 + rng.uniform(-0.08, 0.08), 6)

    rib_spacing = height * rng.uniform(0.092, 0.100)
    ribs_post, ribs_ant = [], []
    rib_w = rib_spacing * rng.uniform(0.45, 0.55)
    for k in range(11):
        for side in (-1.0, 1.0):
            vk = -0.02 + (k + 0.5) * rib_spacing + rng.normal(0.0, 0.008)
            hwk = float(_rib_half_width(vk + 0.2, apex_width)) + 0.03
            up = 0.09 - 0.004 * k  # upper ribs arch more
            drop = 0.22 + 0.015 * k
            post = _bezier((0.05, vk), (0.4 * hwk, vk - up), (0.88 * hwk, vk - 0.6 * up), (hwk, vk + drop))
            ant = _bezier(
                (hwk, vk + drop), (0.97 * hwk, vk + drop + 0.12), (0.6 * hwk, vk + drop + 0.2), (0.28, vk + drop + 0.36)
            )
            post[:, 0] *= side
            ant[:, 0] *= side
            ribs_post.append(Stroke(post, rib_w * (0.85 + 0.02 * k) * rng.uniform(0.92, 1.08), 1.0))
            ribs_ant.append(Stroke(ant, rib_w * 1.3, 1.0))

    clav = []
    clav_v = (0.08 if ap else 0.2) + rng.uniform(-0.05, 0.05)  # medial end; the lateral end is higher
    rise = rng.uniform(0.12, 0.24) * (0.6 if ap else 1.0)
    for side in (-1.0, 1.0):
        pts = _bezier((0.07, clav_v), (0.32, clav_v + 0.08), (0.5, clav_v - 0.6 * rise), (0.86, clav_v - rise))
        pts[:, 0] *= side
        clav.append(Stroke(pts, rng.uniform(0.055, 0.07), 1.0))
    scap = []
    scap_in = rng.uniform(0.55, 0.7) if ap else rng.uniform(0.82, 0.95)
    for side in (-1.0, 1.0):
        pts = np.array([(scap_in, 0.0), (scap_in + 0.12, 0.55 * height), (1.05, 0.25), (1.1, -0.05)])
        pts[:, 0] *= side
        scap.append(_closed_spline(pts, 8))
    humeral = tuple((s * rng.uniform(1.14, 1.24), rng.uniform(-0.02, 0.08), rng.uniform(0.15, 0.19)) for s in (-1, 1))

    spine_offset = rng.uniform(-0.02, 0.02)
    levels = np.arange(-0.45, 2.6, rib_spacing * 1.02) + rng.uniform(0, rib_spacing)
    trachea_pts = np.array([(spine_offset, -1.0), (spine_offset + 0.005, 0.1), (spine_offset + 0.01, 0.38 * height)])
    trachea = Stroke(trachea_pts, rng.uniform(0.07, 0.09), 1.0)

    hila = ((-0.24, 0.52 * height / 1.45 + 0.12), (0.26, 0.50 * height / 1.45 + 0.10))
    vessels: list[Stroke] = []
    for (hu, hv), side in zip(hila, (-1.0, 1.0)):
        vessels.extend(_vessel_tree(rng, (hu, hv), side))

    breasts: list[tuple[float, float, float, float]] = []
    if sex == "F":
        size = rng.uniform(0.3, 0.42)
        bv = height * rng.uniform(0.8, 0.92)
        breasts = [(s * rng.uniform(0.5, 0.62), bv, size * 1.2, size) for s in (-1.0, 1.0)]
    bubble = None
    if rng.random() < 0.6:
        bubble = (
            rng.uniform(0.38, 0.6),
            height + rng.uniform(0.12, 0.22),
            rng.uniform(0.1, 0.18),
            rng.uniform(0.06, 0.1),
        )

    devices, electrodes = _sample_devices(rng, height, ap)
    return Anatomy(
        body=body,
        sex=sex,
        view_position=view_position,
        height=height,
        chest_half_width=chest,
        lungs=(lungs[0], lungs[1]),
        heart=heart,
        aortic_knob=knob,
        body_half_width=(v_samples, hw),
        ribs_posterior=tuple(ribs_post),
        ribs_anterior=tuple(ribs_ant),
        clavicles=tuple(clav),
        scapulae=tuple(scap),
        humeral_heads=humeral,
        spine_offset=spine_offset,
        vertebra_levels=levels,
        trachea=trachea,
        vessels=tuple(vessels),
        hila=hila,
        breasts=tuple(breasts),
        gastric_bubble=bubble,
        devices=tuple(devices),
        electrodes=tuple(electrodes),
        tissue_density=rng.uniform(0.9, 1.1),
        air_density=rng.uniform(0.62, 0.78),
    )


def _vessel_tree(rng: np.random.Generator, hilum: tuple[float, float], side: float) -> list[Stroke]:
    """Pulmonary vessels branching out from one hilum, thinner towards the periphery."""
    strokes: list[Stroke] = []
    # (u, v, direction angle, width); angle 0 points laterally, negative upwards.
    stack = [
        (hilum[0], hilum[1], math.radians(a + rng.normal(0, 8)), rng.uniform(0.024, 0.032))
        for a in (-100, -70, -40, -10, 20, 50, 80)
    ]
    while stack:
        u, v, a, w = stack.pop()
        if w < 0.006 or len(strokes) > 300:
            continue
        step = rng.uniform(0.03, 0.05)
        a = a + rng.normal(0, math.radians(16))
        u2, v2 = u + side * step * math.cos(a), v + step * math.sin(a)
        strokes.append(Stroke(np.array([(u, v), (u2, v2)]), w, 1.0))
        if rng.random() < 0.3:
            spread = math.radians(rng.uniform(20, 35))
            stack.append((u2, v2, a - spread, w * 0.72))
            stack.append((u2, v2, a + spread, w * 0.72))
        else:
            stack.append((u2, v2, a, w * 0.87))
    return strokes


def _sample_devices(
    rng: np.random.Generator, height: float, ap: bool
) -> tuple[list[Stroke], list[tuple[float, float, float]]]:
    """ECG electrodes with their leads, and sometimes a central venous line: common on real (mostly AP) films."""
    strokes: list[Stroke] = []
    electrodes: list[tuple[float, float, float]] = []
    if rng.random() < (0.55 if ap else 0.12):
        for _ in range(int(rng.integers(2, 5))):
            eu, ev = rng.uniform(-1.0, 1.0), rng.uniform(-0.1, height * 1.1)
            electrodes.append((eu, ev, rng.uniform(0.035, 0.05)))
            end = (rng.uniform(-1.4, 1.4), height * rng.uniform(1.2, 2.0))
            mid = ((eu + end[0]) / 2 + rng.uniform(-0.4, 0.4), (ev + end[1]) / 2 + rng.uniform(-0.3, 0.3))
            strokes.append(Stroke(_bezier((eu, ev), mid, mid, end), 0.012, 0.6))
    if rng.random() < (0.3 if ap else 0.04):
        s = -1.0 if rng.random() < 0.7 else 1.0
        tip = (s * 0.08, height * rng.uniform(0.42, 0.55))
        strokes.append(Stroke(_bezier((s * 0.6, -0.15), (s * 0.35, -0.05), (s * 0.12, 0.1), tip), 0.014, 0.8))
    return strokes, electrodes


def pil_points(body: Body, pts: np.ndarray, ws: float) -> list[tuple[float, float]]:
    """Body-unit points as PIL drawing coordinates on a canvas `ws` times the image size (PIL puts integer coordinates
    on pixel centres, so the continuous coordinate c is drawn at c - 0.5)."""
    x, y = body.to_px(pts[:, 0], pts[:, 1])
    return list(zip((x * ws - 0.5).tolist(), (y * ws - 0.5).tolist()))


def lung_masks(anatomy: Anatomy, shape: tuple[int, int], ws: float) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of the patient's right and left lung: the lung outline less the heart, the aortic knob and a
    mediastinal band, so the two lungs never touch."""
    body = anatomy.body
    ku, kv, kr = anatomy.aortic_knob
    band = np.array([(-0.075, -3.0), (0.075, -3.0), (0.075, 4.0), (-0.075, 4.0)]) + (anatomy.spine_offset, 0.0)
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    knob = np.stack([ku + kr * np.cos(theta), kv + kr * np.sin(theta)], axis=1)
    masks = []
    for outline in anatomy.lungs:
        image = Image.new("L", (shape[1], shape[0]), 0)
        draw = ImageDraw.Draw(image)
        draw.polygon(pil_points(body, outline, ws), fill=255)
        for cut in (anatomy.heart, knob, band):
            draw.polygon(pil_points(body, cut, ws), fill=0)
        masks.append(_largest_component(np.asarray(image) > 0))
    return masks[0], masks[1]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))
