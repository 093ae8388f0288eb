"""Train the opacity detector (Mask R-CNN) on an RSNA-layout dataset.

    cxrnode train DATASET --out WEIGHTS_DIR [--backbone mobilenet_v3_large_fpn] [--batch-size 4] ...

Default schedule: the paper's — LR 0.006 for 6 epochs, 0.001 for 10, 0.0006 for 4 (SGD, momentum 0.9), rates scaled
linearly by batch-size / 8. A share of the dataset (by a hash of the patientId) is held out for validation after every
epoch; the best epoch by rsna_map is exported to WEIGHTS_DIR/detector.safetensors with the score threshold that
maximised it. WEIGHTS_DIR/checkpoint-detector.pt allows --resume. Structure after torchvision's
references/detection/train.py (get_args_parser + main).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from models.data.rsna import Record, corners, read_dataset
from models.data.rsna import load_image as load_rsna_image
from models.engine import (
    PAPER_SCHEDULE,
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
from models.metrics import ImageDetections, map50, roc_auc, rsna_map
from models.nets import BACKBONES, DetectorConfig, build_detector
from models.predict import resolve_device
from models.preprocess import detector_shape, letterbox, to_network_input
from models.weights import save_network, set_manifest_fields

log = logging.getLogger(__name__)

THRESHOLD_GRID = tuple(round(t, 2) for t in np.arange(0.30, 0.96, 0.05))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the lung-opacity detector", add_help=add_help)
    parser.add_argument("dataset", type=Path, help="folder in the RSNA layout (stage_2_train_labels.csv, ...)")
    add_training_arguments(parser, schedule=PAPER_SCHEDULE, batch_size=4)
    parser.add_argument("--val-dataset", type=Path, help="validate on this folder instead of a held-out share")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="held-out share when no --val-dataset")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images (0: all)")
    parser.add_argument("--backbone", choices=BACKBONES, default="mobilenet_v3_large_fpn")
    parser.add_argument("--input-size", type=int, default=320, help="long side in pixels the detector sees")
    parser.add_argument("--anchor-sizes", type=int, nargs="+", default=(), help="per level, at --input-size")
    parser.add_argument("--fpn-channels", type=int, default=256)
    parser.add_argument("--box-head-size", type=int, default=1024)
    parser.add_argument("--mask-head-channels", type=int, default=256)
    parser.add_argument("--pretrained-backbone", type=Path, help="ImageNet state dict of the backbone (a file)")
    parser.add_argument("--pretrained-coco", type=Path, help="torchvision COCO Mask R-CNN state dict (a file)")
    parser.add_argument("--cache-dir", type=Path, help="decoded-image cache (default: OUT/cache)")
    return parser


# -- data -------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cached:
    """One radiograph at detector resolution: a (rows, columns) float16 image in [0, 1] and its boxes there."""

    patient_id: str
    image: torch.Tensor
    boxes: torch.Tensor  # (N, 4) x0, y0, x1, y1


class _Decode(Dataset):
    def __init__(self, records: list[Record], input_size: int) -> None:
        self.records, self.input_size = records, input_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Cached:
        record = self.records[index]
        pixels = load_rsna_image(record)
        shape = detector_shape(*pixels.shape, self.input_size)
        scale = torch.tensor([shape[1] / pixels.shape[1], shape[0] / pixels.shape[0]] * 2)
        boxes = torch.tensor([corners(b) for b in record.boxes], dtype=torch.float32).reshape(-1, 4) * scale
        image = to_network_input(pixels, shape)[0].to(torch.float16)
        return Cached(record.patient_id, image, boxes)


def decode_all(records: list[Record], input_size: int, cache_dir: Path, workers: int) -> list[Cached]:
    """Every image decoded and resized once (cached across runs and --resume)."""
    return decode_once(
        _Decode(records, input_size), [r.image for r in records], f"detector-{input_size}", cache_dir, workers
    )


def ellipse_masks(boxes: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(N, rows, columns) uint8 masks of the ellipses inscribed in (x0, y0, x1, y1) boxes."""
    rows, columns = shape
    yy = torch.arange(rows, dtype=torch.float32)[None, :, None] + 0.5
    xx = torch.arange(columns, dtype=torch.float32)[None, None, :] + 0.5
    cx = ((boxes[:, 0] + boxes[:, 2]) / 2)[:, None, None]
    cy = ((boxes[:, 1] + boxes[:, 3]) / 2)[:, None, None]
    rx = ((boxes[:, 2] - boxes[:, 0]) / 2).clamp(min=0.5)[:, None, None]
    ry = ((boxes[:, 3] - boxes[:, 1]) / 2).clamp(min=0.5)[:, None, None]
    return (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0).to(torch.uint8)


