"""How close to the experts' lung involvement can these weights get at all (issue 13, severity MAE ≤ 10)?

Three references on a real-opacity split (validation by default; the held-out split is for the final score only):

  released      per-lung MAE of the weights' own severity rule (as `cxrnode evaluate`)
  constant      the best single number for every lung, chosen with hindsight on the split itself
  rescaled      the best a * severity + b (and, for lungs with severity 0, a separate constant c), chosen with
                hindsight on the split itself: no post-processing of the released figures can do better on it
  probe         a small involvement head (2 conv layers, ~0.1 M parameters) trained on the *frozen* detector's FPN
                features with the experts' opacity masks of the train split (normal radiographs as all-zero masks),
                scored per lung at several probability thresholds and as the mean probability over the lung: how
                much dense involvement signal the detector's features hold

    PYTHONPATH=. python bench/severity_probe.py ../shared/data/real-opacity --weights models/weights [--epochs 60]

CPU: about 2 minutes for the features (train + validation), then a few seconds per probe epoch.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.data.lungs import split_lungs
from models.data.real_opacity import load_image, load_mask, read_real_opacity
from models.predict import Predictor, lung_masks
from models.preprocess import letterbox
from models.severity import involvement_percent

THRESHOLDS = (0.3, 0.4, 0.5, 0.6)


@torch.inference_mode()
def case(predictor: Predictor, record: Any) -> dict[str, Any]:
    """One image: the released per-lung severity, FPN features, predicted lungs on the detector's grid, truth."""
    image = load_image(record)
    size = predictor.detector_config.input_size
    captured: dict[str, torch.Tensor] = {}  # the FPN levels of the detector's own forward pass
    hook = predictor.detector.backbone.register_forward_hook(lambda module, inputs, output: captured.update(output))
    try:
        raw = predictor.detect([image])[0]
    finally:
        hook.remove()
    logits = predictor.segment_lungs([image])[0]
    shape = raw.network_shape
    fine = captured["0"]
    features = torch.cat([fine, F.interpolate(captured["1"], size=fine.shape[-2:], mode="bilinear")], 1)[0]
    finding = predictor.finding(image.shape, raw, logits)
    right, left = lung_masks(logits, shape)
    opacity = load_mask(record.opacity_mask, image.shape)
    lungs = load_mask(record.lung_mask, image.shape)
    target, truth = None, None
    if opacity is not None and lungs is not None:
        small = F.interpolate(torch.from_numpy(opacity)[None, None].float(), size=shape, mode="area")[0, 0]
        target = letterbox(small, size)
        true_right, true_left = split_lungs(lungs)
        truth = [involvement_percent(opacity, lung) if lung.any() else None for lung in (true_right, true_left)]
    elif record.normal:
        target = torch.zeros(size, size)
    return {
        "features": features.half(),
        "target": target,
        "truth": truth,
        "normal": record.normal,
        "released": [finding.severity.right, finding.severity.left],
        "lungs": (right, left),
        "shape": shape,
    }


def lung_errors(cases: list[dict], predict: Callable[[dict], list[float]]) -> tuple[float, float]:
    """(per-lung MAE against the experts, mean per-lung involvement on normal radiographs)."""
    errors, normals = [], []
    for c in cases:
        predicted = predict(c)
        if c["truth"] is not None:
            errors += [abs(p - t) for p, t in zip(predicted, c["truth"], strict=True) if t is not None]
        elif c["normal"]:
            normals += predicted
    return float(np.mean(errors)), float(np.mean(normals)) if normals else float("nan")


