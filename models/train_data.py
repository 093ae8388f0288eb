"""The detector's training data: radiographs decoded once to detector resolution, and their augmentation.

Sources: RSNA-layout folders (DICOM; boxes become inscribed-ellipse masks) and the real-opacity layout (PNG; boxes
with the experts' opacity masks, lung masks). Augmentation, all drawn from a generator seeded by (seed, epoch,
index) so that it is the same in any process, worker or rank:

- geometry: horizontal flip, shift and scale (boxes, masks and lungs follow);
- photometric: exposure, contrast, gamma, noise, and blur (journal figures are often softer than NIH PNGs);
- `paste`: lung-constrained synthetic opacities added to a real radiograph without opacity, inside its lung mask
  (the experts' or the segmenter's), so that "opacity" is learnt on the same film types as "normal";
- `marks`: what journal figures carry — panel letters, words, arrows, a frame — drawn on any image whatever its
  label, so that they stop predicting the label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from models.data import real_opacity
from models.data.rsna import Record, corners
from models.data.rsna import load_image as load_rsna_image
from models.engine import photometric_augment
from models.preprocess import detector_shape, letterbox, resize, to_network_input

MIN_BOX_AREA = 16.0


@dataclass(frozen=True)
class Cached:
    """One radiograph at detector resolution: a (rows, columns) float16 image in [0, 1], its boxes there and,
    when known, per-box instance masks and the lung mask (uint8)."""

    patient_id: str
    image: torch.Tensor
    boxes: torch.Tensor  # (N, 4) x0, y0, x1, y1
    masks: torch.Tensor | None = None  # (N, rows, columns) uint8
    lungs: torch.Tensor | None = None  # (rows, columns) uint8
    source: str = "synthetic"


def _mask_at(mask: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    return (resize(mask.astype(np.float32), shape) >= 0.5).to(torch.uint8)


class Decode(Dataset):
    """Decodes RSNA `Record`s and real-opacity `RealRecord`s to `Cached` items at `input_size`."""

    def __init__(self, records: list[Record | real_opacity.RealRecord], input_size: int) -> None:
        self.records, self.input_size = records, input_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Cached:
        record = self.records[index]
        real = isinstance(record, real_opacity.RealRecord)
        pixels = real_opacity.load_image(record) if real else load_rsna_image(record)
        shape = detector_shape(*pixels.shape, self.input_size)
        scale = torch.tensor([shape[1] / pixels.shape[1], shape[0] / pixels.shape[0]] * 2)
        boxes = torch.tensor([corners(b) for b in record.boxes], dtype=torch.float32).reshape(-1, 4) * scale
        image = to_network_input(pixels, shape)[0].to(torch.float16)
        if not real:
            return Cached(record.patient_id, image, boxes)
        opacity = real_opacity.load_mask(record.opacity_mask, pixels.shape)
        lungs = real_opacity.load_mask(record.lung_mask, pixels.shape)
        masks = None
        if opacity is not None and record.boxes:
            per_box = []
            for x, y, w, h in record.boxes:  # the experts' opacity inside each box
                inside = np.zeros_like(opacity)
                x0, y0 = int(x), int(y)
                inside[y0 : y0 + int(h) + 1, x0 : x0 + int(w) + 1] = True
                per_box.append(_mask_at(opacity & inside, shape))
            masks = torch.stack(per_box)
        lung_tensor = None if lungs is None or record.lung_mask_partial else _mask_at(lungs, shape)
        return Cached(record.patient_id, image, boxes, masks, lung_tensor, record.source)


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


# -- lung-constrained synthetic opacities -----------------------------------------------------------------------------


def _smooth_noise(shape: tuple[int, int], scale: int, generator: torch.Generator) -> torch.Tensor:
    coarse = torch.rand((1, 1, max(2, shape[0] // scale), max(2, shape[1] // scale)), generator=generator)
    return F.interpolate(coarse, size=shape, mode="bicubic", align_corners=False)[0, 0]


def paste_opacities(
    image: torch.Tensor, lungs: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add 1-3 soft opacities inside `lungs` to a (rows, columns) [0, 1] image. Returns (image, boxes (N, 4),
    masks (N, rows, columns) uint8); N may be 0 when the lungs are too small."""

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    rows, columns = image.shape
    lung = lungs.bool()
    ys, xs = torch.nonzero(lung, as_tuple=True)
    boxes, masks = [], []
    out = image.clone()
    if len(ys) < 200:
        return out, torch.zeros((0, 4)), torch.zeros((0, rows, columns), dtype=torch.uint8)
    yy = torch.arange(rows, dtype=torch.float32)[:, None]
    xx = torch.arange(columns, dtype=torch.float32)[None, :]
    count = 1 + int(torch.randint(0, 3, (), generator=generator))
    for _ in range(count):
        pick = int(torch.randint(0, len(ys), (), generator=generator))
        cy, cx = float(ys[pick]), float(xs[pick])
        side = math.sqrt(len(ys)) * uniform(0.18, 0.45)
        field = torch.full((rows, columns), -1e6)
        for lobe in range(1 + int(torch.randint(0, 3, (), generator=generator))):
            ox, oy = (0.0, 0.0) if lobe == 0 else (uniform(-0.4, 0.4) * side, uniform(-0.4, 0.4) * side)
            a, b = side * uniform(0.35, 0.6), side * uniform(0.45, 0.9)
            angle = uniform(-0.5, 0.5)
            c, s = math.cos(angle), math.sin(angle)
            dx, dy = xx - cx - ox, yy - cy - oy
            rho = torch.sqrt(((c * dx + s * dy) / a) ** 2 + ((-s * dx + c * dy) / b) ** 2)
            field = torch.maximum(field, 1.0 - rho)
        field = field + 0.3 * (_smooth_noise((rows, columns), 12, generator) - 0.5)  # an irregular border
        mask = (field > 0) & lung
        if int(mask.sum()) < MIN_BOX_AREA * 2:
            continue
        soft = (field / 0.35).clamp(0, 1) * lung
        texture = 0.7 + 0.6 * _smooth_noise((rows, columns), 6, generator)
        density = uniform(0.15, 0.55)  # ground glass .. consolidation
        out = out + density * (1.0 - out) * soft * texture
        y_idx, x_idx = torch.nonzero(mask, as_tuple=True)
        boxes.append(torch.tensor([x_idx.min(), y_idx.min(), x_idx.max() + 1, y_idx.max() + 1], dtype=torch.float32))
        masks.append(mask.to(torch.uint8))
    if not boxes:
        return out, torch.zeros((0, 4)), torch.zeros((0, rows, columns), dtype=torch.uint8)
    return out.clamp(0, 1), torch.stack(boxes), torch.stack(masks)


