"""Evaluate weights on a dataset: detection, image-level decision, lung masks and severity.

    cxrnode evaluate DATASET [--weights DIR] [--json OUT] [--split all|holdout|validation|train]

DATASET is an RSNA-layout folder (stage_2_train_labels.csv + stage_2_train_images/, and optionally the
lung_masks/ and severity.csv that `cxrnode synth` writes), a real-opacity folder (real radiographs with opacity and
lung masks, normals; its fixed held-out split by default, see `models.evaluate_real` for the keys it adds, and with
--json a ROC curve and a worst-cases sheet as PNG beside the JSON) or a folder of lung image + mask pairs (lung Dice
only).

Keys of the JSON (null where the dataset has no ground truth for it):
    rsna_map      the RSNA challenge metric (mean over IoU 0.40-0.75 of TP/(TP+FP+FN), per image, then over images)
    map50         COCO-style average precision at IoU 0.5 (pycocotools), over all detections
    auc           ROC AUC of the image-level "opacity present" probability
    lung_dice     mean over images of the mean of the right-lung and left-lung Dice (sides must be right too)
    severity_mae  mean absolute error of the total severity, in percentage points
    n_images      images evaluated
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from models.data.lungs import is_holdout, read_gray, read_mask, read_pairs, split_lungs
from models.data.real_opacity import is_real_opacity
from models.data.rsna import IMAGES, corners, load_image, read_dataset
from models.errors import DatasetError
from models.evaluate_real import evaluate_real
from models.metrics import ImageDetections, dice, map50, roc_auc, rsna_map
from models.predict import Predictor

log = logging.getLogger(__name__)

KEYS = ("rsna_map", "map50", "auc", "lung_dice", "severity_mae", "n_images")
REAL_KEYS = ("auc_all_negatives", "sensitivity", "fp_rate_normals", "fp_rate_not_normal", "severity_mae_normals")
REAL_KEYS += ("severity_mae_constant",)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate detector and lung segmenter weights", add_help=add_help)
    parser.add_argument("dataset", type=Path, help="RSNA-layout folder, or a folder of lung image/mask pairs")
    parser.add_argument("--weights", type=Path, help="weights folder (default: the demo weights)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    parser.add_argument(
        "--split",
        choices=("all", "holdout", "validation", "train"),
        help="real-opacity sets: the patient split to score (default holdout, never trained on); other sets: all "
        "(default) or holdout, the fixed 20%% held out from training by models.data.lungs.is_holdout",
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _lung_dice(right: np.ndarray, left: np.ndarray, truth: np.ndarray) -> float:
    true_right, true_left = split_lungs(truth)
    return (dice(right, true_right) + dice(left, true_left)) / 2


def evaluate_rsna(predictor: Predictor, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    records = read_dataset(root)
    if args.split not in (None, "all", "holdout"):
        raise DatasetError(f"{root}: --split {args.split} exists only for real-opacity folders; use all or holdout")
    if args.split == "holdout":
        records = [r for r in records if is_holdout(r.patient_id)]
    if args.limit:
        records = records[: args.limit]
    if not records:
        raise DatasetError(f"{root}: no images to evaluate")
    thresholded, everything, labels, probabilities = [], [], [], []
    lung_scores: list[float] = []
    severity_errors: list[float] = []
    bar = tqdm(total=len(records), desc="evaluate", disable=args.no_progress, dynamic_ncols=True)
    for start in range(0, len(records), args.batch_size):
        chunk = records[start : start + args.batch_size]
        images = [load_image(r) for r in chunk]
        raws = predictor.detect(images)
        lungs = predictor.segment_lungs(images)
        for record, image, raw, logits in zip(chunk, images, raws, lungs, strict=True):
            finding = predictor.finding(image.shape, raw, logits)  # type: ignore[arg-type]
            truth = np.array([corners(b) for b in record.boxes], dtype=np.float64).reshape(-1, 4)
            thresholded.append(ImageDetections(truth, finding.boxes, finding.scores))
            scale = np.array([image.shape[1] / raw.network_shape[1], image.shape[0] / raw.network_shape[0]] * 2)
            everything.append(ImageDetections(truth, raw.boxes.cpu().numpy() * scale, raw.scores.cpu().numpy()))
            labels.append(record.positive)
            probabilities.append(finding.opacity_probability)
            if record.lung_mask is not None:
                lung_scores.append(
                    _lung_dice(finding.right_lung, finding.left_lung, read_mask(record.lung_mask, image.shape))
                )
            if record.severity_total is not None:
                severity_errors.append(abs(finding.severity.total - record.severity_total))
        bar.update(len(chunk))
    bar.close()
    return {
        "rsna_map": rsna_map(thresholded),
        "map50": map50(everything),
        "auc": roc_auc(labels, probabilities),
        "lung_dice": float(np.mean(lung_scores)) if lung_scores else None,
        "severity_mae": float(np.mean(severity_errors)) if severity_errors else None,
        "n_images": len(records),
        "n_positive": int(sum(labels)),
        "thresholds": predictor.thresholds.__dict__,
    }


def evaluate_pairs(predictor: Predictor, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    pairs = read_pairs(root)
    if args.split not in (None, "all", "holdout"):
        raise DatasetError(f"{root}: --split {args.split} exists only for real-opacity folders; use all or holdout")
    if args.split == "holdout":
        pairs = [p for p in pairs if is_holdout(p.name)]
    if args.limit:
        pairs = pairs[: args.limit]
    by_view: dict[str, list[float]] = defaultdict(list)
    scores = []
    for start in tqdm(range(0, len(pairs), args.batch_size), desc="evaluate", disable=args.no_progress):
        chunk = pairs[start : start + args.batch_size]
        images = [read_gray(p.image) for p in chunk]
        for pair, image, finding in zip(chunk, images, predictor.predict(images), strict=True):
            value = _lung_dice(finding.right_lung, finding.left_lung, read_mask(pair.mask, image.shape))
            scores.append(value)
            by_view[pair.view or "unknown"].append(value)
    return {
        "rsna_map": None,
        "map50": None,
        "auc": None,
        "lung_dice": float(np.mean(scores)) if scores else None,
        "severity_mae": None,
        "n_images": len(pairs),
        "lung_dice_by_view": {v: {"dice": float(np.mean(s)), "n": len(s)} for v, s in sorted(by_view.items())},
    }


def evaluate(dataset: Path, args: argparse.Namespace) -> dict[str, Any]:
    predictor = Predictor.load(args.weights, device=args.device)
    started = time.perf_counter()
    if is_real_opacity(dataset):
        results = evaluate_real(predictor, dataset, args)
    elif (dataset / IMAGES).is_dir():
        results = evaluate_rsna(predictor, dataset, args)
    else:
        results = evaluate_pairs(predictor, dataset, args)
    results.update(
        dataset=str(dataset),
        split=results.get("split") or args.split or "all",
        model_version=predictor.model_version,
        seconds=round(time.perf_counter() - started, 1),
    )
    return results


def format_table(results: dict[str, Any]) -> str:
    names = {
        "rsna_map": "RSNA challenge mAP (IoU 0.40-0.75)",
        "map50": "COCO AP at IoU 0.5",
        "auc": "opacity-present ROC AUC",
        "lung_dice": "lung Dice (per lung)",
        "severity_mae": "severity MAE (points)",
        "n_images": "images",
        "auc_all_negatives": "ROC AUC, all negatives",
        "sensitivity": "sensitivity at 'present'",
        "fp_rate_normals": "false-positive rate, normals",
        "fp_rate_not_normal": "false-positive rate, RSNA not normal",
        "severity_mae_normals": "severity MAE on normals (points)",
        "severity_mae_constant": "  reference: one number for every lung",
    }

    def text(value: Any) -> str:
        return "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))

    lines = [f"{'metric':<38} value", "-" * 48]
    real = "by_source" in results
    for key in KEYS + (REAL_KEYS if real else ()):
        lines.append(f"{names[key]:<38} {text(results.get(key))}")
    for source, entry in results.get("by_source", {}).items():
        shown = ", ".join(f"{k} {text(entry.get(k))}" for k in ("n_images", "auc", "sensitivity", "fp_rate_normals"))
        lines.append(
            f"  {source}: {shown}, map50 {text(entry.get('map50'))}, severity MAE {text(entry['severity_mae'])}"
        )
    for name, path in results.get("figures", {}).items():
        lines.append(f"{name}: {path}")
    for view, entry in results.get("lung_dice_by_view", {}).items():
        lines.append(f"{'  lung Dice, ' + view:<38} {entry['dice']:.4f}  (n={entry['n']})")
    lines.append(f"model {results['model_version']} on {results['dataset']} ({results['split']})")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    results = evaluate(args.dataset, args)
    print(format_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main(get_args_parser().parse_args()))
