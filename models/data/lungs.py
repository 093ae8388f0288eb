"""Lung-field masks: image + mask pairs as JSRT / Montgomery / Shenzhen exports come, split into right and left lung.

Two folder forms are read:
    DIR/images/<name>.png  +  DIR/masks/<name>.png        (e.g. ../shared/data/lungs-real; optional DIR/pairs.csv
                                                           with columns image,view gives each image's view)
    DIR/<stem>.<png|jpg>   +  DIR/<stem>-mask.png or <stem>_mask.png   (Montgomery-style)
A mask holds both lungs (nonzero = lung). Right and left are the patient's: on a frontal view the right lung is on the
image's left. The split uses connected components either side of the mediastinum (`split_lungs`).

The held-out evaluation split is fixed by a hash of the file name (`is_holdout`), so it never changes between runs or
machines and never depends on how many files there are.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from models.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
HOLDOUT_FRACTION = 0.2


@dataclass(frozen=True)
class LungPair:
    name: str
    image: Path
    mask: Path
    view: str  # "PA", "AP", "AP Supine", ... or "" when unknown


def is_holdout(name: str, fraction: float = HOLDOUT_FRACTION) -> bool:
    """True for the fixed held-out share of names (by SHA-256 of the file name)."""
    value = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 2**32
    return value < fraction


def _views(folder: Path) -> dict[str, str]:
    path = folder / "pairs.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as file:
        return {row["image"]: row.get("view", "") or "" for row in csv.DictReader(file) if row.get("image")}


def read_pairs(folder: Path) -> list[LungPair]:
    """All image/mask pairs in `folder`, sorted by name. A mask without an image (or the reverse) is an error."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: lung-mask folder not found")
    pairs: list[LungPair] = []
    if (folder / "images").is_dir() and (folder / "masks").is_dir():
        views = _views(folder)
        images = {p.name: p for p in (folder / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        masks = {p.name: p for p in (folder / "masks").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        unmatched = sorted(set(images) ^ set(masks))
        if unmatched:
            raise DatasetError(
                f"{folder}: {len(unmatched)} file(s) without a partner in images/ or masks/, e.g. {unmatched[0]}"
            )
        pairs = [LungPair(n, images[n], masks[n], views.get(n, "")) for n in sorted(images)]
    else:
        for mask in sorted(folder.iterdir()):
            stem = mask.stem
            for marker in ("-mask", "_mask"):
                if stem.endswith(marker):
                    base = stem[: -len(marker)]
                    found = [folder / f"{base}{s}" for s in IMAGE_SUFFIXES if (folder / f"{base}{s}").is_file()]
                    if not found:
                        raise DatasetError(f"{mask}: no image {base}.png/.jpg beside this mask")
                    pairs.append(LungPair(found[0].name, found[0], mask, ""))
    if not pairs:
        raise DatasetError(
            f"{folder}: no image/mask pairs — expected images/ + masks/ subfolders, or <name>.png with <name>-mask.png"
        )
    return pairs


def read_gray(path: Path) -> np.ndarray:
    """An 8- or 16-bit PNG/JPEG as a 2-D array (colour is converted to luminance)."""
    try:
        with Image.open(path) as picture:
            if picture.mode in ("I;16", "I;16B", "I;16L", "I"):
                return np.asarray(picture, dtype=np.int32).astype(np.float32)
            return np.asarray(picture.convert("L"))
    except OSError as error:
        raise DatasetError(f"{path}: not a readable image ({error})") from error


def read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    mask = read_gray(path) >= 128
    if mask.shape != shape:
        raise DatasetError(f"{path}: mask is {mask.shape[0]} x {mask.shape[1]}, its image {shape[0]} x {shape[1]}")
    return mask


def split_lungs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a both-lungs mask into (right, left): the patient's right lung is the one on the image's left.

    The two largest connected components are the lungs; any smaller piece joins the lung whose centroid is nearer
    horizontally. When the lungs touch (one component), the cut is the column with the least lung in the middle
    third of the mask — the mediastinum."""
    mask = mask.astype(bool)
    labels, count = ndimage.label(mask)
    right = np.zeros_like(mask)
    left = np.zeros_like(mask)
    if count == 0:
        return right, left
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    order = np.argsort(sizes)[::-1] + 1
    centroid_x = {int(i): ndimage.center_of_mass(mask, labels, int(i))[1] for i in order}
    big = [int(i) for i in order[:2] if sizes[i - 1] >= 0.1 * sizes[order[0] - 1]]
    if len(big) == 2:
        right_label, left_label = sorted(big, key=lambda i: centroid_x[i])
        for label in order:
            nearer_right = abs(centroid_x[int(label)] - centroid_x[right_label]) <= abs(
                centroid_x[int(label)] - centroid_x[left_label]
            )
            (right if nearer_right else left)[labels == label] = True
        return right, left
    columns = np.nonzero(mask.any(axis=0))[0]
    x0, x1 = int(columns[0]), int(columns[-1]) + 1
    third = (x1 - x0) // 3
    if third >= 1:
        profile = mask[:, x0 + third : x1 - third].sum(axis=0)
        cut = x0 + third + int(np.argmin(profile))
        if profile.min() < 0.5 * profile.max():
            right[:, :cut] = mask[:, :cut]
            left[:, cut:] = mask[:, cut:]
            return right, left
    # one lung only: its side of the image decides which
    if (x0 + x1) / 2 < mask.shape[1] / 2:
        return mask.copy(), left
    return right, mask.copy()


def lung_labels(mask: np.ndarray) -> np.ndarray:
    """uint8 label map: 0 background, 1 right lung, 2 left lung."""
    right, left = split_lungs(mask)
    labels = np.zeros(mask.shape, dtype=np.uint8)
    labels[right] = 1
    labels[left] = 2
    return labels