# -- journal-figure marks ---------------------------------------------------------------------------------------------

_WORDS = ("A", "B", "C", "D", "a", "b", "R", "L", "PA", "AP", "Fig. 1", "Day 3", "ERECT", "PORTABLE", "2020")


def draw_marks(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Panel letters, words, arrows and a frame on a (rows, columns) [0, 1] image, as journal figures carry."""
    rows, columns = image.shape
    picture = Image.fromarray((image.float().clamp(0, 1).numpy() * 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)

    def integer(high: int) -> int:
        return int(torch.randint(0, max(1, high), (), generator=generator))

    def shade() -> int:
        return 255 if float(torch.rand((), generator=generator)) < 0.7 else 0

    for _ in range(1 + integer(3)):
        kind = integer(4)
        if kind == 0:  # text in a corner or along an edge
            word = _WORDS[integer(len(_WORDS))]
            font = ImageFont.load_default(size=8 + integer(20))
            x = integer(columns // 6) if integer(2) else columns - columns // 4 + integer(columns // 6)
            y = integer(rows // 6) if integer(2) else rows - rows // 6 + integer(rows // 10)
            if integer(3) == 0:
                box = draw.textbbox((x, y), word, font=font)
                draw.rectangle(box, fill=255 - shade())
            draw.text((x, y), word, fill=shade(), font=font)
        elif kind == 1:  # an arrow pointing anywhere, the lungs included
            x1, y1 = integer(columns), integer(rows)
            length, angle = 12 + integer(30), 2 * math.pi * float(torch.rand((), generator=generator))
            x0, y0 = x1 - length * math.cos(angle), y1 - length * math.sin(angle)
            width = 1 + integer(3)
            colour = shade()
            draw.line((x0, y0, x1, y1), fill=colour, width=width)
            for turn in (2.6, -2.6):
                draw.line((x1, y1, x1 + 6 * math.cos(angle + turn), y1 + 6 * math.sin(angle + turn)), colour, width)
        elif kind == 2:  # frame / panel border
            width = 1 + integer(6)
            draw.rectangle((0, 0, columns - 1, rows - 1), outline=shade(), width=width)
        else:  # a small marker square with a letter (R/L markers)
            x, y = integer(columns - 20), integer(rows // 4)
            draw.rectangle((x, y, x + 14, y + 14), fill=255 - shade())
            draw.text((x + 3, y + 1), "RL"[integer(2)], fill=shade())
    return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)


# -- the training set -------------------------------------------------------------------------------------------------


class TrainingSet(Dataset):
    """Cached radiographs with augmentation (see the module docstring). `paste` and `marks` are probabilities."""

    def __init__(
        self, items: list[Cached], augment: bool, seed: int, size: int, paste: float = 0.0, marks: float = 0.0
    ) -> None:
        self.items, self.augment, self.seed, self.size = items, augment, seed, size
        self.paste, self.marks = paste, marks
        self.geometry = v2.Compose(
            [v2.RandomHorizontalFlip(0.5), v2.RandomAffine(degrees=0, translate=(0.06, 0.06), scale=(0.85, 1.15))]
        )
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        item = self.items[index]
        image = item.image.float()
        boxes = item.boxes
        masks = item.masks if item.masks is not None else ellipse_masks(boxes, tuple(image.shape))
        shape = tuple(image.shape)
        if self.augment:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + index)
            draw = lambda: float(torch.rand((), generator=generator))  # noqa: E731
            if item.lungs is not None and not len(boxes) and draw() < self.paste:
                image, boxes, masks = paste_opacities(image, item.lungs, generator)
            if draw() < self.marks:
                image = draw_marks(image, generator)
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=generator)))  # for v2's own draws
            wrapped = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=shape)
            image, wrapped, masks = self.geometry(tv_tensors.Image(image[None]), wrapped, tv_tensors.Mask(masks))
            boxes = v2.functional.clamp_bounding_boxes(wrapped).as_subclass(torch.Tensor)
            image, masks = image.as_subclass(torch.Tensor), masks.as_subclass(torch.Tensor)
            if draw() < 0.3:
                image = v2.functional.gaussian_blur(image, kernel_size=5, sigma=0.3 + 1.2 * draw())
            image = photometric_augment(image, generator)[0]
        size = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
        keep = size >= MIN_BOX_AREA
        boxes, masks = boxes[keep].reshape(-1, 4), masks[keep]
        image = letterbox(image[None], self.size)
        masks = letterbox(masks, self.size) if len(masks) else torch.zeros((0, self.size, self.size), dtype=torch.uint8)
        target = {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64), "masks": masks.to(torch.uint8)}
        return image.expand(3, -1, -1).contiguous(), target
