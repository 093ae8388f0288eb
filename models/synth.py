"""Synthetic frontal chest radiographs with lung opacities, written as a dataset in the RSNA Pneumonia Detection Challenge layout.

The detector is trained only on these images, so they have to carry what a real radiograph carries: lungs of plausible
shape with the heart, mediastinum, spine, ribs, clavicles, diaphragm and soft tissue around them, exposure and noise that
vary from image to image, and opacities whose number, size and position follow the real RSNA labels (the statistics are
in `data/rsna_box_stats.json`, recomputed from `stage_2_train_labels.csv` with `compute_box_stats`).

Geometry is drawn in *body units*: u runs across the image (image right = the patient's left is positive), v runs down,
the origin is the midline at the lung apices and 1 unit is the half-width of the rib cage. `_Body` maps body units to
image pixels (scale, rotation, shift). The picture is rendered at a working resolution of at most `WORK_MAX_PX` and
upsampled; masks and boxes are drawn at the full resolution from the same geometry.

Pixel coordinates are continuous with the origin at the top-left corner of the top-left pixel: the pixel in row i,
column j covers [j, j+1) x [i, i+1) and its centre is (j + 0.5, i + 0.5).

The dataset layout is described at `generate_dataset`. The box statistics are recomputed (when the RSNA files are at
hand; the generator itself never reads them) with::

    from models.synth import write_box_stats
    write_box_stats(Path("stage_2_train_labels.csv"), Path("stage_2_detailed_class_info.csv"))

Command line: ``python -m models.synth OUT --n 100 --seed 1`` (the same parser is `cxrnode synth`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, PYDICOM_ROOT_UID, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from models.severity import lung_involvement

logger = logging.getLogger(__name__)

GENERATOR_NAME = "cxrnode.models.synth"
GENERATOR_VERSION = "1.0.0"
BOX_STATS_PATH = Path(__file__).resolve().parent / "data" / "rsna_box_stats.json"
RSNA_IMAGE_SIZE = 1024
"""The RSNA challenge images (and so the boxes in its label file) are 1024 x 1024 pixels."""
WORK_MAX_PX = 1024
"""The picture is rendered with at most this many pixels on its longer side, then upsampled."""

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_STORAGE_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
SOP_CLASS_FOR_MODALITY = MappingProxyType({"CR": CR_IMAGE_STORAGE, "DX": DX_IMAGE_STORAGE_FOR_PRESENTATION})
PHOTOMETRIC_INTERPRETATIONS = ("MONOCHROME1", "MONOCHROME2")
VIEW_POSITIONS = ("PA", "AP")
OPACITY_KINDS = ("consolidation", "ground-glass")
CLASS_OPACITY = "Lung Opacity"
CLASS_NORMAL = "Normal"
CLASS_NOT_NORMAL = "No Lung Opacity / Not Normal"

LABELS_FILE = "stage_2_train_labels.csv"
CLASS_INFO_FILE = "stage_2_detailed_class_info.csv"
IMAGES_DIR = "stage_2_train_images"
LUNG_MASKS_DIR = "lung_masks"
OPACITY_MASKS_DIR = "opacity_masks"
SEVERITY_FILE = "severity.csv"
DATASET_INFO_FILE = "dataset.json"
LABELS_HEADER = ("patientId", "x", "y", "width", "height", "Target")
CLASS_INFO_HEADER = ("patientId", "class")
SEVERITY_HEADER = (
    "patientId",
    "severity_right",
    "severity_left",
    "severity_total",
    "extent_right",
    "extent_left",
    "extent_total",
)


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


# --------------------------------------------------------------------------------------------------------------------
# RSNA box statistics
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoxStats:
    """What the generator takes from the real RSNA labels (see `compute_box_stats` for each entry's meaning)."""

    positive_fraction: float
    boxes_per_positive_image: dict[int, int]
    one_per_lung_fraction_two_boxes: float
    right_lung_fraction_one_box: float
    normal_fraction_of_negatives: float
    boxes: np.ndarray = field(repr=False)
    """(N, 5) float: side (0 the patient's right = image left, 1 the patient's left), x, y, width, height at 1024 px."""

    def side_boxes(self, side: int) -> np.ndarray:
        return self.boxes[self.boxes[:, 0] == side, 1:]


def compute_box_stats(
    labels_csv: Path, class_info_csv: Path | None = None, *, n_sample: int = 600, sample_seed: int = 0
) -> dict[str, Any]:
    """The statistics of the RSNA label file that the generator uses, as a JSON-ready dict.

    `labels_csv` is the Kaggle `stage_2_train_labels.csv` (patientId,x,y,width,height,Target; boxes at 1024 px);
    `class_info_csv`, when given, is `stage_2_detailed_class_info.csv` for the split of the negatives between "Normal"
    and "No Lung Opacity / Not Normal". `n_sample` boxes are drawn without replacement (seeded) as the joint
    (position, width, height) distribution; counts and quantiles are over all boxes.
    """
    images: dict[str, list[tuple[float, float, float, float]]] = {}
    positive: set[str] = set()
    n_rows = 0
    with open(labels_csv, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != LABELS_HEADER:
            raise ValueError(f"{labels_csv} has columns {reader.fieldnames}, expected {','.join(LABELS_HEADER)}")
        for row in reader:
            n_rows += 1
            boxes = images.setdefault(row["patientId"], [])
            if row["Target"] == "1":
                positive.add(row["patientId"])
                boxes.append(tuple(float(row[k]) for k in ("x", "y", "width", "height")))  # type: ignore[arg-type]
    all_boxes = np.array([b for pid in sorted(images) for b in images[pid]], dtype=np.float64).reshape(-1, 4)
    side = ((all_boxes[:, 0] + all_boxes[:, 2] / 2) >= RSNA_IMAGE_SIZE / 2).astype(np.float64)
    counts = Counter(len(images[pid]) for pid in positive)
    two = [images[pid] for pid in sorted(positive) if len(images[pid]) == 2]
    split = [((a[0] + a[2] / 2) < RSNA_IMAGE_SIZE / 2) != ((b[0] + b[2] / 2) < RSNA_IMAGE_SIZE / 2) for a, b in two]
    one = [images[pid][0] for pid in sorted(positive) if len(images[pid]) == 1]
    one_right = [(b[0] + b[2] / 2) < RSNA_IMAGE_SIZE / 2 for b in one]
    rng = np.random.default_rng(sample_seed)
    pick = np.sort(rng.choice(len(all_boxes), size=min(n_sample, len(all_boxes)), replace=False))
    quantile_levels = [0.05, 0.25, 0.5, 0.75, 0.95]
    stats: dict[str, Any] = {
        "source": labels_csv.name,
        "source_rows": n_rows,
        "image_size": RSNA_IMAGE_SIZE,
        "images": len(images),
        "positive_images": len(positive),
        "positive_fraction": round(len(positive) / len(images), 6),
        "boxes_total": int(len(all_boxes)),
        "boxes_per_positive_image": {str(k): counts[k] for k in sorted(counts)},
        "one_per_lung_fraction_two_boxes": round(float(np.mean(split)), 6),
        "right_lung_fraction_one_box": round(float(np.mean(one_right)), 6),
        "quantile_levels": quantile_levels,
        "width_quantiles": [round(float(q), 3) for q in np.quantile(all_boxes[:, 2], quantile_levels)],
        "height_quantiles": [round(float(q), 3) for q in np.quantile(all_boxes[:, 3], quantile_levels)],
        "center_x_quantiles": [
            round(float(q), 3) for q in np.quantile(all_boxes[:, 0] + all_boxes[:, 2] / 2, quantile_levels)
        ],
        "center_y_quantiles": [
            round(float(q), 3) for q in np.quantile(all_boxes[:, 1] + all_boxes[:, 3] / 2, quantile_levels)
        ],
        "sample_seed": sample_seed,
        "sample_columns": ["side", "x", "y", "width", "height"],
        "sample_side_meaning": "0 = patient's right lung (box centre in the image's left half), 1 = patient's left",
        "sample": [[int(side[i]), *(int(round(v)) for v in all_boxes[i])] for i in pick],
    }
    if class_info_csv is not None:
        with open(class_info_csv, newline="") as f:
            classes = Counter(row["class"] for row in csv.DictReader(f))
        negatives = classes[CLASS_NORMAL] + classes[CLASS_NOT_NORMAL]
        stats["class_rows"] = {k: classes[k] for k in sorted(classes)}
        stats["normal_fraction_of_negatives"] = round(classes[CLASS_NORMAL] / negatives, 6)
    return stats


def write_box_stats(labels_csv: Path, class_info_csv: Path | None = None, out: Path = BOX_STATS_PATH) -> None:
    """Recompute the committed statistics file from the RSNA label files."""
    stats = compute_box_stats(labels_csv, class_info_csv)
    sample = stats.pop("sample")
    text = json.dumps(stats, indent=1)[:-2]  # without the closing brace, to add the sample one box per line
    rows = ",\n  ".join(json.dumps(row) for row in sample)
    out.write_text(f'{text},\n "sample": [\n  {rows}\n ]\n}}\n')


def load_box_stats(path: Path = BOX_STATS_PATH) -> BoxStats:
    """The RSNA statistics the generator samples from (the committed JSON next to this module)."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"RSNA box statistics {path} are missing; recreate them with "
            "models.synth.write_box_stats(Path('stage_2_train_labels.csv'), Path('stage_2_detailed_class_info.csv'))"
        ) from None
    return BoxStats(
        positive_fraction=float(raw["positive_fraction"]),
        boxes_per_positive_image={int(k): int(v) for k, v in raw["boxes_per_positive_image"].items()},
        one_per_lung_fraction_two_boxes=float(raw["one_per_lung_fraction_two_boxes"]),
        right_lung_fraction_one_box=float(raw["right_lung_fraction_one_box"]),
        normal_fraction_of_negatives=float(raw.get("normal_fraction_of_negatives", 0.5)),
        boxes=_read_only(np.asarray(raw["sample"], dtype=np.float64)),
    )


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def sample_box_count(rng: np.random.Generator, stats: BoxStats | None = None) -> int:
    """Number of boxes on a positive image, drawn from the RSNA frequencies (1-4)."""
    stats = stats or load_box_stats()
    counts = np.array(list(stats.boxes_per_positive_image.keys()))
    freq = np.array(list(stats.boxes_per_positive_image.values()), dtype=np.float64)
    return int(rng.choice(counts, p=freq / freq.sum()))


def sample_box_sides(rng: np.random.Generator, n_boxes: int, stats: BoxStats | None = None) -> list[int]:
    """Which lung each box goes to (0 the patient's right, 1 the left), following the RSNA habits:
    one box lands on either lung, two boxes are almost always one per lung, three or four cover both lungs."""
    stats = stats or load_box_stats()
    if n_boxes <= 0:
        return []
    if n_boxes == 1:
        return [0 if rng.random() < stats.right_lung_fraction_one_box else 1]
    if n_boxes == 2 and rng.random() >= stats.one_per_lung_fraction_two_boxes:
        side = int(rng.integers(2))
        return [side, side]
    sides = [0, 1] + [int(rng.integers(2)) for _ in range(n_boxes - 2)]
    return sorted(sides)


def sample_rsna_box(rng: np.random.Generator, side: int, stats: BoxStats | None = None) -> tuple[float, ...]:
    """One real RSNA box (x, y, width, height at 1024 px) from the stored sample, on the given side."""
    stats = stats or load_box_stats()
    boxes = stats.side_boxes(side)
    return tuple(float(v) for v in boxes[rng.integers(len(boxes))])


# --------------------------------------------------------------------------------------------------------------------
# Geometry in body units
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Body:
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
class _Stroke:
    """A polyline drawn with a width (body units) and a density."""

    points: np.ndarray
    width: float
    density: float


@dataclass(frozen=True)
class _Anatomy:
    """Everything that makes up one chest, in body units."""

    body: _Body
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
    ribs_posterior: tuple[_Stroke, ...]
    ribs_anterior: tuple[_Stroke, ...]
    clavicles: tuple[_Stroke, ...]
    scapulae: tuple[np.ndarray, ...]
    humeral_heads: tuple[tuple[float, float, float], ...]
    spine_offset: float
    vertebra_levels: np.ndarray
    trachea: _Stroke
    vessels: tuple[_Stroke, ...]
    hila: tuple[tuple[float, float], ...]
    breasts: tuple[tuple[float, float, float, float], ...]
    """(u, v, half-width, half-height) of each breast shadow."""
    gastric_bubble: tuple[float, float, float, float] | None
    devices: tuple[_Stroke, ...]
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
_RIGHT_LUNG = _read_only(
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
_HEART = _read_only(
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


def _sample_anatomy(rng: np.random.Generator, rows: int, cols: int, view_position: str, sex: str) -> _Anatomy:
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
    body = _Body(x0=x_mid, y0=y_apex, scale=scale, angle=angle)

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
            ribs_post.append(_Stroke(post, rib_w * (0.85 + 0.02 * k) * rng.uniform(0.92, 1.08), 1.0))
            ribs_ant.append(_Stroke(ant, rib_w * 1.3, 1.0))

    clav = []
    clav_v = (0.08 if ap else 0.2) + rng.uniform(-0.05, 0.05)  # medial end; the lateral end is higher
    rise = rng.uniform(0.12, 0.24) * (0.6 if ap else 1.0)
    for side in (-1.0, 1.0):
        pts = _bezier((0.07, clav_v), (0.32, clav_v + 0.08), (0.5, clav_v - 0.6 * rise), (0.86, clav_v - rise))
        pts[:, 0] *= side
        clav.append(_Stroke(pts, rng.uniform(0.055, 0.07), 1.0))
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
    trachea = _Stroke(trachea_pts, rng.uniform(0.07, 0.09), 1.0)

    hila = ((-0.24, 0.52 * height / 1.45 + 0.12), (0.26, 0.50 * height / 1.45 + 0.10))
    vessels: list[_Stroke] = []
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
    return _Anatomy(
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


def _vessel_tree(rng: np.random.Generator, hilum: tuple[float, float], side: float) -> list[_Stroke]:
    """Pulmonary vessels branching out from one hilum, thinner towards the periphery."""
    strokes: list[_Stroke] = []
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
        strokes.append(_Stroke(np.array([(u, v), (u2, v2)]), w, 1.0))
        if rng.random() < 0.3:
            spread = math.radians(rng.uniform(20, 35))
            stack.append((u2, v2, a - spread, w * 0.72))
            stack.append((u2, v2, a + spread, w * 0.72))
        else:
            stack.append((u2, v2, a, w * 0.87))
    return strokes


def _sample_devices(
    rng: np.random.Generator, height: float, ap: bool
) -> tuple[list[_Stroke], list[tuple[float, float, float]]]:
    """ECG electrodes with their leads, and sometimes a central venous line: common on real (mostly AP) films."""
    strokes: list[_Stroke] = []
    electrodes: list[tuple[float, float, float]] = []
    if rng.random() < (0.55 if ap else 0.12):
        for _ in range(int(rng.integers(2, 5))):
            eu, ev = rng.uniform(-1.0, 1.0), rng.uniform(-0.1, height * 1.1)
            electrodes.append((eu, ev, rng.uniform(0.035, 0.05)))
            end = (rng.uniform(-1.4, 1.4), height * rng.uniform(1.2, 2.0))
            mid = ((eu + end[0]) / 2 + rng.uniform(-0.4, 0.4), (ev + end[1]) / 2 + rng.uniform(-0.3, 0.3))
            strokes.append(_Stroke(_bezier((eu, ev), mid, mid, end), 0.012, 0.6))
    if rng.random() < (0.3 if ap else 0.04):
        s = -1.0 if rng.random() < 0.7 else 1.0
        tip = (s * 0.08, height * rng.uniform(0.42, 0.55))
        strokes.append(_Stroke(_bezier((s * 0.6, -0.15), (s * 0.35, -0.05), (s * 0.12, 0.1), tip), 0.014, 0.8))
    return strokes, electrodes


# --------------------------------------------------------------------------------------------------------------------
# Rasterising and rendering
# --------------------------------------------------------------------------------------------------------------------


def _pil_points(body: _Body, pts: np.ndarray, ws: float) -> list[tuple[float, float]]:
    """Body-unit points as PIL drawing coordinates on a canvas `ws` times the image size (PIL puts integer coordinates
    on pixel centres, so the continuous coordinate c is drawn at c - 0.5)."""
    x, y = body.to_px(pts[:, 0], pts[:, 1])
    return list(zip((x * ws - 0.5).tolist(), (y * ws - 0.5).tolist()))


def _canvas(shape: tuple[int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("F", (shape[1], shape[0]), 0.0)
    return image, ImageDraw.Draw(image)


def _draw_strokes(
    shape: tuple[int, int], body: _Body, ws: float, strokes: Sequence[_Stroke], inner: float | None = None
) -> np.ndarray:
    """Strokes drawn at their density; with `inner`, the middle 55 % of each stroke is lowered to `inner` x density
    (the dense cortex of a bone at its edges)."""
    image, draw = _canvas(shape)
    px_per_unit = body.scale * ws
    for stroke in strokes:
        pts = _pil_points(body, stroke.points, ws)
        width = max(1, int(round(stroke.width * px_per_unit)))
        draw.line(pts, fill=stroke.density, width=width, joint="curve")
        if inner is not None and width >= 3:
            draw.line(pts, fill=stroke.density * inner, width=max(1, int(round(width * 0.55))), joint="curve")
    return np.array(image, dtype=np.float32)


def _fill_polygons(shape: tuple[int, int], body: _Body, ws: float, polygons: Sequence[np.ndarray]) -> np.ndarray:
    image, draw = _canvas(shape)
    for polygon in polygons:
        draw.polygon(_pil_points(body, polygon, ws), fill=1.0)
    return np.array(image, dtype=np.float32)


def _lung_masks(anatomy: _Anatomy, shape: tuple[int, int], ws: float) -> tuple[np.ndarray, np.ndarray]:
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
        draw.polygon(_pil_points(body, outline, ws), fill=255)
        for cut in (anatomy.heart, knob, band):
            draw.polygon(_pil_points(body, cut, ws), fill=0)
        masks.append(_largest_component(np.asarray(image) > 0))
    return masks[0], masks[1]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


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


def _spine(anatomy: _Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
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


# --------------------------------------------------------------------------------------------------------------------
# Opacities
# --------------------------------------------------------------------------------------------------------------------

# The canonical chest that the RSNA box positions are read against: the mean of `_sample_anatomy` on a 1024 x 1024
# image (pixels per body unit, image row of the lung apices, apex-to-costophrenic height in body units).
_RSNA_SCALE_PX = 445.0
_RSNA_APEX_Y = 140.0
_RSNA_HEIGHT = 1.43
# Real boxes reach past the lung outline (behind the heart and the diaphragm domes); a box drawn from the clipped mask
# comes out smaller, so the target box is enlarged by this much (width, height) to keep the RSNA size distribution.
_RSNA_INFLATE = (1.1, 1.0)


@dataclass(frozen=True)
class _Opacity:
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
    bronchi: tuple[_Stroke, ...]
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
) -> _Opacity:
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
    bronchi: list[_Stroke] = []
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
            bronchi.append(_Stroke(np.array([(x, y), (x2, y2)]), w, 1.0))
            if rng.random() < 0.3:
                stack += [(x2, y2, ang - 0.45, w * 0.75), (x2, y2, ang + 0.45, w * 0.75)]
            else:
                stack.append((x2, y2, ang, w * 0.88))
    return _Opacity(
        kind=kind,
        lobes=np.array(lobes, dtype=np.float64),
        border_waves=_random_waves(rng, 6, (2.0, 5.0), rng.uniform(0.08, 0.16)),
        texture_waves=_random_waves(rng, 8, (3.0, 10.0), 0.25 if consolidation else 0.3),
        density=rng.uniform(0.65, 0.85) if consolidation else rng.uniform(0.45, 0.58),
        edge=rng.uniform(0.2, 0.35) if consolidation else rng.uniform(0.3, 0.45),
        bronchi=tuple(bronchi),
    )


def _opacity_mask(opacity: _Opacity, lung: np.ndarray) -> np.ndarray:
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


def _place_opacities(
    rng: np.random.Generator, anatomy: _Anatomy, lungs: tuple[np.ndarray, np.ndarray], n_boxes: int, stats: BoxStats
) -> tuple[list[_Opacity], list[np.ndarray], list[tuple[int, int, int, int]]]:
    """Opacities at real RSNA positions and sizes (read against the canonical chest, moved onto this one), each
    centred in the lung it belongs to, clipped to that lung; masks and RSNA boxes from the clipped shapes."""
    body = anatomy.body
    rows, cols = lungs[0].shape
    k = body.scale / _RSNA_SCALE_PX
    opacities: list[_Opacity] = []
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
                u = (x + w / 2 - RSNA_IMAGE_SIZE / 2) / _RSNA_SCALE_PX
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


def _render(
    rng: np.random.Generator, anatomy: _Anatomy, rows: int, cols: int, opacities: Sequence[_Opacity]
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

    right, left = _lung_masks(anatomy, shape, ws)
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
    rng: np.random.Generator, anatomy: _Anatomy, p: np.ndarray, ws: float, lungs: np.ndarray
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


# --------------------------------------------------------------------------------------------------------------------
# One radiograph
# --------------------------------------------------------------------------------------------------------------------


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
    anatomy = _sample_anatomy(rng, rows, cols, view_position, sex)
    right, left = _lung_masks(anatomy, (rows, cols), 1.0)
    opacities: list[_Opacity] = []
    masks: list[np.ndarray] = []
    boxes: list[tuple[int, int, int, int]] = []
    if positive:
        wanted = n_boxes if n_boxes is not None else sample_box_count(rng, stats)
        opacities, masks, boxes = _place_opacities(rng, anatomy, (right, left), wanted, stats)
        if not boxes:
            raise RuntimeError(
                f"could not place an opacity in a {rows} x {cols} image; try another seed or a larger size"
            )
    opacity_mask = np.zeros((rows, cols), dtype=bool)
    for mask in masks:
        opacity_mask |= mask

    presentation = _render(rng, anatomy, rows, cols, opacities)
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


# --------------------------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------------------------

_VIEW_CODES = MappingProxyType(
    {"PA": ("272479007", "SCT", "postero-anterior"), "AP": ("399348003", "SCT", "antero-posterior")}
)
_CHEST_CODE = ("816094009", "SCT", "Chest")
_BASE_DATE = np.datetime64("2015-01-01")


def _code_item(code: tuple[str, str, str]) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _ds(value: float) -> str:
    """A Decimal String value (at most 16 characters)."""
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.8e}"[:16]


def _uid(rng: np.random.Generator) -> str:
    """A UID under the pydicom root, derived from the generator's state (so the same seed gives the same UID)."""
    return generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=[GENERATOR_NAME, rng.bytes(16).hex()])


def window_for(radiograph: SyntheticRadiograph) -> tuple[float, float]:
    """Window Center and Window Width (stored values) that show the whole radiograph, its lungs included."""
    pixels = radiograph.pixels
    step = max(1, min(pixels.shape) // 256)
    lo, hi = np.percentile(pixels[::step, ::step], [0.5, 99.5])
    width = max(float(hi - lo), 2.0)
    return float(round((lo + hi) / 2.0)), float(round(width))


def make_dataset(
    radiograph: SyntheticRadiograph, *, patient_id: str, modality: str, rng: np.random.Generator, **header: Any
) -> FileDataset:
    """A CR Image (modality "CR") or Digital X-Ray Image - For Presentation (modality "DX") object for the radiograph,
    with the modules its IOD requires and the attributes an acquisition device fills in.

    Dates, times and UIDs come from `rng`. Each keyword argument sets that DICOM attribute afterwards (for example
    PatientName="SYNTH^TEST", StudyInstanceUID=...)."""
    if modality not in SOP_CLASS_FOR_MODALITY:
        raise ValueError(f'Argument "modality" must be one of {tuple(SOP_CLASS_FOR_MODALITY)}, got {modality!r}.')
    if not patient_id:
        raise ValueError('Argument "patient_id" may not be empty.')
    unknown = [k for k in header if pydicom.datadict.tag_for_keyword(k) is None]
    if unknown:
        raise ValueError(f"Header keyword(s) {', '.join(unknown)} are not DICOM keywords (e.g. PatientName, StudyID).")
    rows, cols = radiograph.pixels.shape
    bits = radiograph.bits_stored
    monochrome1 = radiograph.photometric_interpretation == "MONOCHROME1"
    ap = radiograph.view_position == "AP"
    sop_class = SOP_CLASS_FOR_MODALITY[modality]
    study_uid, series_uid, sop_uid = _uid(rng), _uid(rng), _uid(rng)

    day = _BASE_DATE + np.timedelta64(int(rng.integers(0, 5 * 365)), "D")
    date = str(day).replace("-", "")
    seconds = int(rng.integers(7 * 3600, 20 * 3600))
    study_time = f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
    seconds += int(rng.integers(30, 300))
    acquisition_time = f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
    age = int(rng.integers(18, 91))
    birth = f"{int(date[:4]) - age - 1}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"CXRNODE_{GENERATOR_VERSION}".replace(".", "")[:16]
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)

    # SOP Common
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = acquisition_time
    # Patient, Patient Study
    ds.PatientName = f"SYNTH^{patient_id.replace('-', '')[:6].upper()}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth
    ds.PatientSex = radiograph.patient_sex
    ds.PatientAge = f"{age:03d}Y"
    # General Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = date
    ds.StudyTime = study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{int(rng.integers(1, 10**6)):06d}"
    ds.AccessionNumber = f"SYN{int(rng.integers(0, 10**9)):09d}"
    ds.StudyDescription = f"CHEST {radiograph.view_position}"
    # General Series + CR Series / DX Series
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDate = date
    ds.SeriesTime = acquisition_time
    ds.SeriesDescription = f"CHEST {radiograph.view_position}"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = radiograph.view_position
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    # General Equipment
    ds.Manufacturer = "CXRNODE"
    ds.InstitutionName = "SYNTHETIC"
    ds.StationName = f"SYNTH{int(rng.integers(1, 20)):02d}"
    ds.ManufacturerModelName = "SYNTHETIC CR" if modality == "CR" else "SYNTHETIC DR"
    ds.DeviceSerialNumber = f"{int(rng.integers(10**5, 10**6))}"
    ds.SoftwareVersions = f"{GENERATOR_NAME} {GENERATOR_VERSION}"
    # General Acquisition, General Image
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = date
    ds.AcquisitionTime = acquisition_time
    ds.ContentDate = date
    ds.ContentTime = acquisition_time
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]  # rows run to the patient's left, columns to the feet
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = radiograph.photometric_interpretation
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    # Acquisition technique (CR Image module; X-Ray Generation / DX Positioning for DX)
    kvp = rng.uniform(80, 95) if ap else rng.uniform(110, 125)
    current = int(rng.integers(200, 400))
    exposure_time = int(rng.integers(5, 20)) if not ap else int(rng.integers(10, 40))
    sid = 1000.0 if ap else 1800.0
    ds.KVP = _ds(round(kvp))
    ds.DistanceSourceToDetector = _ds(sid)
    ds.ExposureTime = exposure_time
    ds.XRayTubeCurrent = current
    ds.Exposure = max(1, round(current * exposure_time / 1000))
    spacing = [_ds(radiograph.pixel_spacing_mm)] * 2
    ds.ImagerPixelSpacing = spacing
    if modality == "CR":
        ds.PixelSpacing = spacing
        ds.Sensitivity = _ds(float(rng.choice([200, 400])))
        ds.PlateType = "STANDARD"
    else:
        # DX Anatomy Imaged
        ds.ImageLaterality = "U"
        ds.AnatomicRegionSequence = DicomSequence([_code_item(_CHEST_CODE)])
        # DX Image
        ds.PixelIntensityRelationship = "LOG"
        # +1: lower values mean less X-ray intensity (MONOCHROME1 stores air high); -1 the reverse.
        ds.PixelIntensityRelationshipSign = 1 if monochrome1 else -1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
        # DX Detector
        ds.DetectorType = "SCINTILLATOR"
        ds.DetectorConfiguration = "AREA"
        ds.DetectorID = f"D{int(rng.integers(10**5, 10**6))}"
        # DX Positioning
        ds.ViewCodeSequence = DicomSequence([_code_item(_VIEW_CODES[radiograph.view_position])])
        ds.DistanceSourceToPatient = _ds(sid - (150.0 if ap else 250.0))
        ds.EstimatedRadiographicMagnificationFactor = _ds(round(sid / (sid - (150.0 if ap else 250.0)), 4))
        ds.PositionerType = "NONE" if ap else "COLUMN"
        # Acquisition Context
        ds.AcquisitionContextSequence = DicomSequence([])
    # VOI LUT
    center, width = window_for(radiograph)
    ds.WindowCenter = _ds(center)
    ds.WindowWidth = _ds(width)
    ds.WindowCenterWidthExplanation = "NORMAL"

    pixels = radiograph.pixels.astype(np.uint8 if bits == 8 else "<u2")
    data = pixels.tobytes()
    ds.add_new(0x7FE00010, "OB" if bits == 8 else "OW", data + b"\0" if len(data) % 2 else data)  # Pixel Data

    for keyword, value in header.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    return ds


# --------------------------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------------------------

AP_FRACTION = 0.456
"""Share of AP views among the RSNA training images (12,173 of 26,684 in the Kaggle DICOM headers)."""
BITS_STORED_CHOICES = (8, 10, 12, 12, 14, 15, 16)
MONOCHROME1_FRACTION = 0.3
DX_FRACTION = 0.5


@dataclass(frozen=True)
class ImagePlan:
    """What one image of a dataset will be, drawn before any pixel is rendered."""

    index: int
    patient_id: str
    rows: int
    cols: int
    positive: bool
    n_boxes: int
    negative_class: str
    """"Normal" or "No Lung Opacity / Not Normal" for a negative image, "" for a positive one."""
    bits_stored: int
    photometric_interpretation: str
    view_position: str
    modality: str


def sample_image_plans(
    rng: np.random.Generator,
    n: int,
    *,
    size_range: tuple[int, int] = (512, 3000),
    positive_fraction: float = 0.225,
    stats: BoxStats | None = None,
) -> list[ImagePlan]:
    """The plan of an `n`-image dataset: exactly round(n x positive_fraction) positive images in random places, box counts
    from the RSNA frequencies, sizes with rows uniform in `size_range` and a chest-film aspect ratio (0.8-1.25)."""
    stats = stats or load_box_stats()
    lo, hi = size_range
    n_positive = int(round(n * positive_fraction))
    positive = np.zeros(n, dtype=bool)
    positive[rng.permutation(n)[:n_positive]] = True
    plans = []
    for i in range(n):
        patient_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        rows = int(rng.integers(lo, hi + 1))
        cols = int(np.clip(round(rows * rng.uniform(0.8, 1.25)), lo, hi))
        n_boxes = sample_box_count(rng, stats) if positive[i] else 0
        normal = rng.random() < stats.normal_fraction_of_negatives
        plans.append(
            ImagePlan(
                index=i,
                patient_id=patient_id,
                rows=rows,
                cols=cols,
                positive=bool(positive[i]),
                n_boxes=n_boxes,
                negative_class="" if positive[i] else (CLASS_NORMAL if normal else CLASS_NOT_NORMAL),
                bits_stored=int(rng.choice(BITS_STORED_CHOICES)),
                photometric_interpretation="MONOCHROME1" if rng.random() < MONOCHROME1_FRACTION else "MONOCHROME2",
                view_position="AP" if rng.random() < AP_FRACTION else "PA",
                modality="DX" if rng.random() < DX_FRACTION else "CR",
            )
        )
    return plans


def _check_generate_arguments(
    out: Path, n: int, seed: int, size_range: tuple[int, int], positive_fraction: float
) -> None:
    if n < 1:
        raise ValueError(f'Argument "n" must be at least 1, got {n}.')
    if seed < 0:
        raise ValueError(f'Argument "seed" must be 0 or more, got {seed}.')
    lo, hi = size_range
    if not 64 <= lo <= hi <= 8192:
        raise ValueError(f'Argument "size_range" must satisfy 64 <= min <= max <= 8192, got {size_range}.')
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f'Argument "positive_fraction" must be within 0..1, got {positive_fraction}.')
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out} exists and is not an empty folder; give a new folder (or delete this one) so "
            "no files of an earlier dataset are left in it"
        )


