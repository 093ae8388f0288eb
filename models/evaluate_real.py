"""Evaluation on real radiographs in the real-opacity layout (`models.data.real_opacity`), held-out split by default.

Keys of the result (null where there is nothing to score):
    rsna_map, map50      boxes at the reporting threshold / over all detections (negatives count their false boxes)
    auc                  ROC AUC of opacity_probability: images with opacity vs normal radiographs
    auc_all_negatives    the same against every image without opacity (RSNA "not normal" ones too)
    sensitivity          share of images with opacity called "opacity present" at the operating threshold
    fp_rate_normals      share of normal radiographs called "opacity present" at the operating threshold
    fp_rate_not_normal   the same for RSNA "not normal, no opacity" images
    severity_mae         per lung: mean |predicted - true| involvement in percentage points, true = area(opacity ∩
                         lung) / area(lung) from the experts' masks (right and left lungs each count once)
    severity_mae_normals per lung on normal radiographs (true involvement 0)
    severity_mae_constant the reference for severity_mae: the MAE of one number for every lung (the median true
                         involvement of these lungs, chosen with hindsight); a model that does not beat it has learnt
                         nothing about how much of a lung is involved
    lung_dice            per lung (right and left scored separately) where both lungs are annotated
    by_source            the same keys per source ("opacity", "normal", "rsna-opacity", "rsna-not-normal")
    images               one row per image: file name, source, probability, present, image rsna score, severity
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from models.data.lungs import split_lungs
from models.data.real_opacity import RealRecord, load_image, load_mask, read_real_opacity
from models.data.rsna import corners
from models.errors import DatasetError
from models.figures import Case, draw_cases, draw_roc, thumbnail
from models.metrics import ImageDetections, dice, map50, roc_auc, rsna_image_score, rsna_map
from models.predict import Predictor
from models.severity import involvement_percent

WORST_CASES = 8


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _rate(flags: list[bool]) -> float | None:
    return float(np.mean(flags)) if flags else None


def _constant_mae(truth: list[float]) -> float | None:
    """MAE of the best single guess (the median minimises the absolute error)."""
    return float(np.mean(np.abs(np.array(truth) - np.median(truth)))) if truth else None


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics of the module docstring over `rows` (per-image dicts with their detections)."""
    positives = [r for r in rows if r["positive"]]
    normals = [r for r in rows if r["normal"]]
    negatives = [r for r in rows if not r["positive"]]
    has_truth = any(r["positive"] for r in rows)
    return {
        "rsna_map": rsna_map([r["thresholded"] for r in rows]) if has_truth or rows else None,
        "map50": map50([r["everything"] for r in rows]),
        "auc": roc_auc([r["positive"] for r in positives + normals], [r["probability"] for r in positives + normals]),
        "auc_all_negatives": roc_auc([r["positive"] for r in rows], [r["probability"] for r in rows]),
        "sensitivity": _rate([r["present"] for r in positives]),
        "fp_rate_normals": _rate([r["present"] for r in normals]),
        "fp_rate_not_normal": _rate([r["present"] for r in negatives if not r["normal"]]),
        "severity_mae": _mean([e for r in rows for e in r["severity_errors"]]),
        "severity_mae_normals": _mean([e for r in normals for e in r["severity_normal"]]),
        "severity_mae_constant": _constant_mae([t for r in rows for t in r["severity_true"] or ()]),
        "lung_dice": _mean([r["lung_dice"] for r in rows if r["lung_dice"] is not None]),
        "n_images": len(rows),
        "n_positive": len(positives),
        "n_normal": len(normals),
    }


