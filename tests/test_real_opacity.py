"""The real-opacity layout: reader, the fixed by-patient split, training with --real, evaluation on real sets.

A small copy of the layout is drawn here (tiny PNGs, masks, the CSV files); the shared real set, when it is
beside the clone, is checked for the split's promises too."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED, needs
from models.data.real_opacity import (
    SPLITS,
    assign_splits,
    nih_patient,
    read_real_opacity,
)
from models.errors import DatasetError
from models.train_data import Decode, TrainingSet, draw_marks, paste_opacities
from node.cli import main

REAL_OPACITY = SHARED / "data" / "real-opacity"
INFO_COLUMNS = ["image", "patientid", "lung_mask", "license", "finding"]


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def _chest(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A bright body with two dark lung fields, and its lung mask."""
    image = np.full((size, size), 200.0) + rng.normal(0, 5, (size, size))
    lungs = np.zeros((size, size), dtype=bool)
    lungs[24:104, 16:58] = True
    lungs[24:104, 70:112] = True
    image[lungs] = 60
    return image.clip(0, 255), lungs


def make_layout(root: Path, opacity_patients: int = 10, normals: int = 10) -> Path:
    """A real-opacity folder: each opacity patient has one image with an opacity filling the top half of the
    right lung (rows 24-63, columns 16-57: exactly 50 % of that lung), normals have none."""
    rng = np.random.default_rng(0)
    info, labels, normal_rows, rsna_rows = [], [], [], []
    for index in range(opacity_patients):
        name = f"case{index:02d}.png"
        image, lungs = _chest(rng)
        opacity = np.zeros_like(lungs)
        opacity[24:64, 16:58] = True
        image[opacity] = 170
        _png(root / "opacity" / "images" / name, image)
        _png(root / "opacity" / "masks_opacity" / name, opacity * 255)
        _png(root / "opacity" / "masks_lung" / name, lungs * 255)
        info.append([name, str(100 + index // 2), "yes", "CC BY 4.0", "COVID-19"])  # two images per patient
        labels.append([name, 16, 24, 42, 40, 1])
    for index in range(normals):
        name = f"{index:08d}_000.png"
        image, _ = _chest(rng)
        _png(root / "normals" / "images_normal" / name, image)
        normal_rows.append([name, "images_normal"])
    rsna_name = "00000099_001.png"
    _png(root / "normals" / "images_rsna_opacity" / rsna_name, _chest(rng)[0])
    rsna_rows.append([rsna_name, 20, 30, 30, 40, 1])
    (root / "normals" / "images_rsna_not_normal").mkdir(parents=True)
    _write(root / "opacity" / "image_info.csv", INFO_COLUMNS, info)
    _write(root / "opacity" / "labels.csv", ["image", "x", "y", "width", "height", "Target"], labels)
    _write(root / "normals" / "normals.csv", ["image", "folder"], normal_rows)
    _write(root / "normals" / "rsna_labels.csv", ["image", "x", "y", "width", "height", "Target"], rsna_rows)
    return root


def _write(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


def cxrnode(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(list(args))
    assert code == 0, f"cxrnode {' '.join(args)} failed"
    return out.getvalue()


def test_reader_and_split(tmp_path: Path) -> None:
    root = make_layout(tmp_path / "real")
    records = read_real_opacity(root)
    assert len(records) == 10 + 10 + 1
    assert nih_patient("00000013_009.png") == "00000013"
    case = next(r for r in records if r.image_id == "case00.png")
    assert case.boxes == ((16.0, 24.0, 42.0, 40.0),) and case.positive and case.patient_id == "opacity:100"
    assert sum(r.normal for r in records) == 10 and not any(r.normal for r in records if r.positive)
    splits = assign_splits(records)
    assert set(splits.values()) == set(SPLITS)
    assert splits == assign_splits(list(reversed(records)))  # order does not matter
    for split in SPLITS:  # a patient's images are all in one split, and the splits partition the set
        chosen = read_real_opacity(root, (split,))
        assert {splits[r.patient_id] for r in chosen} == {split}
    assert sum(len(read_real_opacity(root, (s,))) for s in SPLITS) == len(records)
    with pytest.raises(ValueError, match="unknown split"):
        read_real_opacity(root, ("test",))
    with pytest.raises(DatasetError, match="real-opacity layout"):
        read_real_opacity(tmp_path)


def test_decode_uses_the_experts_masks_and_augmentation_keeps_targets(tmp_path: Path) -> None:
    root = make_layout(tmp_path / "real", opacity_patients=2, normals=1)
    records = read_real_opacity(root)
    items = [Decode(records, 64)[i] for i in range(len(records))]
    case = items[0]
    assert case.source == "opacity" and case.masks is not None and case.lungs is not None
    assert case.masks.shape == (1, 64, 64)
    assert 0.45 < float(case.masks.float().sum()) / float((case.lungs[:, :32]).float().sum()) < 0.55
    normal = next(i for i in items if i.source == "normal")
    assert normal.masks is None and normal.lungs is None
    generator = torch.Generator().manual_seed(0)
    pasted, boxes, masks = paste_opacities(case.image.float(), case.lungs, generator)
    assert len(boxes) >= 1 and len(boxes) == len(masks)
    assert not (masks.bool() & ~case.lungs.bool()).any()  # inside the lungs only
    assert float((pasted - case.image.float()).abs().max()) > 0.05
    marked = draw_marks(case.image.float(), torch.Generator().manual_seed(1))
    assert marked.shape == case.image.shape and not torch.equal(marked, case.image.float())
    dataset = TrainingSet(items, augment=True, seed=0, size=64, paste=1.0, marks=1.0)
    image, target = dataset[0]
    assert image.shape == (3, 64, 64) and target["masks"].shape[1:] == (64, 64)
    assert len(target["boxes"]) == len(target["masks"]) == len(target["labels"])
    assert torch.equal(dataset[0][0], image)  # the same draw for the same (seed, epoch, index)


def test_train_with_real_then_evaluate_writes_figures(tmp_path: Path) -> None:
    root = make_layout(tmp_path / "real")
    synthetic, weights = tmp_path / "synth", tmp_path / "weights"
    cxrnode("synth", str(synthetic), "--n", "4", "--seed", "2", "--min-size", "64", "--max-size", "96")
    cxrnode(
        "train",
        str(synthetic),
        "--out",
        str(weights),
        "--input-size",
        "64",
        "--fpn-channels",
        "16",
        "--box-head-size",
        "32",
        "--mask-head-channels",
        "16",
        "--real",
        str(root),
        "--paste",
        "0.5",
        "--marks",
        "0.5",
        "--lr-schedule",
        "0.001:1",
        "--max-iters",
        "1",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--val-fraction",
        "0.5",
        "--no-progress",
    )
    manifest = json.loads((weights / "manifest.json").read_text())
    validation = manifest["detector"]["trained"]["validation"]
    assert "real_auc" in validation and "real_fp_rate" in validation
    assert 0.0 < manifest["detector"]["thresholds"]["present"] < 1.0
    # evaluation with the demo weights (the tiny detector above is untrained): the figures and every key
    report = tmp_path / "out" / "real.json"
    cxrnode("evaluate", str(root), "--json", str(report), "--split", "all", "--no-progress")
    results = json.loads(report.read_text())
    for key in ("rsna_map", "map50", "auc", "fp_rate_normals", "severity_mae", "lung_dice", "by_source"):
        assert key in results, key
    assert results["n_images"] == 21 and results["n_positive"] == 11 and results["n_normal"] == 10
    assert set(results["by_source"]) == {"opacity", "normal", "rsna-opacity"}
    truths = [r["severity_true"] for r in results["images"] if r["source"] == "opacity"]
    assert all(t == [50.0, 0.0] for t in truths)  # right lung half covered, left lung clear
    assert results["severity_mae_constant"] == 25.0  # the best single guess (25) misses every lung by 25 points
    assert Path(results["figures"]["roc"]).is_file() and Path(results["figures"]["worst_cases"]).is_file()
    assert Image.open(results["figures"]["roc"]).size[0] > 100


@needs(REAL_OPACITY)
def test_the_shared_real_set_is_split_by_patient() -> None:
    records = read_real_opacity(REAL_OPACITY)
    assert len(records) == 97 + 43 + 5 + 12
    splits = assign_splits(records)
    holdout = read_real_opacity(REAL_OPACITY, ("holdout",))
    trained = read_real_opacity(REAL_OPACITY, ("train", "validation"))
    assert not {r.patient_id for r in holdout} & {r.patient_id for r in trained}
    assert {r.source for r in holdout} == {"opacity", "normal", "rsna-opacity", "rsna-not-normal"}
    assert sum(r.normal for r in holdout) >= 10 and sum(r.positive for r in holdout) >= 20
    assert sum(v == "holdout" for v in splits.values()) == 40 and len(holdout) == 48  # fixed, never re-drawn
