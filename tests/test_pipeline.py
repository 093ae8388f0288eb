"""The whole ML pipeline on a few tiny images, through the `cxrnode` command: synth → train (two iterations) →
train-lungs → evaluate → predict. Full training is a documented command (models/weights/README.md), not a test."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_validation import assert_valid_dicom
from models.data.rsna import read_dataset
from node.cli import main

TINY_DETECTOR = ["--input-size", "64", "--fpn-channels", "32", "--box-head-size", "64", "--mask-head-channels", "32"]


def cxrnode(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `cxrnode ARGS` in this process (the same parser and functions as the console script, without paying
    for a new interpreter and torch import each time)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    done = subprocess.CompletedProcess(["cxrnode", *args], code, out.getvalue(), err.getvalue())
    assert code == 0, f"cxrnode {' '.join(args)}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    dataset, weights = root / "data", root / "weights"
    cxrnode(
        "synth",
        str(dataset),
        "--n",
        "12",
        "--seed",
        "5",
        "--min-size",
        "96",
        "--max-size",
        "160",
        "--positive-fraction",
        "0.5",
    )
    cxrnode(
        "train",
        str(dataset),
        "--out",
        str(weights),
        *TINY_DETECTOR,
        "--lr-schedule",
        "0.001:1",
        "--max-iters",
        "2",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--val-fraction",
        "0.3",
        "--no-progress",
    )
    cxrnode(
        "train-lungs",
        str(dataset),
        "--out",
        str(weights),
        "--input-size",
        "64",
        "--lr-schedule",
        "0.001:1",
        "--max-iters",
        "2",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--no-progress",
    )
    return dataset, weights


def test_training_writes_verified_weights(trained: tuple[Path, Path]) -> None:
    _, weights = trained
    manifest = json.loads((weights / "manifest.json").read_text())
    assert manifest["detector"]["config"]["input_size"] == 64
    assert set(manifest["detector"]["thresholds"]) == {"score", "mask", "present"}
    assert manifest["lungs"]["config"]["input_size"] == 64
    assert len(manifest["detector"]["history"]) == 1 and len(manifest["lungs"]["history"]) == 1
    assert (weights / "checkpoint-detector.pt").is_file()


def test_resume_continues_after_the_last_epoch(trained: tuple[Path, Path]) -> None:
    dataset, weights = trained
    cxrnode(
        "train",
        str(dataset),
        "--out",
        str(weights),
        *TINY_DETECTOR,
        "--lr-schedule",
        "0.001:2",
        "--max-iters",
        "1",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--val-fraction",
        "0.3",
        "--no-progress",
        "--resume",
        str(weights / "checkpoint-detector.pt"),
    )
    history = json.loads((weights / "manifest.json").read_text())["detector"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]


def test_evaluate_reports_every_key(trained: tuple[Path, Path], tmp_path: Path) -> None:
    dataset, weights = trained
    out = tmp_path / "results.json"
    done = cxrnode("evaluate", str(dataset), "--weights", str(weights), "--json", str(out), "--no-progress")
    results = json.loads(out.read_text())
    for key in ("rsna_map", "map50", "auc", "lung_dice", "severity_mae"):
        assert results[key] is None or 0.0 <= results[key] <= 100.0, key
    assert results["n_images"] == 12 and results["n_positive"] == 6
    assert results["auc"] is not None and results["lung_dice"] is not None and results["severity_mae"] is not None
    assert "RSNA challenge mAP" in done.stdout and "COCO AP at IoU 0.5" in done.stdout


def test_predict_writes_seg_sr_and_overlay(trained: tuple[Path, Path], tmp_path: Path) -> None:
    dataset, weights = trained
    record = read_dataset(dataset)[0]
    done = cxrnode("predict", str(record.image), "--out", str(tmp_path), "--png", "--weights", str(weights))
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    written = [Path(p) for p in summary["written"]]
    assert [p.name.split(".", 1)[1] for p in written] == ["seg.dcm", "sr.dcm", "gsps.dcm", "overlay.png"]
    seg, sr, gsps = (pydicom.dcmread(p) for p in written[:3])
    source = pydicom.dcmread(record.image, stop_before_pixels=True)
    assert seg.Modality == "SEG" and sr.Modality == "SR" and seg.StudyInstanceUID == source.StudyInstanceUID
    referenced = gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID
    assert gsps.Modality == "PR" and referenced == source.SOPInstanceUID
    picture = np.asarray(Image.open(written[3]))
    assert picture.ndim == 3 and picture.shape[:2] == (int(source.Rows), int(source.Columns))
    for path in written[:3]:  # last: skips (a failure under CI=true) where dciodvfy is missing
        assert_valid_dicom(path, allowed_warnings=("99CXRNODE",))


def test_train_refuses_a_folder_in_the_wrong_layout(tmp_path: Path) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", str(tmp_path), "--out", str(tmp_path / "w")])
    assert code == 2 and "not in the RSNA layout" in err.getvalue()