def _row(predictor: Predictor, record: RealRecord, image: np.ndarray, raw: Any, logits: Any) -> dict[str, Any]:
    finding = predictor.finding(image.shape, raw, logits)
    truth = np.array([corners(b) for b in record.boxes], dtype=np.float64).reshape(-1, 4)
    scale = np.array([image.shape[1] / raw.network_shape[1], image.shape[0] / raw.network_shape[0]] * 2)
    thresholded = ImageDetections(truth, finding.boxes, finding.scores)
    row: dict[str, Any] = {
        "image": record.image_id,
        "source": record.source,
        "positive": record.positive,
        "normal": record.normal,
        "probability": finding.opacity_probability,
        "present": finding.opacity_present,
        "image_rsna_score": rsna_image_score(thresholded),
        "thresholded": thresholded,
        "everything": ImageDetections(truth, raw.boxes.cpu().numpy() * scale, raw.scores.cpu().numpy()),
        "severity_errors": [],
        "severity_normal": [],
        "severity_true": None,
        "severity_predicted": [round(finding.severity.right, 2), round(finding.severity.left, 2)],
        "lung_dice": None,
    }
    opacity = load_mask(record.opacity_mask, image.shape)
    lungs = load_mask(record.lung_mask, image.shape)
    if opacity is not None and lungs is not None:
        true_right, true_left = split_lungs(lungs)
        true = []
        for predicted, lung in ((finding.severity.right, true_right), (finding.severity.left, true_left)):
            if lung.any():  # a partial annotation scores only its lung
                value = involvement_percent(opacity, lung)
                true.append(round(value, 2))
                row["severity_errors"].append(abs(predicted - value))
        row["severity_true"] = true
        if not record.lung_mask_partial:
            row["lung_dice"] = (dice(finding.right_lung, true_right) + dice(finding.left_lung, true_left)) / 2
    elif record.normal:
        row["severity_normal"] = [finding.severity.right, finding.severity.left]
    picture, factor = thumbnail(image)
    row["_case"] = (picture, truth * factor, finding.boxes * factor)
    return row


def evaluate_real(predictor: Predictor, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    split = args.split or "holdout"
    splits = ("train", "validation", "holdout") if split == "all" else (split,)
    records = read_real_opacity(root, splits)
    if args.limit:
        records = records[: args.limit]
    if not records:
        raise DatasetError(f"{root}: no images in split {split!r} to evaluate")
    rows = []
    bar = tqdm(total=len(records), desc="evaluate", disable=args.no_progress, dynamic_ncols=True)
    for start in range(0, len(records), args.batch_size):
        chunk = records[start : start + args.batch_size]
        images = [load_image(r) for r in chunk]
        for record, image, raw, logits in zip(
            chunk, images, predictor.detect(images), predictor.segment_lungs(images), strict=True
        ):
            rows.append(_row(predictor, record, image, raw, logits))
        bar.update(len(chunk))
    bar.close()
    results = summarise(rows)
    sources = sorted({r["source"] for r in rows})
    results["by_source"] = {s: summarise([r for r in rows if r["source"] == s]) for s in sources}
    results["thresholds"] = predictor.thresholds.__dict__
    results["split"] = split
    if args.json:
        results["figures"] = _figures(rows, args.json, predictor, results)
    results["images"] = [
        {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k in _IMAGE_KEYS} for r in rows
    ]
    return results


_IMAGE_KEYS = ("image", "source", "positive", "probability", "present", "image_rsna_score", "severity_true")
_IMAGE_KEYS += ("severity_predicted", "lung_dice")


def _figures(rows: list[dict[str, Any]], json_path: Path, predictor: Predictor, results: dict[str, Any]) -> dict:
    """ROC (opacity vs normal radiographs) and the worst cases, beside the JSON file."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    stem = json_path.with_suffix("")
    figures: dict[str, str] = {}
    scored = [r for r in rows if r["positive"] or r["normal"]]
    if any(r["positive"] for r in scored) and any(r["normal"] for r in scored):
        roc = Path(f"{stem}-roc.png")
        auc = results["auc"]
        draw_roc(
            roc,
            [r["positive"] for r in scored],
            [r["probability"] for r in scored],
            predictor.thresholds.present,
            f"opacity vs normal radiographs: AUC {auc:.3f} (n={len(scored)})",
        )
        figures["roc"] = str(roc)
    false_alarms = sorted((r for r in rows if not r["positive"]), key=lambda r: -r["probability"])
    misses = sorted((r for r in rows if r["positive"]), key=lambda r: (r["image_rsna_score"] or 0.0, r["probability"]))
    worst = false_alarms[: WORST_CASES // 2] + misses[: WORST_CASES - min(len(false_alarms), WORST_CASES // 2)]
    cases = []
    for r in worst:
        picture, truth, predicted = r["_case"]
        kind = "opacity" if r["positive"] else r["source"]
        caption = f"{r['image'][:34]}\n{kind}: p={r['probability']:.2f} score={r['image_rsna_score'] or 0:.2f}"
        cases.append(Case(picture, truth, predicted, caption))
    if cases:
        sheet = Path(f"{stem}-worst.png")
        draw_cases(sheet, cases)
        figures["worst_cases"] = str(sheet)
    return figures
