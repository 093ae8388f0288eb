"""Train the opacity detector (Mask R-CNN) on an RSNA-layout dataset, optionally with real radiographs.

    cxrnode train DATASET --out WEIGHTS_DIR [--real REAL_OPACITY_DIR] [--init-weights DIR] [--batch-size 4] ...
    torchrun --standalone --nproc-per-node N --no-python cxrnode train DATASET --out WEIGHTS_DIR ...

Default schedule: the paper's — LR 0.006 for 6 epochs, 0.001 for 10, 0.0006 for 4 (SGD, momentum 0.9), rates scaled
linearly by the global batch (batch-size x processes x --accumulate) / --lr-reference-batch. A share of DATASET (by
a hash of the patientId) is held out for validation after every epoch. With --real, the real-opacity set's "train"
split (by patient, `models.data.real_opacity`) joins the training images (repeated --real-repeat times) and its
"validation" split joins validation; its "holdout" split is never read. The best epoch is exported to
WEIGHTS_DIR/detector.safetensors with thresholds chosen on validation: the score threshold that maximises rsna_map
(the mean of the synthetic and real validation sets' rsna_map with --real) and, with --real, the "opacity present"
threshold that maximises Youden's J on the real validation images. WEIGHTS_DIR/checkpoint-detector.pt (model,
optimizer, epoch, iteration, RNG states) allows an exact --resume. Structure after torchvision's
references/detection/train.py (get_args_parser + main); data-parallel under torchrun (`models.distributed`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from models import distributed
from models.data import real_opacity
from models.data.rsna import Record, read_dataset
from models.engine import (
    PAPER_SCHEDULE,
    add_training_arguments,
    decode_once,
    load_checkpoint,
    lr_for_epoch,
    make_optimizer,
    save_checkpoint,
    seed_everything,
    speed_up_batch_norm,
    train_one_epoch,
)
from models.metrics import ImageDetections, map50, roc_auc, rsna_map
from models.nets import BACKBONES, DetectorConfig, LungConfig, build_detector, build_lung_segmenter
from models.predict import lung_masks, resolve_device
from models.preprocess import letterbox, to_network_input
from models.train_data import Cached, Decode, TrainingSet
from models.weights import DEMO_WEIGHTS, load_into, load_network, save_network, set_manifest_fields

log = logging.getLogger(__name__)

THRESHOLD_GRID = tuple(round(t, 2) for t in np.arange(0.30, 0.96, 0.05))
PRESENT_GRID = tuple(round(t, 2) for t in np.arange(0.05, 0.99, 0.01))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the lung-opacity detector", add_help=add_help)
    parser.add_argument("dataset", type=Path, help="folder in the RSNA layout (stage_2_train_labels.csv, ...)")
    add_training_arguments(parser, schedule=PAPER_SCHEDULE, batch_size=4)
    parser.add_argument("--val-dataset", type=Path, help="validate on this folder instead of a held-out share")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="held-out share when no --val-dataset")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images (0: all)")
    parser.add_argument("--real", type=Path, help="real-opacity folder: its train split trains, validation validates")
    parser.add_argument("--real-repeat", type=int, default=1, help="each real training image this often per epoch")
    parser.add_argument("--init-weights", type=Path, help="start from this weights folder's detector (fine-tuning)")
    parser.add_argument(
        "--paste", type=float, default=0.0, help="probability of pasting synthetic opacities into a real negative"
    )
    parser.add_argument(
        "--marks", type=float, default=0.0, help="probability of drawing letters/arrows/frames on a training image"
    )
    parser.add_argument("--accumulate", type=int, default=1, help="batches per optimizer step (gradient accumulation)")
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


def _collate(batch: list[Any]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def split_records(records: list[Record], fraction: float) -> tuple[list[Record], list[Record]]:
    """(train, validation) by a hash of the patientId: stable across runs and dataset sizes."""

    def held_out(r: Record) -> bool:
        return int(hashlib.sha256(r.patient_id.encode()).hexdigest()[:8], 16) / 2**32 < fraction

    return [r for r in records if not held_out(r)], [r for r in records if held_out(r)]


def decode_all(records: list[Any], input_size: int, cache_dir: Path, workers: int) -> list[Cached]:
    """Every image decoded and resized once (cached across runs and --resume)."""
    return decode_once(
        Decode(records, input_size), [r.image for r in records], f"detector-{input_size}-v2", cache_dir, workers
    )


@torch.inference_mode()
def add_lungs(items: list[Cached], weights: Path) -> list[Cached]:
    """Real items without a lung mask get the lung segmenter's (of `weights`), for --paste."""
    loaded = load_network(weights, "lungs")
    config = LungConfig.from_dict(loaded.entry["config"])
    net = build_lung_segmenter(config)
    load_into(net, loaded, weights / loaded.entry["file"])
    net.eval()
    out = []
    for item in items:
        if item.lungs is None and item.source != "synthetic":
            size = config.input_size
            logits = net(to_network_input(item.image.float(), (size, size))[None])["out"][0]
            right, left = lung_masks(logits, tuple(item.image.shape))
            item = dataclasses.replace(item, lungs=torch.from_numpy(right | left).to(torch.uint8))
        out.append(item)
    return out


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


