"""Real chest radiographs with opacity masks: the `real-opacity` layout (see its MANIFEST.md).

    ROOT/opacity/images/<stem>.png            real CXRs (8-bit), long side <= 1024 px
    ROOT/opacity/masks_opacity/<stem>.png     ground-glass opacity + consolidation, 0/255
    ROOT/opacity/masks_lung/<stem>.png        both lungs, 0/255 (column lung_mask=partial: one lung only)
    ROOT/opacity/labels.csv                   image,x,y,width,height,Target   (boxes in stored pixels)
    ROOT/opacity/image_info.csv               one row per image: patientid, licence, finding, ...
    ROOT/normals/images_normal/<nih>.png      normal NIH ChestX-ray14 radiographs (negatives)
    ROOT/normals/images_rsna_opacity/         NIH radiographs RSNA labelled "Lung Opacity" (boxes in rsna_labels.csv)
    ROOT/normals/images_rsna_not_normal/      NIH radiographs RSNA labelled "No Lung Opacity / Not Normal"
    ROOT/normals/normals.csv, rsna_labels.csv

Every image becomes a `RealRecord` with its source:
    "opacity"          the expert-masked set (positives and its 3 report-normal negatives)
    "normal"           normal NIH radiographs
    "rsna-opacity"     RSNA opacity images (boxes, no masks)
    "rsna-not-normal"  RSNA "not normal, no opacity" images (hard negatives)

**The split is by patient and fixed** (`assign_splits`): a patient is `opacity:<patientid>` (image_info.csv) or
`nih:<file-name part before "_">`. Patients are grouped by their source (the first in SOURCES among their images),
and within each group ordered by a SHA-256 of their key: the first 30 % (rounded) are "holdout", the next 20 %
"validation", the rest "train". So every source is represented in every split, all images of a patient share one
split, and the split is the same on every machine and run. The held-out split is never trained on: `cxrnode train`
leaves it out (and picks thresholds on "validation"), `cxrnode evaluate` uses it by default.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.data.lungs import read_gray
from models.data.rsna import Box
from models.errors import DatasetError

SPLITS = ("train", "validation", "holdout")
HOLDOUT_FRACTION = 0.30
VALIDATION_FRACTION = 0.20
SPLIT_SALT = "cxrnode real-opacity split v1:"
SOURCES = ("opacity", "normal", "rsna-opacity", "rsna-not-normal")
NORMAL_SOURCES = ("opacity", "normal")
"""Negatives from these sources are normal radiographs (the opacity set's negatives are report-normal films)."""

_RSNA_FOLDERS = {"images_rsna_opacity": "rsna-opacity", "images_rsna_not_normal": "rsna-not-normal"}


@dataclass(frozen=True)
class RealRecord:
    """One real radiograph and its ground truth."""

    patient_id: str
    """Split key: 'opacity:<patientid>' or 'nih:<patient>'."""
    image_id: str
    """File name, unique within the set."""
    source: str
    image: Path
    boxes: tuple[Box, ...]
    """(x, y, width, height) in stored pixels; empty for a negative."""
    opacity_mask: Path | None
    lung_mask: Path | None
    lung_mask_partial: bool
    licence: str

    @property
    def positive(self) -> bool:
        return bool(self.boxes)

    @property
    def normal(self) -> bool:
        """A negative that is a normal radiograph (not an RSNA 'not normal' one)."""
        return not self.boxes and self.source in NORMAL_SOURCES


def is_real_opacity(root: Path) -> bool:
    return (root / "opacity" / "image_info.csv").is_file() or (root / "normals" / "normals.csv").is_file()


def nih_patient(file_name: str) -> str:
    """NIH ChestX-ray14 file names are <patient>_<follow-up>.png."""
    return file_name.split("_", 1)[0]


def _rank(patient_key: str) -> str:
    return hashlib.sha256((SPLIT_SALT + patient_key).encode()).hexdigest()


def assign_splits(records: list[RealRecord]) -> dict[str, str]:
    """patient key → 'train', 'validation' or 'holdout' (see the module docstring)."""
    group: dict[str, int] = {}
    for record in records:
        index = SOURCES.index(record.source)
        group[record.patient_id] = min(index, group.get(record.patient_id, index))
    splits: dict[str, str] = {}
    for index in sorted(set(group.values())):
        patients = sorted((p for p, g in group.items() if g == index), key=_rank)
        holdout = round(HOLDOUT_FRACTION * len(patients))
        validation = round(VALIDATION_FRACTION * len(patients))
        for position, patient in enumerate(patients):
            splits[patient] = (
                "holdout" if position < holdout else "validation" if position < holdout + validation else "train"
            )
    return splits


def _rows(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise DatasetError(f"{path}: not found; is this a real-opacity folder (see its MANIFEST.md)?")
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path}:1: missing column(s) {', '.join(missing)}")
        return list(reader)


def _box(row: dict[str, str], path: Path, line: int) -> Box | None:
    if row["Target"].strip() == "0":
        return None
    try:
        x, y, w, h = (float(row[k]) for k in ("x", "y", "width", "height"))
    except ValueError:
        raise DatasetError(f"{path}:{line}: box {row} is not four numbers") from None
    if w <= 0 or h <= 0 or x < 0 or y < 0:
        raise DatasetError(f"{path}:{line}: box x={x} y={y} width={w} height={h} is empty or negative")
    return (x, y, w, h)


def _boxes(path: Path, key: str) -> dict[str, list[Box]]:
    boxes: dict[str, list[Box]] = {}
    for line, row in enumerate(_rows(path, (key, "x", "y", "width", "height", "Target")), start=2):
        box = _box(row, path, line)
        boxes.setdefault(row[key], [])
        if box is not None:
            boxes[row[key]].append(box)
    return boxes


def _read_opacity(folder: Path) -> list[RealRecord]:
    info = _rows(folder / "image_info.csv", ("image", "patientid", "lung_mask", "license"))
    boxes = _boxes(folder / "labels.csv", "image")
    records = []
    for row in info:
        name = row["image"]
        image = folder / "images" / name
        if not image.is_file():
            raise DatasetError(f"{image}: listed in {folder / 'image_info.csv'} but missing")
        records.append(
            RealRecord(
                patient_id=f"opacity:{row['patientid']}",
                image_id=name,
                source="opacity",
                image=image,
                boxes=tuple(boxes.get(name, ())),
                opacity_mask=folder / "masks_opacity" / name,
                lung_mask=folder / "masks_lung" / name,
                lung_mask_partial=row["lung_mask"] == "partial",
                licence=row["license"] or "not stated",
            )
        )
    return records


def _read_normals(folder: Path) -> list[RealRecord]:
    records = []
    for row in _rows(folder / "normals.csv", ("image", "folder")):
        image = folder / row["folder"] / row["image"]
        if not image.is_file():
            raise DatasetError(f"{image}: listed in {folder / 'normals.csv'} but missing")
        records.append(_nih_record(image, "normal", ()))
    rsna = _boxes(folder / "rsna_labels.csv", "image")
    for sub, source in _RSNA_FOLDERS.items():
        for image in sorted((folder / sub).glob("*.png")):
            if image.name not in rsna:
                raise DatasetError(f"{image}: no row in {folder / 'rsna_labels.csv'}")
            records.append(_nih_record(image, source, tuple(rsna[image.name])))
    return records


def _nih_record(image: Path, source: str, boxes: tuple[Box, ...]) -> RealRecord:
    return RealRecord(
        patient_id=f"nih:{nih_patient(image.name)}",
        image_id=image.name,
        source=source,
        image=image,
        boxes=boxes,
        opacity_mask=None,
        lung_mask=None,
        lung_mask_partial=False,
        licence="NIH ChestX-ray14 (unrestricted; acknowledge the NIH Clinical Center)",
    )


def read_real_opacity(root: Path, splits: tuple[str, ...] = SPLITS) -> list[RealRecord]:
    """The records of `root` whose patients are in `splits`, sorted by source then file name."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; choose from {', '.join(SPLITS)}")
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    records: list[RealRecord] = []
    if (root / "opacity").is_dir():
        records += _read_opacity(root / "opacity")
    if (root / "normals").is_dir():
        records += _read_normals(root / "normals")
    if not records:
        raise DatasetError(f"{root}: no opacity/ or normals/ folder; expected the real-opacity layout")
    records.sort(key=lambda r: (SOURCES.index(r.source), r.image_id))
    assigned = assign_splits(records)
    return [r for r in records if assigned[r.patient_id] in splits]


def load_image(record: RealRecord) -> np.ndarray:
    """The radiograph (2-D, presentation polarity: these PNGs are displayed images)."""
    return read_gray(record.image)


def load_mask(path: Path | None, shape: tuple[int, int]) -> np.ndarray | None:
    """A 0/255 mask as booleans, checked against the image's shape; None when there is none."""
    if path is None:
        return None
    if not path.is_file():
        raise DatasetError(f"{path}: mask file missing")
    mask = read_gray(path) >= 128
    if mask.shape != shape:
        raise DatasetError(f"{path}: mask is {mask.shape[0]} x {mask.shape[1]}, its image {shape[0]} x {shape[1]}")
    return mask