class TrainingSet(Dataset):
    """Cached radiographs with augmentation: flips, scale and shift, exposure/contrast/gamma/noise."""

    def __init__(self, items: list[Cached], augment: bool, seed: int, size: int) -> None:
        self.items, self.augment, self.seed, self.size = items, augment, seed, size
        self.geometry = v2.Compose(
            [v2.RandomHorizontalFlip(0.5), v2.RandomAffine(degrees=0, translate=(0.06, 0.06), scale=(0.85, 1.15))]
        )
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        item = self.items[index]
        image = item.image.float()[None]
        boxes = item.boxes
        if self.augment:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + index)
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=generator)))  # for v2's own draws
            wrapped = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:]))
            image, wrapped = self.geometry(tv_tensors.Image(image), wrapped)
            boxes = v2.functional.clamp_bounding_boxes(wrapped).as_subclass(torch.Tensor)
            image = photometric_augment(image.as_subclass(torch.Tensor), generator)
        size = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
        boxes = boxes[size >= 16].reshape(-1, 4)
        image = letterbox(image, self.size)
        target = {
            "boxes": boxes,
            "labels": torch.ones(len(boxes), dtype=torch.int64),
            "masks": ellipse_masks(boxes, (self.size, self.size)),
        }
        return image.expand(3, -1, -1).contiguous(), target


