"""Does the detector read journal-figure marks (panel letters, words, arrows, frames) as opacity?

For every image of the real-opacity held-out split: the opacity probability of the image as it is (at the
detector's 256 px) and of the same image with marks drawn on it (`models.train_data.draw_marks`, 5 draws per
image). Reports the mean change of the probability and the false-positive rate on normal radiographs with and
without marks, at the weights' "present" threshold.

    PYTHONPATH=. python bench/shortcut_probe.py ../shared/data/real-opacity --weights models/weights
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from models.data.real_opacity import load_image, read_real_opacity
from models.predict import Predictor
from models.preprocess import detector_shape, to_network_input
from models.train_data import draw_marks

DRAWS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    predictor = Predictor.load(args.weights, device="cpu")
    present = predictor.thresholds.present
    clean, marked, flagged, normal = [], [], [], []
    for record in read_real_opacity(args.dataset, ("holdout",)):
        pixels = load_image(record)
        small = to_network_input(pixels, detector_shape(*pixels.shape, predictor.detector_config.input_size))[0]
        images = [small] + [draw_marks(small, torch.Generator().manual_seed(d)) for d in range(DRAWS)]
        probabilities = [float(r.scores.max()) if r.scores.numel() else 0.0 for r in predictor.detect(images)]
        clean.append(probabilities[0])
        marked.append(float(np.mean(probabilities[1:])))
        flagged.append(float(np.mean([p >= present for p in probabilities[1:]])))  # share of draws called present
        normal.append(record.normal)
    is_normal = np.array(normal)
    change = np.array(marked) - np.array(clean)
    results = {
        "model_version": predictor.model_version,
        "present_threshold": present,
        "mean_probability_change_normals": float(change[is_normal].mean()),
        "mean_probability_change_others": float(change[~is_normal].mean()),
        "fp_rate_normals_clean": float(np.mean(np.array(clean)[is_normal] >= present)),
        "fp_rate_normals_with_marks": float(np.mean(np.array(flagged)[is_normal])),
        "n_normals": int(is_normal.sum()),
        "n_other": int((~is_normal).sum()),
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