def youden_threshold(labels: list[bool], probabilities: list[float]) -> float:
    """The 'opacity present' threshold on PRESENT_GRID with the highest sensitivity + specificity - 1 (the highest
    such threshold on ties: fewer false alarms)."""
    y = np.asarray(labels, dtype=bool)
    p = np.asarray(probabilities, dtype=np.float64)
    best, best_j = 0.5, -2.0
    for threshold in PRESENT_GRID:
        j = (p[y] >= threshold).mean() - (p[~y] >= threshold).mean() if y.any() and (~y).any() else 0.0
        if j >= best_j:
            best, best_j = float(threshold), float(j)
    return best


def validate(
    model: torch.nn.Module, sets: dict[str, list[Cached]], device: torch.device, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, float]]:
    """Scores per validation set ('synthetic', 'real') and the thresholds they choose."""
    predictions = {
        name: detect_cached(model, items, device, args.batch_size, args.input_size) for name, items in sets.items()
    }
    maps = {}
    for threshold in THRESHOLD_GRID:
        values = []
        for name, items in sets.items():
            kept = [
                ImageDetections(truth=i.boxes.numpy(), boxes=b[s >= threshold], scores=s[s >= threshold])
                for i, (b, s) in zip(items, predictions[name], strict=True)
            ]
            values.append(rsna_map(kept) or 0.0)
        maps[float(threshold)] = float(np.mean(values))
    score = max(maps, key=lambda t: (maps[t], t))
    scores: dict[str, Any] = {}
    thresholds = {"score": score, "mask": 0.5, "present": score}
    for name, items in sets.items():
        for key, value in detection_scores(items, predictions[name], score).items():
            scores[key if name == "synthetic" else f"{name}_{key}"] = value
    if "real" in sets:
        labels = [len(i.boxes) > 0 for i in sets["real"]]
        probabilities = [float(s.max()) if s.size else 0.0 for _, s in predictions["real"]]
        thresholds["present"] = youden_threshold(labels, probabilities)
        negatives = [p for p, y in zip(probabilities, labels, strict=True) if not y]
        scores["real_fp_rate"] = float(np.mean([p >= thresholds["present"] for p in negatives])) if negatives else None
        scores["real_select"] = (scores["real_auc"] or 0.0) + (scores["real_map50"] or 0.0)
    return scores, thresholds


def _micro_seed(args: argparse.Namespace, world: distributed.World):  # noqa: ANN202
    """Reseed the global RNG (Mask R-CNN's anchor and RoI sampling) before micro-batch j of a step, from (seed,
    iteration, j * world size + rank): the same draws whatever the process count, --accumulate or --resume."""

    def reseed(iteration: int, micro: int) -> None:
        torch.manual_seed(args.seed * 1_000_003 + iteration * 1_009 + micro * world.size + world.rank)

    return reseed


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_data(
    args: argparse.Namespace, config: DetectorConfig, world: distributed.World
) -> tuple[list[Cached], dict[str, list[Cached]]]:
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
    real_train = real_opacity.read_real_opacity(args.real, ("train",)) if args.real else []
    real_val = real_opacity.read_real_opacity(args.real, ("validation",)) if args.real else []
    cache_dir = args.cache_dir or args.out / "cache"
    if not world.main:  # rank 0 decodes and fills the cache; the others then read it
        distributed.barrier(world)
    log.info(
        "decoding %d + %d real training and %d + %d real validation images",
        len(train_records),
        len(real_train),
        len(val_records),
        len(real_val),
    )
    train_items = decode_all(train_records, config.input_size, cache_dir, args.workers)
    val_sets = {"synthetic": decode_all(val_records, config.input_size, cache_dir, args.workers)}
    if real_train:
        real_items = decode_all(real_train, config.input_size, cache_dir, args.workers)
        if args.paste > 0:
            real_items = add_lungs(real_items, args.init_weights or DEMO_WEIGHTS)
        train_items += real_items * args.real_repeat
    if real_val:
        val_sets["real"] = decode_all(real_val, config.input_size, cache_dir, args.workers)
    if world.main:
        distributed.barrier(world)
    return train_items, val_sets


def main(args: argparse.Namespace) -> int:
    world, device_name = distributed.start(args.device)
    try:
        return _train(args, world, resolve_device(device_name))
    finally:
        distributed.stop(world)