def _collate(batch: list[Any]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def split_records(records: list[Record], fraction: float) -> tuple[list[Record], list[Record]]:
    """(train, validation) by a hash of the patientId: stable across runs and dataset sizes."""

    def held_out(r: Record) -> bool:
        return int(hashlib.sha256(r.patient_id.encode()).hexdigest()[:8], 16) / 2**32 < fraction

    return [r for r in records if not held_out(r)], [r for r in records if held_out(r)]


# -- validation -------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def detect_cached(
    model: torch.nn.Module, items: list[Cached], device: torch.device, batch_size: int, size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(boxes, scores) per cached image at cache resolution."""
    model.eval()
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        images = [letterbox(i.image.float()[None], size).expand(3, -1, -1).to(device) for i in chunk]
        for prediction in model(images):
            out.append((prediction["boxes"].float().cpu().numpy(), prediction["scores"].float().cpu().numpy()))
    return out


def detection_scores(
    items: list[Cached], predictions: list[tuple[np.ndarray, np.ndarray]], threshold: float
) -> dict[str, float | None]:
    """rsna_map at a score threshold, threshold-free map50 and the image-level AUC."""
    kept = [
        ImageDetections(truth=i.boxes.numpy(), boxes=b[s >= threshold], scores=s[s >= threshold])
        for i, (b, s) in zip(items, predictions, strict=True)
    ]
    everything = [
        ImageDetections(truth=i.boxes.numpy(), boxes=b, scores=s) for i, (b, s) in zip(items, predictions, strict=True)
    ]
    labels = [len(i.boxes) > 0 for i in items]
    probabilities = [float(s.max()) if s.size else 0.0 for _, s in predictions]
    return {"rsna_map": rsna_map(kept), "map50": map50(everything), "auc": roc_auc(labels, probabilities)}


def best_threshold(items: list[Cached], predictions: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """The score threshold on THRESHOLD_GRID with the highest rsna_map, and that rsna_map."""
    best = (0.5, -1.0)
    for threshold in THRESHOLD_GRID:
        kept = [
            ImageDetections(truth=i.boxes.numpy(), boxes=b[s >= threshold], scores=s[s >= threshold])
            for i, (b, s) in zip(items, predictions, strict=True)
        ]
        value = rsna_map(kept) or 0.0
        if value > best[1]:
            best = (float(threshold), value)
    return best


# -- main -------------------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    seed_everything(args.seed)
    device = resolve_device(args.device)
    records = read_dataset(args.dataset)
    if args.limit:
        records = records[: args.limit]
    if args.val_dataset:
        train_records, val_records = records, read_dataset(args.val_dataset)
    else:
        train_records, val_records = split_records(records, args.val_fraction)
    if not train_records or not val_records:
        raise SystemExit(
            f"{args.dataset}: {len(train_records)} training and {len(val_records)} validation images; "
            "need at least one of each (add images, or pass --val-dataset)"
        )
    config = DetectorConfig(
        backbone=args.backbone,
        input_size=args.input_size,
        anchor_sizes=tuple(args.anchor_sizes),
        fpn_channels=args.fpn_channels,
        box_head_size=args.box_head_size,
        mask_head_channels=args.mask_head_channels,
    )
    cache_dir = args.cache_dir or args.out / "cache"
    log.info("decoding %d training and %d validation images", len(train_records), len(val_records))
    train_items = decode_all(train_records, config.input_size, cache_dir, args.workers)
    val_items = decode_all(val_records, config.input_size, cache_dir, args.workers)

    model = build_detector(config, pretrained_backbone=args.pretrained_backbone, pretrained_coco=args.pretrained_coco)
    model.to(device)
    speed_up_batch_norm(model)
    optimizer = make_optimizer(args, model.parameters())
    scaler = torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" else None
    start_epoch, iteration, best = 0, 0, {"rsna_map": -1.0}
    history: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = args.out / "checkpoint-detector.pt"
    if args.resume:
        state = load_checkpoint(args.resume)
        if state.get("config") != config.to_dict():
            raise SystemExit(
                f"{args.resume}: checkpoint was made with another network configuration "
                f"({state.get('config')}); pass the same --backbone/--input-size/... options"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, iteration, best, history = state["epoch"] + 1, state["iteration"], state["best"], state["history"]
        log.info("resumed from %s after epoch %d", args.resume, start_epoch)

    dataset = TrainingSet(train_items, augment=True, seed=args.seed, size=config.input_size)
    epochs = sum(stage.epochs for stage in args.lr_schedule)
    lr_scale = args.batch_size / args.lr_reference_batch
    for epoch in range(start_epoch, epochs):
        dataset.epoch = epoch
        loader = DataLoader(
            dataset,
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            collate_fn=_collate,
            generator=torch.Generator().manual_seed(args.seed + epoch),
            persistent_workers=False,
            pin_memory=device.type == "cuda",
        )

        def step(net: torch.nn.Module, batch: Any) -> torch.Tensor:
            images, targets = batch
            images = [i.to(device, non_blocking=True) for i in images]
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            return sum(net(images, targets).values())  # type: ignore[return-value]

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
        predictions = detect_cached(model, val_items, device, args.batch_size, config.input_size)
        threshold, _ = best_threshold(val_items, predictions)
        scores = detection_scores(val_items, predictions, threshold)
        record = {
            "epoch": epoch + 1,
            "lr": lr,
            "loss": loss,
            "threshold": threshold,
            **scores,
            "seconds": round(time.perf_counter() - started, 1),
        }
        history.append(record)
        log.info("epoch %d/%d %s", epoch + 1, epochs, json.dumps(record))
        if (scores["rsna_map"] or 0.0) > best["rsna_map"]:
            best = record
            save_network(
                args.out,
                "detector",
                model,
                config,
                name=args.name,
                version=args.version,
                extra={
                    "thresholds": {"score": threshold, "mask": 0.5, "present": threshold},
                    "trained": {
                        "dataset": str(args.dataset),
                        "images": len(train_items),
                        "epoch": epoch + 1,
                        "validation": {k: v for k, v in record.items() if k != "seconds"},
                    },
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
            args=vars(args) | {"lr_schedule": [s.__dict__ for s in args.lr_schedule]},
        )
        if "epoch" in best:  # a network was saved: its entry exists
            set_manifest_fields(args.out, detector={"history": history})  # each epoch: an interrupted run keeps it
    print(json.dumps({"best": best}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    raise SystemExit(main(get_args_parser().parse_args()))
