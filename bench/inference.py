"""Inference speed: the Predictor at several batch sizes against a naive loop, on the CPU and (when there is one)
the GPU; and the latency of one large radiograph through both networks.

    python bench/inference.py [--weights DIR] [--device auto] [--json OUT]

The naive loop is what a plain torchvision evaluation loop does with the same weights: one image at a time,
float32, `torch.no_grad()`, the full-resolution image (scaled to [0, 1]) handed to Mask R-CNN, whose own transform
resizes it and pastes the masks back at full resolution, the lung segmenter's logits upsampled to full resolution,
and the same severity computation. The Predictor resizes once (antialiased) before normalising, batches (a fixed
letterboxed input, so a batch is one tensor), runs under `torch.inference_mode()`, and on CUDA uses fp16 autocast. Images are synthetic
radiographs (models.synth) of --rows x --columns, prepared as the node prepares them; every timing includes
everything predict() does (resizing, both networks, masks back to full resolution, severity).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models import Predictor
from models.preprocess import normalize
from models.severity import lung_involvement
from models.synth import make_radiograph, presentation_image


def images(n: int, rows: int, columns: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [
        presentation_image(make_radiograph(rng, rows, columns, positive=i % 2 == 0)).astype(np.float32)
        for i in range(n)
    ]


def seconds(function: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - started)
    return out


def naive_loop(predictor: Predictor, pool: list[np.ndarray]) -> None:
    """One image at a time, fp32, no_grad, full resolution in and out: the reference."""
    lung_size = predictor.lung_config.input_size
    th = predictor.thresholds
    with torch.no_grad():
        for image in pool:
            x = normalize(torch.from_numpy(image)).expand(3, -1, -1).contiguous().to(predictor.device)
            out = predictor.detector([x])[0]  # resized inside, masks pasted back at full resolution
            keep = out["scores"] >= th.score
            opacity = (
                (out["masks"][keep] >= th.mask).any(0)[0].cpu().numpy() if keep.any() else np.zeros(image.shape, bool)
            )
            logits = predictor.lungs(F.interpolate(x[None], size=(lung_size, lung_size), mode="bilinear"))["out"]
            labels = F.interpolate(logits, size=image.shape, mode="bilinear")[0].argmax(0).cpu().numpy()
            lung_involvement(opacity, labels == 1, labels == 2)


def measure(device: str, args: argparse.Namespace, pool: list[np.ndarray]) -> dict[str, object]:
    predictor = Predictor.load(args.weights, device=device)
    torch_device = predictor.device
    predictor.predict(pool[:1])
    latency = seconds(lambda: predictor.predict(pool[:1]), args.repeats, torch_device)
    per_batch = {}
    same = pool[: args.images]  # the same images for every batch size and for the naive loop
    for batch in args.batches:
        predictor.max_batch = batch
        predictor.predict(same[:batch])
        runs = seconds(lambda: predictor.predict(same), 2, torch_device)
        per_batch[str(batch)] = len(same) / statistics.median(runs)
    naive_pool = same
    naive_loop(predictor, naive_pool[:1])
    naive = len(naive_pool) / statistics.median(seconds(lambda: naive_loop(predictor, naive_pool), 2, torch_device))
    name = str(torch_device) + (
        f" ({torch.cuda.get_device_name(torch_device)})"
        if torch_device.type == "cuda"
        else f" ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads)"
    )
    best = max(per_batch.values())
    return {
        "device": name,
        "model_version": predictor.model_version,
        "latency_one_image_median_s": statistics.median(latency),
        "latency_p90_s": float(np.percentile(latency, 90)),
        "predictor_images_per_s": per_batch,
        "naive_images_per_s": naive,
        "speedup_best_batch": best / naive,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--device", default="auto", help="auto runs the CPU, and the GPU too when there is one")
    parser.add_argument("--rows", type=int, default=2500)
    parser.add_argument("--columns", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--images", type=int, default=16, help="images per throughput run")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    pool = images(max(*args.batches, args.images), args.rows, args.columns)
    devices = (
        ["cpu", "cuda"]
        if args.device == "auto" and torch.cuda.is_available()
        else (["cpu"] if args.device == "auto" else [args.device])
    )
    results = [measure(device, args, pool) for device in devices]
    for r in results:
        print(f"{r['device']}  model {r['model_version']}  image {args.columns} x {args.rows}")
        print(
            f"  one image, both networks: median {r['latency_one_image_median_s']:.3f} s, "
            f"p90 {r['latency_p90_s']:.3f} s"
        )
        print(f"  naive loop (batch 1, fp32): {r['naive_images_per_s']:.2f} images/s")
        for batch, value in r["predictor_images_per_s"].items():  # type: ignore[union-attr]
            print(f"  Predictor batch {batch:>2}: {value:.2f} images/s")
        print(f"  best batch / naive: {r['speedup_best_batch']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
