"""The RSNA Pneumonia Detection Challenge layout, as Kaggle ships it, plus the ground truth `cxrnode synth` adds.

    DATASET/stage_2_train_labels.csv         patientId,x,y,width,height,Target   one row per box; Target 0 rows
                                             have empty x,y,width,height (the image has no opacity)
    DATASET/stage_2_detailed_class_info.csv  patientId,class                      optional
    DATASET/stage_2_train_images/<patientId>.dcm
    DATASET/lung_masks/<patientId>.png       optional: both lungs, 0/255 (synthetic sets have them)
    DATASET/severity.csv                     optional: patientId,severity_right,severity_left,severity_total,...
    DATASET/opacity_masks/<patientId>.png    synthetic sets: the union of the opacities, 0/255
    DATASET/dataset.json                     synthetic sets: generator, seed, size range, counts

The classes of the detailed class info file are "Lung Opacity" for each box row and, for an image without one,
"Normal" or "No Lung Opacity / Not Normal".

Boxes become instance masks as the ellipse inscribed in the box, not the filled box: opacities are rounded, a box
overstates an ellipse's area by 4/π (27 %), and the severity percentage is computed from the masks. The box is
kept as it is for detection targets and metrics.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from models.data.dicom import presentation_pixels
from models.errors import DatasetError

LABELS = "stage_2_train_labels.csv"
CLASS_INFO = "stage_2_detailed_class_info.csv"
IMAGES = "stage_2_train_images"
LUNG_MASKS = "lung_masks"
OPACITY_MASKS = "opacity_masks"
SEVERITY = "severity.csv"
DATASET_INFO = "dataset.json"
LABEL_COLUMNS = ["patientId", "x", "y", "width", "height", "Target"]
CLASS_INFO_COLUMNS = ["patientId", "class"]
SEVERITY_COLUMNS = ["patientId", "severity_right", "severity_left", "severity_total"]
"""The severity columns `read_severity` needs."""
EXTENT_COLUMNS = ["extent_right", "extent_left", "extent_total"]
"""The columns `cxrnode synth` writes after SEVERITY_COLUMNS: models.severity.lung_involvement's extent per lung."""
CLASS_OPACITY = "Lung Opacity"
CLASS_NORMAL = "Normal"
CLASS_NOT_NORMAL = "No Lung Opacity / Not Normal"
IMAGE_SIZE = 1024
"""The RSNA challenge images (and so the boxes in its label file) are 1024 x 1024 pixels."""

Box = tuple[float, float, float, float]
"""(x, y, width, height) in pixels, as in the label file."""


@dataclass(frozen=True)
class Record:
    patient_id: str
    image: Path
    boxes: tuple[Box, ...]
    lung_mask: Path | None
    severity_total: float | None

    @property
    def positive(self) -> bool:
        return bool(self.boxes)


def _number(text: str, path: Path, line: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DatasetError(f"{path}:{line}: {column} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise DatasetError(f"{path}:{line}: {column} {text!r} is not a finite number")
    return value


def label_row(patient_id: str, box: Box | None) -> list[str]:
    """One row of the label file: a box with Target 1, or (None) an image's one Target 0 row with an empty box.
    Coordinates are written as Kaggle writes them (264.0)."""
    if box is None:
        return [patient_id, "", "", "", "", "0"]
    return [patient_id, *(repr(float(value)) for value in box), "1"]


def read_labels(path: Path) -> dict[str, tuple[Box, ...]]:
    """patientId → its boxes (empty for Target 0), in file order. Every bad row is an error naming its line."""
    if not path.is_file():
        raise DatasetError(f"{path}: label file not found (expected the Kaggle {LABELS})")
    labels: dict[str, list[Box]] = {}
    with path.open(newline="") as file:
        reader = csv.reader(file)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != LABEL_COLUMNS:
            raise DatasetError(f"{path}:1: header must be {','.join(LABEL_COLUMNS)}, found {header}")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(LABEL_COLUMNS):
                raise DatasetError(f"{path}:{line}: {len(row)} columns, expected {len(LABEL_COLUMNS)}")
            patient, *box_text, target = (cell.strip() for cell in row)
            if not patient:
                raise DatasetError(f"{path}:{line}: empty patientId")
            boxes = labels.setdefault(patient, [])
            if target == "0":
                if any(box_text):
                    raise DatasetError(f"{path}:{line}: Target 0 but a box is given; Target 0 rows have empty boxes")
                continue
            if target != "1":
                raise DatasetError(f"{path}:{line}: Target must be 0 or 1, found {target!r}")
            x, y, w, h = (_number(t, path, line, c) for t, c in zip(box_text, LABEL_COLUMNS[1:5], strict=True))
            if w <= 0 or h <= 0 or x < 0 or y < 0:
                raise DatasetError(f"{path}:{line}: box x={x} y={y} width={w} height={h} is empty or negative")
            boxes.append((x, y, w, h))
    return {patient: tuple(boxes) for patient, boxes in labels.items()}


def read_severity(path: Path) -> dict[str, float]:
    """patientId → ground-truth total severity (percent)."""
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        missing = [c for c in SEVERITY_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path}:1: missing column(s) {', '.join(missing)}")
        return {
            row["patientId"]: _number(row["severity_total"], path, line, "severity_total")
            for line, row in enumerate(reader, start=2)
        }


def read_dataset(root: Path) -> list[Record]:
    """Every labelled image of an RSNA-layout folder, sorted by patientId."""
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    images = root / IMAGES
    if not images.is_dir():
        raise DatasetError(
            f"{root}: not in the RSNA layout — expected {LABELS} and a folder {IMAGES}/ of <patientId>.dcm files"
        )
    labels = read_labels(root / LABELS)
    missing = [p for p in labels if not (images / f"{p}.dcm").is_file()]
    if missing:
        raise DatasetError(
            f"{images}: {len(missing)} labelled image(s) missing, e.g. {missing[0]}.dcm; "
            "copy them or remove their rows from the label file"
        )
    severity = read_severity(root / SEVERITY) if (root / SEVERITY).is_file() else {}
    masks = root / LUNG_MASKS
    return [
        Record(
            patient_id=patient,
            image=images / f"{patient}.dcm",
            boxes=labels[patient],
            lung_mask=(masks / f"{patient}.png") if (masks / f"{patient}.png").is_file() else None,
            severity_total=severity.get(patient),
        )
        for patient in sorted(labels)
    ]


def load_image(record: Record) -> np.ndarray:
    """The record's radiograph in presentation polarity (float32), as the Predictor takes it."""
    try:
        ds = pydicom.dcmread(record.image)
    except Exception as error:
        raise DatasetError(f"{record.image}: not a readable DICOM file ({error})") from error
    return presentation_pixels(ds)


def ellipse_mask(box: Box, shape: tuple[int, int]) -> np.ndarray:
    """The ellipse inscribed in an (x, y, width, height) box, as a boolean mask of `shape`."""
    x, y, w, h = box
    rows, columns = shape
    cy, cx = y + h / 2, x + w / 2
    yy = (np.arange(rows, dtype=np.float32) + 0.5 - cy) / (h / 2)
    xx = (np.arange(columns, dtype=np.float32) + 0.5 - cx) / (w / 2)
    return (yy[:, None] ** 2 + xx[None, :] ** 2) <= 1.0


def corners(box: Box) -> tuple[float, float, float, float]:
    """(x, y, width, height) → (x0, y0, x1, y1)."""
    x, y, w, h = box
    return x, y, x + w, y + h


def iter_images(records: list[Record]) -> Iterator[tuple[Record, np.ndarray]]:
    for record in records:
        yield record, load_image(record)
