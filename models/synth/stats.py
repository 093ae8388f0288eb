"""The RSNA box statistics the generator samples from: how many opacities a positive image has, on which lung, and the
real boxes' positions and sizes (`models/data/rsna_box_stats.json`, recomputed from the Kaggle label files with
`write_box_stats` when they are at hand; the generator itself never reads them)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.data import rsna

BOX_STATS_PATH = Path(__file__).resolve().parents[1] / "data" / "rsna_box_stats.json"


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
        if tuple(reader.fieldnames or ()) != tuple(rsna.LABEL_COLUMNS):
            raise ValueError(f"{labels_csv} has columns {reader.fieldnames}, expected {','.join(rsna.LABEL_COLUMNS)}")
        for row in reader:
            n_rows += 1
            boxes = images.setdefault(row["patientId"], [])
            if row["Target"] == "1":
                positive.add(row["patientId"])
                boxes.append(tuple(float(row[k]) for k in ("x", "y", "width", "height")))  # type: ignore[arg-type]
    all_boxes = np.array([b for pid in sorted(images) for b in images[pid]], dtype=np.float64).reshape(-1, 4)
    side = ((all_boxes[:, 0] + all_boxes[:, 2] / 2) >= rsna.IMAGE_SIZE / 2).astype(np.float64)
    counts = Counter(len(images[pid]) for pid in positive)
    two = [images[pid] for pid in sorted(positive) if len(images[pid]) == 2]
    split = [((a[0] + a[2] / 2) < rsna.IMAGE_SIZE / 2) != ((b[0] + b[2] / 2) < rsna.IMAGE_SIZE / 2) for a, b in two]
    one = [images[pid][0] for pid in sorted(positive) if len(images[pid]) == 1]
    one_right = [(b[0] + b[2] / 2) < rsna.IMAGE_SIZE / 2 for b in one]
    rng = np.random.default_rng(sample_seed)
    pick = np.sort(rng.choice(len(all_boxes), size=min(n_sample, len(all_boxes)), replace=False))
    quantile_levels = [0.05, 0.25, 0.5, 0.75, 0.95]
    stats: dict[str, Any] = {
        "source": labels_csv.name,
        "source_rows": n_rows,
        "image_size": rsna.IMAGE_SIZE,
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
        negatives = classes[rsna.CLASS_NORMAL] + classes[rsna.CLASS_NOT_NORMAL]
        stats["class_rows"] = {k: classes[k] for k in sorted(classes)}
        stats["normal_fraction_of_negatives"] = round(classes[rsna.CLASS_NORMAL] / negatives, 6)
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
        boxes=read_only(np.asarray(raw["sample"], dtype=np.float64)),
    )


def read_only(array: np.ndarray) -> np.ndarray:
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