def hindsight(cases: list[dict]) -> dict[str, Any]:
    pairs = [
        (p, t) for c in cases if c["truth"] for p, t in zip(c["released"], c["truth"], strict=True) if t is not None
    ]
    predicted, truth = (np.array(v) for v in zip(*pairs, strict=True))
    constant = min((float(np.abs(truth - k).mean()), float(k)) for k in np.arange(0, 60.5, 0.5))
    grid = [(a, b) for a in np.arange(0.3, 4.0, 0.05) for b in np.arange(-10, 30.5, 0.5)]
    linear = min((float(np.abs(a * predicted + b - truth).mean()), round(a, 2), float(b)) for a, b in grid)
    piecewise = min(
        (float(np.abs(np.where(predicted > 0, a * predicted + b, k) - truth).mean()), round(a, 2), float(b), float(k))
        for a, b in grid[::4]
        for k in np.arange(0, 40, 2.0)
    )
    return {
        "lungs": int(truth.size),
        "released_mae": float(np.abs(predicted - truth).mean()),
        "best_constant": {"mae": constant[0], "value": constant[1]},
        "best_linear": {"mae": linear[0], "a": linear[1], "b": linear[2]},
        "best_piecewise": {"mae": piecewise[0], "a": piecewise[1], "b": piecewise[2], "c": piecewise[3]},
        "correlation": float(np.corrcoef(predicted, truth)[0, 1]),
    }


def train_probe(train: list[dict], channels: int, size: int, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    head = nn.Sequential(
        nn.Conv2d(channels, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Dropout2d(0.1),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 1, 1),
    )
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)
    labelled = [c for c in train if c["target"] is not None]
    for _ in range(epochs):
        head.train()
        order = torch.randperm(len(labelled)).tolist()
        for start in range(0, len(order), 8):
            chunk = [labelled[i] for i in order[start : start + 8]]
            logits = probe_logits(head, chunk, size)
            target = torch.stack([c["target"] for c in chunk])
            inside = torch.zeros_like(target)  # the letterbox padding is no one's business
            for i, c in enumerate(chunk):
                inside[i, : c["shape"][0], : c["shape"][1]] = 1
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            p = logits.sigmoid() * inside
            dice = 1 - (2 * (p * target).sum((1, 2)) + 1) / (p.sum((1, 2)) + target.sum((1, 2)) + 1)
            loss = (bce * inside).sum() / inside.sum() + 0.5 * dice.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return head.eval()


def probe_logits(head: nn.Module, cases: list[dict], size: int) -> torch.Tensor:
    features = torch.stack([c["features"].float() for c in cases])
    return F.interpolate(head(features), size=(size, size), mode="bilinear")[:, 0]


@torch.inference_mode()
def score_probe(head: nn.Module, cases: list[dict], size: int) -> dict[str, Any]:
    probabilities = probe_logits(head, cases, size).sigmoid().numpy()
    for c, p in zip(cases, probabilities, strict=True):
        c["probe"] = p[: c["shape"][0], : c["shape"][1]]
    scores = {}
    for threshold in THRESHOLDS:
        mae, normals = lung_errors(
            cases, lambda c, t=threshold: [involvement_percent(c["probe"] >= t, m) for m in c["lungs"]]
        )
        scores[f"p>={threshold}"] = {"mae": mae, "normals": normals}
    mean = lambda c: [100 * float(c["probe"][m].mean()) if m.any() else 0.0 for m in c["lungs"]]  # noqa: E731
    mae, normals = lung_errors(cases, mean)
    scores["mean probability"] = {"mae": mae, "normals": normals}
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="a real-opacity folder")
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--split", default="validation", choices=("validation", "holdout"))
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    predictor = Predictor.load(args.weights, device="cpu")
    size = predictor.detector_config.input_size
    train = [case(predictor, r) for r in read_real_opacity(args.root, ("train",))]
    scored = [case(predictor, r) for r in read_real_opacity(args.root, (args.split,))]
    report: dict[str, Any] = {"model": predictor.model_version, "split": args.split, "hindsight": hindsight(scored)}
    report["released_on_normals"] = lung_errors(scored, lambda c: c["released"])[1]
    channels = train[0]["features"].shape[0]
    report["probe"] = {
        f"seed {seed}": score_probe(train_probe(train, channels, size, args.epochs, seed), scored, size)
        for seed in args.seeds
    }
    text = json.dumps(report, indent=2, default=lambda v: round(v, 2))
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
