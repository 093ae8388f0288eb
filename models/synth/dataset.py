"""A synthetic dataset folder in the RSNA layout (models.data.rsna): the plan of every image, then the images, masks,
labels, class info, severity and a description of the set (`generate_dataset`)."""

from __future__ import annotations

import csv
import json
import logging
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from models.data import rsna
from models.severity import lung_involvement
from models.synth.dicom import GENERATOR_NAME, GENERATOR_VERSION, make_dataset
from models.synth.radiograph import make_radiograph
from models.synth.stats import BOX_STATS_PATH, BoxStats, load_box_stats, sample_box_count

logger = logging.getLogger(__name__)

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
                negative_class="" if positive[i] else (rsna.CLASS_NORMAL if normal else rsna.CLASS_NOT_NORMAL),
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
    for folder in (rsna.IMAGES, rsna.LUNG_MASKS, rsna.OPACITY_MASKS):
        (out / folder).mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    with (
        open(out / rsna.LABELS, "w", newline="") as labels_file,
        open(out / rsna.CLASS_INFO, "w", newline="") as class_file,
        open(out / rsna.SEVERITY, "w", newline="") as severity_file,
    ):
        labels = csv.writer(labels_file, lineterminator="\n")
        classes = csv.writer(class_file, lineterminator="\n")
        severities = csv.writer(severity_file, lineterminator="\n")
        labels.writerow(rsna.LABEL_COLUMNS)
        classes.writerow(rsna.CLASS_INFO_COLUMNS)
        severities.writerow(rsna.SEVERITY_COLUMNS + rsna.EXTENT_COLUMNS)
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
            ds.save_as(out / rsna.IMAGES / f"{plan.patient_id}.dcm", enforce_file_format=True)
            _write_png(radiograph.lung_mask, out / rsna.LUNG_MASKS / f"{plan.patient_id}.png")
            _write_png(radiograph.opacity_mask, out / rsna.OPACITY_MASKS / f"{plan.patient_id}.png")
            if radiograph.boxes:
                for box in radiograph.boxes:
                    labels.writerow(rsna.label_row(plan.patient_id, box))
                    classes.writerow([plan.patient_id, rsna.CLASS_OPACITY])
                counts["positive_images"] += 1
                counts["boxes"] += len(radiograph.boxes)
                for kind in radiograph.kinds:
                    counts[f"boxes_{kind}"] += 1
            else:
                labels.writerow(rsna.label_row(plan.patient_id, None))
                classes.writerow([plan.patient_id, plan.negative_class or rsna.CLASS_NOT_NORMAL])
                counts["negative_images"] += 1
                counts["negative_normal" if plan.negative_class == rsna.CLASS_NORMAL else "negative_not_normal"] += 1
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
        "box_statistics": f"RSNA {rsna.LABELS} via models/data/{BOX_STATS_PATH.name}",
        "counts": {"images": n, **dict(sorted(counts.items()))},
    }
    (out / rsna.DATASET_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
