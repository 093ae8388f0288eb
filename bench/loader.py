"""Can data loading keep up with the detector's training? Measures, per CPU core, what `cxrnode train` does:

1. decode: a 1024 x 1024 DICOM (RSNA's size) to the detector's input size — done once per image, then the
   --cache-dir cache serves it;
2. loader: one augmented training sample from the cache (flip/shift/scale, photometric, blur, marks, pasted
   opacities on real negatives: the 1.1 recipe), i.e. what each DataLoader worker does every epoch;
3. model: one training step per image (forward + backward + AdamW) on this machine's CPU, and on CUDA when there is one.

Times are CPU seconds of this process (time.process_time), not wall time, so that other work on a shared machine
does not distort them; images/s per core = 1 / CPU seconds per image.

    PYTHONPATH=. python bench/loader.py [--n 24] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from models.data.rsna import read_dataset
from models.engine import speed_up_batch_norm
from models.nets import DetectorConfig, build_detector
from models.synth import generate_dataset
from models.train_data import Decode, TrainingSet

CONFIG = DetectorConfig(input_size=256, fpn_channels=128, box_head_size=512, mask_head_channels=128)


def cpu_seconds_per_item(function, count: int) -> float:  # noqa: ANN001
    started = time.process_time()
    for index in range(count):
        function(index)
    return (time.process_time() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="synthetic 1024 x 1024 DICOMs to time")
    parser.add_argument("--dicom", type=Path, help="also time decoding this DICOM (e.g. a JPEG-compressed RSNA file)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)  # per core
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "rsna1024"
        generate_dataset(root, args.n, seed=7, size_range=(1024, 1024), positive_fraction=0.5)
        records = read_dataset(root)
        decode = Decode(records, CONFIG.input_size)
        results["decode_cpu_s_per_image"] = cpu_seconds_per_item(lambda i: decode[i], len(records))
        if args.dicom:
            real = Decode([dataclasses.replace(records[0], image=args.dicom, boxes=())], CONFIG.input_size)
            results["decode_dicom_cpu_s_per_image"] = cpu_seconds_per_item(lambda i: real[0], 20)
        items = [decode[i] for i in range(len(records))]
        # the 1.1 recipe; synthetic items carry no lung mask, so give half of them one to exercise pasting
        lungs = torch.zeros(items[0].image.shape, dtype=torch.uint8)
        lungs[40:220, 30:226] = 1
        items = [
            i if k % 2 else type(i)(i.patient_id, i.image, i.boxes[:0], None, lungs, "normal")
            for k, i in enumerate(items)
        ]
        dataset = TrainingSet(items, augment=True, seed=0, size=CONFIG.input_size, paste=0.4, marks=0.3)
        results["loader_cpu_s_per_image"] = cpu_seconds_per_item(lambda i: dataset[i % len(items)], 4 * len(items))
        model = build_detector(CONFIG)
        speed_up_batch_norm(model)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = [dataset[i] for i in range(4)]

        def step(_: int) -> None:
            images, targets = zip(*batch, strict=True)
            loss = sum(model(list(images), list(targets)).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        step(0)
        results["model_cpu_s_per_image_1_thread"] = cpu_seconds_per_item(step, 3) / 4
        if torch.cuda.is_available():
            model.cuda()
            gpu_batch = [(i.cuda(), {k: v.cuda() for k, v in t.items()}) for i, t in (dataset[j] for j in range(16))]
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            for repeat in range(13):
                if repeat == 3:
                    torch.cuda.synchronize()
                    started = time.perf_counter()
                images, targets = zip(*gpu_batch, strict=True)
                loss = sum(model(list(images), list(targets)).values())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            torch.cuda.synchronize()
            results["model_gpu_images_per_s_batch16"] = 16 * 10 / (time.perf_counter() - started)
    for name in [k for k in results if "cpu_s_per_image" in k]:
        results[name.replace("cpu_s_per_image", "images_per_s_per_core")] = 1.0 / results[name]
    text = json.dumps({k: round(v, 4) for k, v in results.items()}, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
