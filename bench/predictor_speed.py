"""Predictor speed: latency of one large radiograph through both networks, and throughput at several batch sizes.

    python bench/predictor_speed.py [--weights DIR] [--device auto] [--json OUT]

Images are synthetic 2048 x 2500 12-bit radiographs (models.synth), prepared as the node prepares them. Each timing
includes everything `Predictor.predict` does: resizing, both networks, masks back to full resolution, severity.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from models import Predictor
from models.synth import make_radiograph, presentation_image


def images(n: int, rows: int, columns: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [presentation_image(make_radiograph(rng, rows, columns, positive=i % 2 == 0)).astype(np.float32)
            for i in range(n)]


def timed(function, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rows", type=int, default=2500)
    parser.add_argument("--columns", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    predictor = Predictor.load(args.weights, device=args.device)
    pool = images(max(args.batches), args.rows, args.columns)
    predictor.predict(pool[:1])  # warm-up
    latency = timed(lambda: predictor.predict(pool[:1]), args.repeats)
    throughput = {}
    for batch in args.batches:
        predictor.max_batch = batch
        predictor.predict(pool[:batch])
        runs = timed(lambda: predictor.predict(pool[:batch]), max(2, args.repeats // batch))
        throughput[batch] = batch / statistics.median(runs)
    device = str(predictor.device)
    if predictor.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(predictor.device)})"
    results = {
        "model_version": predictor.model_version,
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "image": f"{args.columns} x {args.rows}",
        "latency_median_s": statistics.median(latency),
        "latency_p90_s": sorted(latency)[int(0.9 * (len(latency) - 1))],
        "images_per_second": {str(k): v for k, v in throughput.items()},
    }
    print(f"model {results['model_version']} on {device}, {os.cpu_count()} CPU(s), image {results['image']}")
    print(f"latency, one image:  median {results['latency_median_s']:.3f} s  p90 {results['latency_p90_s']:.3f} s")
    for batch, value in throughput.items():
        print(f"batch {batch:>2}: {value:6.2f} images/s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
