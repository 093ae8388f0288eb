"""The picture: soft tissue, bones, vessels, air, devices and opacities as densities, then exposure, detector response
and noise, in presentation values (0 black .. 1 white).

The picture is rendered at a working resolution of at most `WORK_MAX_PX` and upsampled; masks and boxes are drawn at the
full resolution from the same geometry (models.synth.anatomy, models.synth.lesions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from models.synth.anatomy import Anatomy, Body, Stroke, lung_masks, pil_points
from models.synth.lesions import Opacity

WORK_MAX_PX = 1024
"""The picture is rendered with at most this many pixels on its longer side, then upsampled."""


def _canvas(shape: tuple[int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("F", (shape[1], shape[0]), 0.0)
    return image, ImageDraw.Draw(image)


def _draw_strokes(
    shape: tuple[int, int], body: Body, ws: float, strokes: Sequence[Stroke], inner: float | None = None
) -> np.ndarray:
    """Strokes drawn at their density; with `inner`, the middle 55 % of each stroke is lowered to `inner` x density
    (the dense cortex of a bone at its edges)."""
    image, draw = _canvas(shape)
    px_per_unit = body.scale * ws
    for stroke in strokes:
        pts = pil_points(body, stroke.points, ws)
        width = max(1, int(round(stroke.width * px_per_unit)))
        draw.line(pts, fill=stroke.density, width=width, joint="curve")
        if inner is not None and width >= 3:
            draw.line(pts, fill=stroke.density * inner, width=max(1, int(round(width * 0.55))), joint="curve")
    return np.array(image, dtype=np.float32)


def _fill_polygons(shape: tuple[int, int], body: Body, ws: float, polygons: Sequence[np.ndarray]) -> np.ndarray:
    image, draw = _canvas(shape)
    for polygon in polygons:
        draw.polygon(pil_points(body, polygon, ws), fill=1.0)
    return np.array(image, dtype=np.float32)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur; wide kernels run on a reduced copy and are upsampled back."""
    if sigma <= 0.3:
        return a
    if sigma < 4.0:
        return ndimage.gaussian_filter(a, sigma, mode="nearest")
    factor = int(sigma // 2)
    small_size = (max(1, a.shape[1] // factor), max(1, a.shape[0] // factor))
    small = np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize(small_size, Image.Resampling.BOX))
    small = ndimage.gaussian_filter(small, sigma / factor, mode="nearest")
    return np.array(
        Image.fromarray(small.astype(np.float32), mode="F").resize((a.shape[1], a.shape[0]), Image.Resampling.BILINEAR)
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    sigma = max(sigma, 0.5)
    factor = max(1, int(sigma // 2))
    small_shape = (max(2, shape[0] // factor + 1), max(2, shape[1] // factor + 1))
    noise = ndimage.gaussian_filter(rng.standard_normal(small_shape, dtype=np.float32), sigma / factor, mode="wrap")
    noise /= max(float(noise.std()), 1e-6)
    up = Image.fromarray(noise, mode="F").resize(
        (small_shape[1] * factor, small_shape[0] * factor), Image.Resampling.BILINEAR
    )
    return np.array(up)[: shape[0], : shape[1]]


def _spine(anatomy: Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Thoracic spine: vertebral bodies with bright end plates, dark disc spaces and paired pedicles."""
    levels = anatomy.vertebra_levels
    spacing = float(levels[1] - levels[0])
    du = u - anatomy.spine_offset
    phase = np.mod(v - levels[0], spacing) / spacing
    half = 0.075 + 0.012 * np.clip(v, 0.0, 2.0)  # vertebral bodies widen downwards
    band = np.clip((half - np.abs(du)) / 0.025, 0.0, 1.0)
    body_pattern = 0.6 + 0.2 * np.exp(-(((phase - 0.06) / 0.07) ** 2)) - 0.2 * np.exp(-(((phase - 0.93) / 0.06) ** 2))
    pedicles = np.exp(-(((np.abs(du) - 0.75 * half) / 0.018) ** 2 + ((phase - 0.35) / 0.14) ** 2))
    spinous = np.exp(-((du / 0.016) ** 2 + ((phase - 0.62) / 0.16) ** 2))
    return band * body_pattern + 0.6 * pedicles + 0.4 * spinous


def _ellipse_field(u: np.ndarray, v: np.ndarray, cu: float, cv: float, au: float, av: float) -> np.ndarray:
    """1 at the centre of the ellipse, 0 on and outside its border (a soft, dome-shaped profile)."""
    return np.sqrt(np.clip(1.0 - ((u - cu) / au) ** 2 - ((v - cv) / av) ** 2, 0.0, None))


def render(
    rng: np.random.Generator, anatomy: Anatomy, rows: int, cols: int, opacities: Sequence[Opacity]
) -> np.ndarray:
    """The radiograph in presentation values (0 black .. 1 white, MONOCHROME2 sense) at full resolution, float32."""
    ws = min(1.0, WORK_MAX_PX / max(rows, cols))
    shape = (max(8, int(round(rows * ws))), max(8, int(round(cols * ws))))
    body = anatomy.body
    ppu = body.scale * ws  # working pixels per body unit
    x = ((np.arange(shape[1], dtype=np.float32) + 0.5) / ws)[None, :]
    y = ((np.arange(shape[0], dtype=np.float32) + 0.5) / ws)[:, None]
    u, v = body.to_body(x, y)
    u = u.astype(np.float32)
    v = v.astype(np.float32)

    # Soft tissue: thickness of an elliptic cross-section under the body outline.
    half_width = np.interp(v, *anatomy.body_half_width).astype(np.float32)
    tissue = np.sqrt(np.clip(1.0 - (u / half_width) ** 2, 0.0, None))
    tissue = _blur(tissue, 0.01 * ppu)
    for bu, bv, bw, bh in anatomy.breasts:
        tissue += 0.09 * _blur(_ellipse_field(u, v, bu, bv, bw, bh) ** 0.5, 0.015 * ppu)

    right, left = lung_masks(anatomy, shape, ws)
    lung = (right | left).astype(np.float32)
    lung_soft = _blur(lung, 0.008 * ppu)
    depth = _blur(lung, 0.14 * ppu)
    depth /= max(float(depth.max()), 1e-6)
    air = lung_soft * (0.3 + 0.7 * np.clip(depth * 1.6, 0.0, 1.0))
    air *= 1.0 - 0.25 * np.clip(-v / 0.3 + 1.0, 0.0, 1.0)  # apices lie under the shoulder girdle

    heart = _blur(_fill_polygons(shape, body, ws, [anatomy.heart]), 0.012 * ppu)
    ku, kv, kr = anatomy.aortic_knob
    knob = _ellipse_field(u, v, ku, kv, kr, kr)
    mediastinum = np.clip(1.0 - np.abs(u - anatomy.spine_offset) / 0.2, 0.0, 1.0) * (v > -0.6)

    # Ribs show best over the lungs; over the mediastinum and the abdomen scatter washes them out.
    rib_visibility = 0.2 + 0.8 * np.clip(depth * 3.0, 0.0, 1.0)
    ribs = 0.09 * _blur(_draw_strokes(shape, body, ws, anatomy.ribs_posterior, inner=0.65), 0.005 * ppu)
    ribs += 0.07 * _blur(_draw_strokes(shape, body, ws, anatomy.ribs_anterior, inner=0.7), 0.008 * ppu)
    bones = 0.12 * _spine(anatomy, u, v) + ribs * rib_visibility
    bones += 0.14 * _blur(_draw_strokes(shape, body, ws, anatomy.clavicles, inner=0.8), 0.006 * ppu)
    bones += 0.05 * _blur(_fill_polygons(shape, body, ws, anatomy.scapulae), 0.01 * ppu)
    for hu, hv, hr in anatomy.humeral_heads:
        bones += 0.14 * _blur(_ellipse_field(u, v, hu, hv, hr, hr * 1.1) ** 0.3, 0.01 * ppu)
        shaft = np.clip(1.0 - np.abs(u - hu * 1.04) / (hr * 0.6), 0.0, 1.0) ** 0.5 * np.clip((v - hv) / hr, 0.0, 1.0)
        bones += 0.12 * shaft
    bones *= np.clip(tissue * 4.0, 0.0, 1.0)

    vessels = _blur(_draw_strokes(shape, body, ws, anatomy.vessels), 0.006 * ppu)
    for hu, hv in anatomy.hila:
        vessels += 0.7 * np.exp(-(((u - hu) / 0.08) ** 2 + ((v - hv) / 0.13) ** 2))
    vessels *= lung_soft
    trachea = _blur(_draw_strokes(shape, body, ws, [anatomy.trachea]), 0.01 * ppu)
    devices = _blur(_draw_strokes(shape, body, ws, anatomy.devices), 0.0015 * ppu)
    for eu, ev, er in anatomy.electrodes:
        ring = _ellipse_field(u, v, eu, ev, er, er)
        devices += 0.5 * (ring > 0) + 0.8 * ((ring > 0) & (ring < 0.45))
    bubble = 0.0 if anatomy.gastric_bubble is None else _blur(_ellipse_field(u, v, *anatomy.gastric_bubble), 0.01 * ppu)

    filled = np.zeros(shape, dtype=np.float32)
    hidden_vessels = np.zeros(shape, dtype=np.float32)
    bronchograms = np.zeros(shape, dtype=np.float32)
    for opacity in opacities:
        ex0, ey0, ex1, ey1 = opacity.extent()
        c0, c1 = max(0, int(ex0 * ws)), min(shape[1], int(math.ceil(ex1 * ws)) + 1)
        r0, r1 = max(0, int(ey0 * ws)), min(shape[0], int(math.ceil(ey1 * ws)) + 1)
        if c0 >= c1 or r0 >= r1:
            continue
        xs, ys = x[:, c0:c1], y[r0:r1, :]
        presence = opacity.soft(xs, ys) * opacity.texture(xs, ys)
        filled[r0:r1, c0:c1] = np.maximum(filled[r0:r1, c0:c1], opacity.density * presence)
        if opacity.kind == "consolidation":
            hidden_vessels[r0:r1, c0:c1] = np.maximum(hidden_vessels[r0:r1, c0:c1], 0.85 * presence)
        if opacity.bronchi:
            image, draw = _canvas(shape)
            for stroke in opacity.bronchi:
                pts = [(px * ws - 0.5, py * ws - 0.5) for px, py in stroke.points]
                draw.line(pts, fill=1.0, width=max(1, int(round(stroke.width * ws))), joint="curve")
            bronchograms = np.maximum(bronchograms, _blur(np.array(image), 0.004 * ppu) * opacity.density)
    filled = np.clip(filled, 0.0, 1.0)

    density = anatomy.tissue_density * tissue
    density += 0.07 * heart + 0.08 * knob + 0.05 * mediastinum * tissue
    density += bones
    density += 0.12 * vessels * (1.0 - np.clip(hidden_vessels, 0.0, 1.0))
    density -= anatomy.air_density * air * (1.0 - filled + 0.3 * bronchograms * filled)
    density -= anatomy.air_density * 0.18 * heart * np.clip(v / anatomy.height, 0.0, 1.0)  # lung behind the heart
    density -= 0.2 * trachea + 0.3 * bubble
    density += 0.5 * devices
    density += 0.03 * _smooth_noise(rng, shape, 0.006 * ppu) * air  # lung texture
    density += 0.02 * _smooth_noise(rng, shape, 0.03 * ppu) * tissue

    # Exposure: compress highlights like film/processing, stretch, gamma, heel effect, quantum mottle.
    attenuation = rng.uniform(0.9, 1.4)
    p = 1.0 - np.exp(-attenuation * np.clip(density, 0.0, None))
    step = (max(1, shape[0] // 160), max(1, shape[1] // 160))
    lo = np.percentile(p[:: step[0], :: step[1]][lung[:: step[0], :: step[1]] > 0], 1.0) - rng.uniform(0.0, 0.12)
    hi = np.percentile(p[:: step[0], :: step[1]], 99.8)
    p = np.clip((p - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    p = p ** rng.uniform(0.75, 1.35)
    p *= 1.0 + rng.uniform(-0.06, 0.06) * (y / rows - 0.5)
    p += rng.uniform(0.004, 0.012) * (0.4 + p) * _smooth_noise(rng, shape, 0.7)
    p = _add_marker_and_collimation(rng, anatomy, p, ws, right | left)

    if shape != (rows, cols):
        p = np.array(Image.fromarray(p.astype(np.float32), mode="F").resize((cols, rows), Image.Resampling.BILINEAR))
    p = p + rng.uniform(0.003, 0.010) * (0.4 + p) * rng.standard_normal((rows, cols), dtype=np.float32)
    return np.clip(p, 0.0, 1.0).astype(np.float32)


def _add_marker_and_collimation(
    rng: np.random.Generator, anatomy: Anatomy, p: np.ndarray, ws: float, lungs: np.ndarray
) -> np.ndarray:
    """A lead side marker in an upper corner and, sometimes, collimator shutter borders that stay clear of the lungs."""
    rows, cols = p.shape
    ly = np.flatnonzero(lungs.any(axis=1))
    lx = np.flatnonzero(lungs.any(axis=0))
    top, bottom, left, right = int(ly[0]), int(rows - 1 - ly[-1]), int(lx[0]), int(cols - 1 - lx[-1])
    if rng.random() < 0.8 and min(rows, cols) >= 48:
        letter = "L" if rng.random() < 0.8 else "R"
        size = max(8, int(min(rows, cols) * rng.uniform(0.03, 0.05)))
        image, draw = _canvas(p.shape)
        font = ImageFont.load_default(size=size)
        # L (the patient's left) goes on the image's right side, R on the left.
        mx = cols * rng.uniform(0.80, 0.92) if letter == "L" else cols * rng.uniform(0.04, 0.14)
        my = rows * rng.uniform(0.02, 0.08)
        draw.text((mx, my), letter, fill=1.0, font=font)
        marker = _blur(np.array(image), 0.6)
        p = np.maximum(p, marker * rng.uniform(0.9, 1.0))
    if rng.random() < 0.35:
        value = rng.uniform(0.85, 1.0) if rng.random() < 0.7 else rng.uniform(0.0, 0.05)
        margins = [int(m * rng.uniform(0.0, 0.6)) if rng.random() < 0.6 else 0 for m in (top, bottom, left, right)]
        p = p.copy()
        if margins[0]:
            p[: margins[0], :] = value
        if margins[1]:
            p[rows - margins[1] :, :] = value
        if margins[2]:
            p[:, : margins[2]] = value
        if margins[3]:
            p[:, cols - margins[3] :] = value
    return p
