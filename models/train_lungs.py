"""Train the lung-field segmenter (LR-ASPP MobileNetV3, classes background / right lung / left lung).

    cxrnode train-lungs SOURCE [SOURCE ...] --out WEIGHTS_DIR

Each SOURCE is a folder of image + mask pairs (see models.data.lungs, e.g. ../shared/data/lungs-real) or an
RSNA-layout folder with lung_masks/ (what `cxrnode synth` writes). The fixed 20 % held out by `is_holdout` (a hash of
the file name or patientId) is never trained on; it is the validation set after every epoch, and the best epoch by
mean per-lung Dice is exported to WEIGHTS_DIR/lungs.safetensors.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from models.data.lungs import is_holdout, lung_labels, read_gray, read_mask, read_pairs
from models.data.rsna import LUNG_MASKS, Record, read_dataset
from models.data.rsna import load_image as load_rsna_image
from models.engine import (
    add_training_arguments,
    decode_once,
    load_checkpoint,
    lr_for_epoch,
    make_optimizer,
    photometric_augment,
    save_checkpoint,
    seed_everything,
    speed_up_batch_norm,
    train_one_epoch,
)
from models.nets import LungConfig, build_lung_segmenter
from models.predict import resolve_device
from models.preprocess import to_network_input
from models.weights import save_network, set_manifest_fields

log = logging.getLogger(__name__)

LUNG_SCHEDULE = "0.002:30,0.0005:10"


@dataclass(frozen=True)
class LungSample:
    """Where one training image and its mask come from."""

    name: str
    source: str  # the SOURCE folder it came from
    view: str
    holdout: bool
    kind: str  # "pair" or "rsna"
    image: Path
    mask: Path


def collect(sources: list[Path]) -> list[LungSample]:
    samples = []
    for source in sources:
        if (source / LUNG_MASKS).is_dir():
            for record in read_dataset(source):
                if record.lung_mask is not None:
                    samples.append(
                        LungSample(
                            record.patient_id,
                            str(source),
                            "",
                            is_holdout(record.patient_id),
                            "rsna",
                            record.image,
                            record.lung_mask,
                        )
                    )
        else:
            for pair in read_pairs(source):
                samples.append(
                    LungSample(pair.name, str(source), pair.view, is_holdout(pair.name), "pair", pair.image, pair.mask)
                )
    return samples


def load_sample(sample: LungSample) -> tuple[np.ndarray, np.ndarray]:
    """(image in presentation polarity, uint8 label map 0/1/2) at the sample's own resolution."""
    if sample.kind == "rsna":
        image = load_rsna_image(Record(sample.name, sample.image, (), sample.mask, None))
    else:
        image = read_gray(sample.image)
    return image, lung_labels(read_mask(sample.mask, image.shape))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the lung-field segmenter", add_help=add_help)
    parser.add_argument(
        "sources", type=Path, nargs="+", help="image/mask pair folders or RSNA folders with lung_masks/"
    )
    add_training_arguments(parser, schedule=LUNG_SCHEDULE, batch_size=8)
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--pretrained-backbone", type=Path, help="ImageNet MobileNetV3-Large state dict (a file)")
    parser.add_argument("--cache-dir", type=Path, help="decoded-image cache (default: OUT/cache)")
    parser.set_defaults(optimizer="adamw", lr_reference_batch=8, warmup_iters=50)
    return parser


class _Decode(Dataset):
    def __init__(self, samples: list[LungSample], size: int) -> None:
        self.samples, self.size = samples, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, labels = load_sample(self.samples[index])
        x = to_network_input(image, (self.size, self.size))[0].to(torch.float16)
        y = F.interpolate(torch.from_numpy(labels)[None, None].float(), size=(self.size, self.size), mode="nearest")
        return x, y[0, 0].to(torch.uint8)


