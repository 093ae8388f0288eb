"""Evaluation figures as PNG, drawn with Pillow: the ROC curve and a sheet of the worst cases."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TILE = 256


def roc_points(labels: Sequence[bool], scores: Sequence[float]) -> list[tuple[float, float]]:
    """(false-positive rate, true-positive rate) at every distinct score, from (0, 0) to (1, 1)."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    points = [(0.0, 0.0)]
    for threshold in sorted(set(s.tolist()), reverse=True):
        points.append((float((s[~y] >= threshold).mean()), float((s[y] >= threshold).mean())))
    points.append((1.0, 1.0))
    return points


def draw_roc(
    path: Path,
    labels: Sequence[bool],
    scores: Sequence[float],
    operating: float,
    title: str,
) -> None:
    """The ROC curve with the diagonal, the AUC in the title and the operating threshold marked."""
    size, margin = 420, 50
    picture = Image.new("RGB", (size + margin + 20, size + margin + 40), "white")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=13)

    def at(fpr: float, tpr: float) -> tuple[float, float]:
        return margin + fpr * size, 30 + (1 - tpr) * size

    draw.rectangle((*at(0, 1), *at(1, 0)), outline="black")
    draw.line((*at(0, 0), *at(1, 1)), fill=(180, 180, 180))
    for tick in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        x, y = at(tick, 0)
        draw.text((x - 8, y + 4), f"{tick:.1f}", fill="black", font=font)
        x, y = at(0, tick)
        draw.text((x - 30, y - 7), f"{tick:.1f}", fill="black", font=font)
    points = [at(f, t) for f, t in roc_points(labels, scores)]
    draw.line(points, fill=(200, 30, 30), width=2)
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.any() and (~y).any():
        fpr, tpr = float((s[~y] >= operating).mean()), float((s[y] >= operating).mean())
        x0, y0 = at(fpr, tpr)
        draw.ellipse((x0 - 5, y0 - 5, x0 + 5, y0 + 5), outline=(30, 30, 200), width=2)
        draw.text((x0 + 8, y0 + 4), f"threshold {operating:.2f}", fill=(30, 30, 200), font=font)
    draw.text((margin, 8), title, fill="black", font=font)
    draw.text((margin + size / 2 - 70, size + 50), "false-positive rate", fill="black", font=font)
    draw.text((4, 12), "TPR", fill="black", font=font)
    picture.save(path)


@dataclass(frozen=True)
class Case:
    """One image for the worst-cases sheet: a thumbnail (2-D uint8) and boxes in its pixels."""

    thumbnail: np.ndarray
    truth: np.ndarray  # (M, 4) x0, y0, x1, y1
    predicted: np.ndarray  # (N, 4)
    caption: str


def draw_cases(path: Path, cases: Sequence[Case], columns: int = 4) -> None:
    """A sheet of thumbnails: truth boxes green, reported boxes red, a caption under each."""
    if not cases:
        return
    rows = (len(cases) + columns - 1) // columns
    caption_height = 34
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + caption_height)), "white")
    font = ImageFont.load_default(size=11)
    for index, case in enumerate(cases):
        tile = Image.fromarray(case.thumbnail).convert("RGB")
        draw = ImageDraw.Draw(tile)
        for box in case.truth.reshape(-1, 4):
            draw.rectangle(tuple(float(v) for v in box), outline=(0, 220, 0), width=2)
        for box in case.predicted.reshape(-1, 4):
            draw.rectangle(tuple(float(v) for v in box), outline=(230, 0, 0), width=2)
        x, y = (index % columns) * TILE, (index // columns) * (TILE + caption_height)
        sheet.paste(tile, (x, y))
        ImageDraw.Draw(sheet).multiline_text((x + 3, y + TILE + 2), case.caption, fill="black", font=font)
    sheet.save(path)


def thumbnail(image: np.ndarray) -> tuple[np.ndarray, float]:
    """A uint8 thumbnail whose long side is at most TILE (percentile-scaled like the networks' input), and the
    scale from image pixels to thumbnail pixels."""
    low, high = np.percentile(image, (0.5, 99.5))
    scaled = np.clip((image.astype(np.float32) - low) / max(float(high - low), 1e-6), 0, 1)
    scale = TILE / max(image.shape)
    rows, cols = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
    picture = Image.fromarray((scaled * 255).astype(np.uint8)).resize((cols, rows), Image.Resampling.BILINEAR)
    return np.asarray(picture), scale
