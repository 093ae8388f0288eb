"""What the two trainers share: the learning-rate schedule, photometric augmentation, checkpoints, the training loop."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

log = logging.getLogger(__name__)

PAPER_SCHEDULE = "0.006:6,0.001:10,0.0006:4"
"""The paper's schedule: learning rate 0.006 for 6 epochs, 0.001 for 10, 0.0006 for 4."""


@dataclass(frozen=True)
class Stage:
    lr: float
    epochs: int


def parse_schedule(text: str) -> list[Stage]:
    """'LR:EPOCHS,LR:EPOCHS,...' → stages; an error names the bad part."""
    stages = []
    for part in text.split(","):
        try:
            lr_text, epochs_text = part.split(":")
            stage = Stage(float(lr_text), int(epochs_text))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad learning-rate stage {part!r}: write LR:EPOCHS, e.g. {PAPER_SCHEDULE}"
            ) from None
        if stage.lr <= 0 or stage.epochs <= 0:
            raise argparse.ArgumentTypeError(f"bad learning-rate stage {part!r}: LR and EPOCHS must be positive")
        stages.append(stage)
    return stages


def lr_for_epoch(stages: list[Stage], epoch: int, scale: float) -> float:
    """Learning rate of a 0-based epoch; epochs beyond the schedule keep the last rate."""
    for stage in stages:
        if epoch < stage.epochs:
            return stage.lr * scale
        epoch -= stage.epochs
    return stages[-1].lr * scale


def add_training_arguments(parser: argparse.ArgumentParser, *, schedule: str, batch_size: int) -> None:
    """Arguments both trainers take."""
    parser.add_argument("--out", type=Path, required=True, help="weights folder to write (created if needed)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="images per step (default %(default)s)")
    parser.add_argument(
        "--lr-schedule",
        type=parse_schedule,
        default=parse_schedule(schedule),
        help=f"LR:EPOCHS stages (default {schedule}); the number of epochs is their sum",
    )
    parser.add_argument(
        "--lr-reference-batch",
        type=int,
        default=8,
        help="batch size the schedule's rates are meant for; rates are scaled linearly by batch-size / this",
    )
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup-iters", type=int, default=100, help="linear warm-up steps at the start")
    parser.add_argument("--max-iters", type=int, default=0, help="stop each epoch after this many steps (0: all)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    parser.add_argument("--amp", action="store_true", help="mixed precision on CUDA")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loading processes")
    parser.add_argument("--resume", type=Path, help="continue from this checkpoint.pt (model, optimizer, epoch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="cxrnode", help="model name written to the manifest")
    parser.add_argument("--version", default="0", help="model version written to the manifest")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def photometric_augment(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Exposure, contrast, gamma and noise jitter on a [0, 1] image; the result stays in [0, 1]."""

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    out = image.clamp(0, 1) ** math.exp(uniform(-0.35, 0.35))
    out = (out - 0.5) * uniform(0.8, 1.2) + 0.5 + uniform(-0.08, 0.08)
    sigma = uniform(0.0, 0.03)
    if sigma > 0:
        out = out + sigma * torch.randn(out.shape, generator=generator)
    return out.clamp_(0, 1)


def speed_up_batch_norm(model: torch.nn.Module, momentum: float = 0.1) -> None:
    """MobileNetV3's BatchNorm layers average their running statistics with momentum 0.01, tuned for fine-tuning
    pretrained weights; from scratch the running statistics then lag the fast-changing weights for hundreds of
    steps and the network in eval mode predicts nothing. 0.1 (PyTorch's default) keeps them current."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


def make_optimizer(args: argparse.Namespace, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    trainable = [p for p in params if p.requires_grad]
    if args.optimizer == "adamw":
        return torch.optim.AdamW(trainable, lr=1e-3, weight_decay=args.weight_decay)
    return torch.optim.SGD(trainable, lr=1e-3, momentum=args.momentum, weight_decay=args.weight_decay)


def decode_once(dataset: Dataset, sources: Sequence[Path], tag: str, cache_dir: Path, workers: int) -> list[Any]:
    """Every item of `dataset`, decoded once (in `workers` processes) and kept in `cache_dir`, under a key made of
    `tag` and the source files' names and modification times: a changed dataset is decoded again."""
    key = hashlib.sha256(json.dumps([tag] + [(str(p), p.stat().st_mtime_ns) for p in sources]).encode()).hexdigest()
    path = cache_dir / f"{tag}-{key[:16]}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)  # our own cache file
    items = list(DataLoader(dataset, batch_size=None, num_workers=workers))
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(items, path)
    return items


def save_checkpoint(path: Path, **state: Any) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    return torch.load(path, map_location="cpu", weights_only=False)


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Any],
    step: Callable[[torch.nn.Module, Any], torch.Tensor],
    *,
    lr: float,
    epoch: int,
    first_iteration: int,
    warmup_iters: int,
    max_iters: int,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
    progress: bool,
    accumulate: int = 1,
    before_micro_step: Callable[[int, int], None] | None = None,
) -> tuple[float, int]:
    """One pass over `batches`; `step(model, batch)` returns the loss. Returns (mean loss, iterations done so far).

    With `accumulate` N, the gradients of N consecutive batches (each loss divided by N) make one optimizer step;
    a trailing incomplete group is dropped. Under DistributedDataParallel the gradients are averaged across ranks
    only on the group's last batch (`no_sync` before). `before_micro_step(iteration, j)` runs before batch j of each
    group (the detector reseeds its sampling RNG there, so that runs are reproducible across ranks and resumes)."""
    model.train()
    total, count = 0.0, 0
    iteration = first_iteration
    bar = tqdm(batches, desc=f"epoch {epoch + 1}", leave=False, disable=not progress, dynamic_ncols=True)
    micro = 0
    optimizer.zero_grad(set_to_none=True)
    for batch in bar:
        warm = min(1.0, (iteration + 1) / warmup_iters) if warmup_iters else 1.0
        for group in optimizer.param_groups:
            group["lr"] = lr * warm
        if before_micro_step is not None:
            before_micro_step(iteration, micro)
        last = micro == accumulate - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with torch.autocast(device.type, enabled=scaler is not None):
                loss = step(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {float(loss)} at epoch {epoch + 1}, iteration {iteration}; lower the learning rate"
                )
            scaled = loss / accumulate
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += float(loss.detach())
        micro += 1
        if not last:
            continue
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        micro = 0
        count += 1
        iteration += 1
        bar.set_postfix(loss=f"{total / (count * accumulate):.4f}", lr=f"{lr * warm:.2g}")
        if max_iters and count >= max_iters:
            break
    optimizer.zero_grad(set_to_none=True)
    return (total / (count * accumulate) if count else float("nan")), iteration