def _write_png(mask: np.ndarray, path: Path) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path, format="PNG")


def _number(value: float) -> str:
    """A box coordinate written as Kaggle writes it (264.0)."""
    return repr(float(value))


def generate_dataset(
    out: Path, n: int, seed: int, *, size_range: tuple[int, int] = (512, 3000), positive_fraction: float = 0.225
) -> None:
    """Write `n` synthetic radiographs and their ground truth to the folder `out` in the RSNA layout:

        stage_2_train_labels.csv          patientId,x,y,width,height,Target (one row per box; negatives one empty row)
        stage_2_detailed_class_info.csv   patientId,class (one row per label row)
        stage_2_train_images/<patientId>.dcm
        lung_masks/<patientId>.png        both lungs, 0/255
        opacity_masks/<patientId>.png     union of the opacities, 0/255
        severity.csv                      models.severity.lung_involvement of each image
        dataset.json                      generator, seed, size range, counts

    The same seed gives byte-identical files."""
    out = Path(out)
    _check_generate_arguments(out, n, seed, size_range, positive_fraction)
    stats = load_box_stats()
    plans = sample_image_plans(
        np.random.default_rng([seed, 0]), n, size_range=size_range, positive_fraction=positive_fraction, stats=stats
    )
    for folder in (IMAGES_DIR, LUNG_MASKS_DIR, OPACITY_MASKS_DIR):
        (out / folder).mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    with (
        open(out / LABELS_FILE, "w", newline="") as labels_file,
        open(out / CLASS_INFO_FILE, "w", newline="") as class_file,
        open(out / SEVERITY_FILE, "w", newline="") as severity_file,
    ):
        labels = csv.writer(labels_file, lineterminator="\n")
        classes = csv.writer(class_file, lineterminator="\n")
        severities = csv.writer(severity_file, lineterminator="\n")
        labels.writerow(LABELS_HEADER)
        classes.writerow(CLASS_INFO_HEADER)
        severities.writerow(SEVERITY_HEADER)
        for plan in plans:
            rng = np.random.default_rng([seed, 1, plan.index])
            radiograph = make_radiograph(
                rng,
                plan.rows,
                plan.cols,
                positive=plan.positive,
                n_boxes=plan.n_boxes if plan.positive else None,
                bits_stored=plan.bits_stored,
                photometric_interpretation=plan.photometric_interpretation,
                view_position=plan.view_position,
            )
            ds = make_dataset(radiograph, patient_id=plan.patient_id, modality=plan.modality, rng=rng)
            ds.save_as(out / IMAGES_DIR / f"{plan.patient_id}.dcm", enforce_file_format=True)
            _write_png(radiograph.lung_mask, out / LUNG_MASKS_DIR / f"{plan.patient_id}.png")
            _write_png(radiograph.opacity_mask, out / OPACITY_MASKS_DIR / f"{plan.patient_id}.png")
            if radiograph.boxes:
                for x, y, w, h in radiograph.boxes:
                    labels.writerow([plan.patient_id, _number(x), _number(y), _number(w), _number(h), 1])
                    classes.writerow([plan.patient_id, CLASS_OPACITY])
                counts["positive_images"] += 1
                counts["boxes"] += len(radiograph.boxes)
                for kind in radiograph.kinds:
                    counts[f"boxes_{kind}"] += 1
            else:
                labels.writerow([plan.patient_id, "", "", "", "", 0])
                classes.writerow([plan.patient_id, plan.negative_class or CLASS_NOT_NORMAL])
                counts["negative_images"] += 1
                counts["negative_normal" if plan.negative_class == CLASS_NORMAL else "negative_not_normal"] += 1
            severity, extent = lung_involvement(radiograph.opacity_mask, radiograph.right_lung, radiograph.left_lung)
            severities.writerow(
                [
                    plan.patient_id,
                    f"{severity.right:.6f}",
                    f"{severity.left:.6f}",
                    f"{severity.total:.6f}",
                    extent.right,
                    extent.left,
                    extent.total,
                ]
            )
            counts[f"modality_{plan.modality}"] += 1
            counts[f"view_{plan.view_position}"] += 1
            counts[f"{plan.photometric_interpretation.lower()}"] += 1
            if (plan.index + 1) % max(1, n // 10) == 0 or plan.index + 1 == n:
                logger.info("%d / %d images written to %s", plan.index + 1, n, out)
    info = {
        "generator": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "n": n,
        "size_range": list(size_range),
        "positive_fraction": positive_fraction,
        "box_statistics": f"RSNA {LABELS_FILE} via models/data/{BOX_STATS_PATH.name}",
        "counts": {"images": n, **dict(sorted(counts.items()))},
    }
    (out / DATASET_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write synthetic chest radiographs with lung opacities in the RSNA Pneumonia Detection layout.",
        add_help=add_help,
    )
    parser.add_argument("out", metavar="OUT", type=Path, help="new (or empty) folder for the dataset")
    parser.add_argument("--n", type=int, default=100, help="number of images (default 100)")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed gives identical files (default 0)"
    )
    parser.add_argument("--min-size", type=int, default=512, help="smallest rows/columns in pixels (default 512)")
    parser.add_argument("--max-size", type=int, default=3000, help="largest rows/columns in pixels (default 3000)")
    parser.add_argument(
        "--positive-fraction",
        type=float,
        default=0.225,
        help="share of images with opacities (default 0.225, as in RSNA)",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    """Generate the dataset the parsed arguments describe; 0 on success, 2 when an argument is unusable."""
    try:
        generate_dataset(
            args.out,
            args.n,
            args.seed,
            size_range=(args.min_size, args.max_size),
            positive_fraction=args.positive_fraction,
        )
    except (ValueError, FileExistsError) as error:
        logger.error("%s", error)
        return 2
    logger.info("wrote %d images to %s", args.n, args.out)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main(get_args_parser().parse_args()))