def decode_all(
    samples: list[LungSample], size: int, cache_dir: Path, workers: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every pair decoded and resized once (cached across runs and --resume)."""
    return decode_once(_Decode(samples, size), [s.image for s in samples], f"lungs-{size}", cache_dir, workers)


class TrainingSet(Dataset):
    """Rotation, scale, shift and exposure jitter; no flips (right and left lungs must stay on their sides)."""

    def __init__(self, items: list[tuple[torch.Tensor, torch.Tensor]], seed: int) -> None:
        self.items, self.seed, self.epoch = items, seed, 0
        self.geometry = v2.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.85, 1.15))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision import tv_tensors

        image, labels = self.items[index]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + index)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=generator)))
        image_t, labels_t = self.geometry(tv_tensors.Image(image.float()[None]), tv_tensors.Mask(labels[None]))
        image = photometric_augment(image_t.as_subclass(torch.Tensor), generator)
        return image.expand(3, -1, -1).contiguous(), labels_t.as_subclass(torch.Tensor)[0].long()


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1 - mean Dice of the two lung classes (soft), which cross-entropy alone under-weights at the borders."""
    probabilities = logits.softmax(1)[:, 1:]
    onehot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    inter = (probabilities * onehot).sum((2, 3))
    total = probabilities.sum((2, 3)) + onehot.sum((2, 3))
    return 1 - ((2 * inter + 1) / (total + 1)).mean()


@torch.inference_mode()
def validate(
    model: torch.nn.Module, items: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> list[float]:
    """Per image: the mean of the right-lung and left-lung Dice at network resolution."""
    model.eval()
    scores = []
    for start in range(0, len(items), 16):
        chunk = items[start : start + 16]
        images = torch.stack([x.float()[None].expand(3, -1, -1) for x, _ in chunk]).to(device)
        predicted = model(images)["out"].argmax(1).cpu()
        for labels, guess in zip((y for _, y in chunk), predicted, strict=True):
            per_lung = []
            for lung in (1, 2):
                a, b = guess == lung, labels == lung
                total = int(a.sum()) + int(b.sum())
                per_lung.append(1.0 if total == 0 else 2.0 * int((a & b).sum()) / total)
            scores.append(float(np.mean(per_lung)))
    return scores


def main(args: argparse.Namespace) -> int:
    seed_everything(args.seed)
    device = resolve_device(args.device)
    samples = collect(args.sources)
    train_samples = [s for s in samples if not s.holdout]
    val_samples = [s for s in samples if s.holdout]
    if not train_samples or not val_samples:
        raise SystemExit(f"{len(train_samples)} training and {len(val_samples)} held-out pairs; need both")
    config = LungConfig(input_size=args.input_size)
    cache_dir = args.cache_dir or args.out / "cache"
    log.info("decoding %d training and %d held-out pairs", len(train_samples), len(val_samples))
    train_items = decode_all(train_samples, config.input_size, cache_dir, args.workers)
    val_items = decode_all(val_samples, config.input_size, cache_dir, args.workers)

    model = build_lung_segmenter(config, pretrained_backbone=args.pretrained_backbone).to(device)
    speed_up_batch_norm(model)
    optimizer = make_optimizer(args, model.parameters())
    scaler = torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" else None
    start_epoch, iteration, best, history = 0, 0, {"dice": -1.0}, []
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = args.out / "checkpoint-lungs.pt"
    if args.resume:
        state = load_checkpoint(args.resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, iteration, best, history = state["epoch"] + 1, state["iteration"], state["best"], state["history"]

    dataset = TrainingSet(train_items, args.seed)
    epochs = sum(stage.epochs for stage in args.lr_schedule)
    lr_scale = args.batch_size / args.lr_reference_batch

    def step(net: torch.nn.Module, batch: Any) -> torch.Tensor:
        images, labels = (t.to(device, non_blocking=True) for t in batch)
        logits = net(images)["out"]
        return F.cross_entropy(logits, labels) + soft_dice_loss(logits, labels)

    for epoch in range(start_epoch, epochs):
        dataset.epoch = epoch
        loader = DataLoader(
            dataset,
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            generator=torch.Generator().manual_seed(args.seed + epoch),
            drop_last=len(dataset) > args.batch_size,
        )
        started = time.perf_counter()
        lr = lr_for_epoch(args.lr_schedule, epoch, lr_scale)
        loss, iteration = train_one_epoch(
            model,
            optimizer,
            loader,
            step,
            lr=lr,
            epoch=epoch,
            first_iteration=iteration,
            warmup_iters=args.warmup_iters,
            max_iters=args.max_iters,
            scaler=scaler,
            device=device,
            progress=not args.no_progress,
        )
        per_image = validate(model, val_items, device)
        dice = float(np.mean(per_image))
        record = {
            "epoch": epoch + 1,
            "lr": lr,
            "loss": loss,
            "dice": dice,
            "seconds": round(time.perf_counter() - started, 1),
        }
        history.append(record)
        log.info("epoch %d/%d %s", epoch + 1, epochs, json.dumps(record))
        if not math.isnan(dice) and dice > best["dice"]:
            best = record
            save_network(
                args.out,
                "lungs",
                model,
                config,
                name=args.name,
                version=args.version,
                extra={
                    "trained": {
                        "sources": [str(s) for s in args.sources],
                        "images": len(train_items),
                        "held_out": len(val_items),
                        "epoch": epoch + 1,
                        "validation_dice": dice,
                    }
                },
            )
        save_checkpoint(
            checkpoint_path,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            epoch=epoch,
            iteration=iteration,
            best=best,
            history=history,
            config=config.to_dict(),
        )
        if "epoch" in best:  # a network was saved: its entry exists
            set_manifest_fields(args.out, lungs={"history": history})  # each epoch: an interrupted run keeps it
    print(json.dumps({"best": best}, indent=2))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    raise SystemExit(main(get_args_parser().parse_args()))
