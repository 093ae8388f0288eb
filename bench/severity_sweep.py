"""Which severity estimate, from the same detector outputs, is nearest the experts' (issue 13)?

Runs both networks once per image of a real-opacity split (validation by default: choose there, score the held-out
split once) and recomputes per-lung involvement for each rule: the opacities counted (score ≥ S) and their pixels
(mask probability ≥ M, or the box instead of the mask); "gated" counts nothing on an image not called "present".
Prints, per rule, the per-lung MAE against the experts' masks (as `cxrnode evaluate`), on normals, and the bias.

    PYTHONPATH=. python bench/severity_sweep.py ../shared/data/real-opacity --weights models/weights
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from models.data.lungs import split_lungs
from models.data.real_opacity import load_image, load_mask, read_real_opacity
from models.predict import Predictor, lung_masks, upsample_masks
from models.severity import involvement_percent

SCORES = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
MASKS = (0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9)


def outputs(predictor: Predictor, root: Path, split: str) -> list[dict]:
    """Per image: lungs, full-resolution mask probabilities, boxes and scores, the true involvement per lung."""
    cases = []
    for record in read_real_opacity(root, (split,)):
        image = load_image(record)
        raw, logits = predictor.detect([image])[0], predictor.segment_lungs([image])[0]
        shape = image.shape
        right, left = lung_masks(logits, shape)
        scale = np.array([shape[1] / raw.network_shape[1], shape[0] / raw.network_shape[0]] * 2)
        opacity, lungs = load_mask(record.opacity_mask, shape), load_mask(record.lung_mask, shape)
        truth = None
        if opacity is not None and lungs is not None:
            sides = zip(split_lungs(lungs), (0, 1), strict=True)
            truth = [(involvement_percent(opacity, lung), side) for lung, side in sides if lung.any()]
        cases.append(
            {
                "shape": shape,
                "lungs": (right, left),
                "probabilities": upsample_masks(raw.masks, shape)[:, 0].cpu().numpy(),
                "boxes": raw.boxes.cpu().numpy() * scale,
                "scores": raw.scores.cpu().numpy(),
                "truth": truth,
                "normal": record.normal,
            }
        )
    return cases


def involvement(case: dict, rule: str, score: float, mask: float, present: float) -> list[float]:
    keep = case["scores"] >= score
    opacity = np.zeros(case["shape"], dtype=bool)
    if rule == "gated" and (not case["scores"].size or case["scores"].max() < present):
        keep[:] = False
    if rule == "box":
        for x0, y0, x1, y1 in case["boxes"][keep]:
            opacity[int(np.floor(y0)) : int(np.ceil(y1)), int(np.floor(x0)) : int(np.ceil(x1))] = True
    else:
        for probabilities in case["probabilities"][keep]:
            opacity |= probabilities >= mask
    return [involvement_percent(opacity, lung) for lung in case["lungs"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--split", default="validation", choices=("train", "validation", "holdout"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    predictor = Predictor.load(args.weights, device="cpu")
    cases = outputs(predictor, args.dataset, args.split)
    results = []
    rules = [("mask", m) for m in MASKS] + [("box", 0.0)] + [("gated", m) for m in MASKS]
    for rule, mask in rules:
        for score in SCORES:
            errors, normals = [], []
            for case in cases:
                predicted = involvement(case, rule, score, mask, predictor.thresholds.present)
                if case["truth"] is not None:
                    errors += [predicted[side] - true for true, side in case["truth"]]
                elif case["normal"]:
                    normals += predicted
            row = {"rule": rule, "score": score, "mask": mask if rule != "box" else None}
            row |= {"mae": float(np.mean(np.abs(errors))), "bias": float(np.mean(errors)), "lungs": len(errors)}
            row["mae_normals"] = float(np.mean(normals)) if normals else None
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