def _train(args: argparse.Namespace, world: distributed.World, device: torch.device) -> int:
    seed_everything(args.seed)
    config = DetectorConfig(
        backbone=args.backbone,
        input_size=args.input_size,
        anchor_sizes=tuple(args.anchor_sizes),
        fpn_channels=args.fpn_channels,
        box_head_size=args.box_head_size,
        mask_head_channels=args.mask_head_channels,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    train_items, val_sets = _load_data(args, config, world)

    model = build_detector(config, pretrained_backbone=args.pretrained_backbone, pretrained_coco=args.pretrained_coco)
    if args.init_weights:
        loaded = load_network(args.init_weights, "detector")
        if DetectorConfig.from_dict(loaded.entry["config"]) != config:
            raise SystemExit(
                f"{args.init_weights}: its detector was made with {loaded.entry['config']}; "
                "pass the same --backbone/--input-size/--fpn-channels/... options"
            )
        load_into(model, loaded, args.init_weights / loaded.entry["file"])
    model.to(device)
    speed_up_batch_norm(model)
    optimizer = make_optimizer(args, model.parameters())
    scaler = torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" else None
    start_epoch, iteration, best = 0, 0, {"select": -1.0}
    history: list[dict[str, Any]] = []
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
        if "rng" in state:
            _set_rng_state(state["rng"])
        log.info("resumed from %s after epoch %d", args.resume, start_epoch)
    trained = DistributedDataParallel(model) if world.distributed else model

    dataset = TrainingSet(
        train_items, augment=True, seed=args.seed, size=config.input_size, paste=args.paste, marks=args.marks
    )
    sampler = DistributedSampler(dataset, num_replicas=world.size, rank=world.rank, shuffle=True, seed=args.seed)
    epochs = sum(stage.epochs for stage in args.lr_schedule)
    lr_scale = args.batch_size * world.size * args.accumulate / args.lr_reference_batch
    for epoch in range(start_epoch, epochs):
        dataset.epoch = epoch
        sampler.set_epoch(epoch)
        loader = DataLoader(
            dataset,
            batch_size=args.batch_size,
            sampler=sampler,
            num_workers=args.workers,
            collate_fn=_collate,
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
            trained,
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
            progress=not args.no_progress and world.main,
            accumulate=args.accumulate,
            before_micro_step=_micro_seed(args, world),
        )
        if world.main:
            best = _end_of_epoch(args, model, config, val_sets, device, epoch, epochs, lr, loss, started, best, history)
            save_checkpoint(
                checkpoint_path,
                model=model.state_dict(),
                optimizer=optimizer.state_dict(),
                epoch=epoch,
                iteration=iteration,
                best=best,
                history=history,
                config=config.to_dict(),
                rng=_rng_state(),
                world_size=world.size,
                args=vars(args) | {"lr_schedule": [s.__dict__ for s in args.lr_schedule]},
            )
            if "epoch" in best:  # a network was saved: its entry exists
                set_manifest_fields(args.out, detector={"history": history})  # each epoch: an interrupted run keeps it
        distributed.barrier(world)
    if world.main:
        print(json.dumps({"best": best}, indent=2, default=str))
    return 0


def _end_of_epoch(
    args: argparse.Namespace,
    model: torch.nn.Module,
    config: DetectorConfig,
    val_sets: dict[str, list[Cached]],
    device: torch.device,
    epoch: int,
    epochs: int,
    lr: float,
    loss: float,
    started: float,
    best: dict[str, Any],
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """Validate, log, and export the network when it is the best so far (rank 0). Returns the best record."""
    rng = _rng_state()  # validation must not move the training RNG
    scores, thresholds = validate(model, val_sets, device, args)
    _set_rng_state(rng)
    select = scores.get("real_select", scores["rsna_map"] or 0.0)
    record = {
        "epoch": epoch + 1,
        "lr": lr,
        "loss": loss,
        "threshold": thresholds["score"],
        "present": thresholds["present"],
        **scores,
        "select": select,
        "seconds": round(time.perf_counter() - started, 1),
    }
    history.append(record)
    log.info("epoch %d/%d %s", epoch + 1, epochs, json.dumps(record))
    if select <= best["select"]:
        return best
    sources = {"dataset": str(args.dataset), "real": str(args.real) if args.real else None}
    save_network(
        args.out,
        "detector",
        model,
        config,
        name=args.name,
        version=args.version,
        extra={
            "thresholds": thresholds,
            "trained": {
                **sources,
                "init_weights": str(args.init_weights) if args.init_weights else None,
                "epoch": epoch + 1,
                "validation": {k: v for k, v in record.items() if k != "seconds"},
            },
        },
    )
    return record


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    raise SystemExit(main(get_args_parser().parse_args()))
