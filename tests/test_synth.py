"""The synthetic chest X-ray generator: layout and formats, determinism, ground truth that agrees with itself, DICOM
that dciodvfy accepts, and box statistics that follow the real RSNA labels.

Images are kept small (96-192 px) so the whole file runs in seconds; the anatomy and the labels scale with the size.
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from conftest import REAL_CXR
from dicom_validation import assert_valid_dicom
from models import synth
from models.severity import lung_involvement

REAL_RSNA = REAL_CXR / "rsna"
REAL_LABELS = REAL_RSNA / "stage_2_train_labels.csv"
REAL_CLASS_INFO = REAL_RSNA / "stage_2_detailed_class_info.csv"
SIZES = (96, 192)


def _generate(root: Path, seed: int, n: int = 6) -> Path:
    out = root / f"seed{seed}"
    synth.generate_dataset(out, n, seed, size_range=SIZES, positive_fraction=0.5)
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _generate(tmp_path_factory.mktemp("synth"), seed=7)


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as file:
        header, *rows = list(csv.reader(file))
    return header, rows


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as picture:
        assert picture.mode == "L", f"{path} is {picture.mode}, expected 8-bit grayscale"
        values = np.asarray(picture)
    assert set(np.unique(values)) <= {0, 255}, f"{path} holds values other than 0 and 255"
    return values > 0


def _split_lungs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(right, left) from a both-lungs mask: exactly two 8-connected components, the patient's right on the image left."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    assert count == 2, f"the lung mask has {count} connected components, expected two separate lungs"
    centres = ndimage.center_of_mass(mask, labels, [1, 2])
    right_label = 1 if centres[0][1] < centres[1][1] else 2
    return labels == right_label, labels == 3 - right_label


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- layout and formats ----------------------------------------------------------------------------------------------


def test_layout_and_csv_formats(dataset: Path) -> None:
    header, labels = _rows(dataset / "stage_2_train_labels.csv")
    assert header == ["patientId", "x", "y", "width", "height", "Target"]
    class_header, classes = _rows(dataset / "stage_2_detailed_class_info.csv")
    assert class_header == ["patientId", "class"]
    assert [row[0] for row in classes] == [row[0] for row in labels], "class info must line up with the labels"

    patients = list(dict.fromkeys(row[0] for row in labels))
    assert len(patients) == 6
    for patient in patients:
        assert len(patient) == 36 and str(uuid.UUID(patient)) == patient
        assert (dataset / "stage_2_train_images" / f"{patient}.dcm").is_file()
        assert (dataset / "lung_masks" / f"{patient}.png").is_file()
        assert (dataset / "opacity_masks" / f"{patient}.png").is_file()
    assert len(list((dataset / "stage_2_train_images").iterdir())) == 6

    for row, (_, label_class) in zip(labels, classes):
        assert len(row) == 6
        if row[5] == "0":
            assert row[1:5] == ["", "", "", ""]
            assert label_class in ("Normal", "No Lung Opacity / Not Normal")
            assert sum(r[0] == row[0] for r in labels) == 1, "a negative image has exactly one row"
        else:
            assert row[5] == "1" and label_class == "Lung Opacity"
            x, y, w, h = (float(v) for v in row[1:5])
            assert all(v.endswith(".0") for v in row[1:5]), "box values are written as Kaggle does (264.0)"
            assert w > 0 and h > 0 and x >= 0 and y >= 0
    assert sum(row[5] == "0" for row in labels) == 3, "round(6 x 0.5) images are negative"

    info = json.loads((dataset / "dataset.json").read_text())
    assert info["generator"] == synth.GENERATOR_NAME and info["seed"] == 7 and info["n"] == 6
    assert info["size_range"] == list(SIZES)
    assert info["counts"]["positive_images"] == 3 and info["counts"]["negative_images"] == 3
    assert info["counts"]["boxes"] == sum(row[5] == "1" for row in labels)


def test_boxes_masks_and_severity_agree(dataset: Path) -> None:
    _, labels = _rows(dataset / "stage_2_train_labels.csv")
    boxes: dict[str, list[tuple[int, int, int, int]]] = {}
    for row in labels:
        boxes.setdefault(row[0], [])
        if row[5] == "1":
            boxes[row[0]].append(tuple(int(float(v)) for v in row[1:5]))  # type: ignore[arg-type]
    header, severity_rows = _rows(dataset / "severity.csv")
    assert header == [
        "patientId",
        "severity_right",
        "severity_left",
        "severity_total",
        "extent_right",
        "extent_left",
        "extent_total",
    ]
    severity = {row[0]: row[1:] for row in severity_rows}
    assert set(severity) == set(boxes)

    for patient, patient_boxes in boxes.items():
        lungs = _png(dataset / "lung_masks" / f"{patient}.png")
        opacity = _png(dataset / "opacity_masks" / f"{patient}.png")
        ds = pydicom.dcmread(dataset / "stage_2_train_images" / f"{patient}.dcm")
        assert lungs.shape == opacity.shape == (ds.Rows, ds.Columns)
        right, left = _split_lungs(lungs)
        assert not (opacity & ~lungs).any(), "opacity outside the lungs"
        assert bool(patient_boxes) == bool(opacity.any())
        covered = np.zeros_like(opacity)
        for x, y, w, h in patient_boxes:
            assert x + w <= ds.Columns and y + h <= ds.Rows
            inside = opacity[y : y + h, x : x + w]
            covered[y : y + h, x : x + w] = True
            # the box is the bounding box of (its own part of) the mask: every edge of the box touches the mask
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        assert not (opacity & ~covered).any(), "opacity pixels outside every box"

        expected, extent = lung_involvement(opacity, right, left)
        values = [float(v) for v in severity[patient][:3]]
        assert values == pytest.approx([expected.right, expected.left, expected.total], abs=1e-5)
        assert [int(v) for v in severity[patient][3:]] == [extent.right, extent.left, extent.total]


def test_pixels_read_back_in_range(dataset: Path) -> None:
    for path in sorted((dataset / "stage_2_train_images").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        assert pixels.shape == (ds.Rows, ds.Columns)
        assert ds.BitsAllocated == (8 if ds.BitsStored == 8 else 16)
        assert 0 <= int(pixels.min()) and int(pixels.max()) <= 2**ds.BitsStored - 1
        assert int(pixels.max()) - int(pixels.min()) > 2 ** (ds.BitsStored - 2), "the image uses its bit depth"
        assert ds.PatientID == path.stem
        assert str(ds.PatientName).startswith("SYNTH^")
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == synth.SOP_CLASS_FOR_MODALITY[ds.Modality]


# --- determinism -----------------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_bytes(dataset: Path, tmp_path: Path) -> None:
    again = _files(_generate(tmp_path, seed=7))
    first = _files(dataset)
    assert again.keys() == first.keys()
    assert [name for name in first if first[name] != again[name]] == []
    other = _files(_generate(tmp_path, seed=8))
    assert set(other).isdisjoint(
        set(first) - {"dataset.json", "severity.csv", "stage_2_train_labels.csv", "stage_2_detailed_class_info.csv"}
    ), "patientIds depend on the seed"
    assert other["stage_2_train_labels.csv"] != first["stage_2_train_labels.csv"]


# sha256 of the `dataset` fixture (seed 7, 6 images of 96-192 px, half positive): every file's path, a NUL, its bytes,
# in path order. Computed with the single-module models/synth.py before it was split into a package (numpy, scipy,
# Pillow and pydicom as pinned in constraints.txt). The detector's weights were trained on this generator's output,
# so a change here means the training data changed: if a pinned library's upgrade changed it, look at the images and
# record the new digest; otherwise the generator changed by accident.
GOLDEN_SEED_7 = "8e26fb21abb875f02c4c2798fe78900dadb06f6f4eb5ce063cc7af9ed2b202c4"


def test_seed_7_gives_the_files_it_always_gave(dataset: Path) -> None:
    digest = hashlib.sha256()
    for name, data in _files(dataset).items():
        digest.update(name.encode() + b"\0" + data)
    assert digest.hexdigest() == GOLDEN_SEED_7, "the generator's output for seed 7 changed (see GOLDEN_SEED_7)"


def test_generate_refuses_a_folder_with_files(dataset: Path) -> None:
    with pytest.raises(FileExistsError, match="not an empty folder"):
        synth.generate_dataset(dataset, 1, 0, size_range=SIZES)


# --- one radiograph --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (128, 100), (256, 300)])
def test_small_radiograph_ground_truth(size: tuple[int, int]) -> None:
    rows, cols = size
    r = synth.make_radiograph(np.random.default_rng(3), rows, cols, positive=True, n_boxes=2)
    assert r.pixels.shape == size and r.pixels.dtype == np.uint16
    assert r.lung_mask.dtype == bool and (r.lung_mask == (r.right_lung | r.left_lung)).all()
    assert not (r.right_lung & r.left_lung).any()
    assert r.right_lung.any() and r.left_lung.any()
    assert np.nonzero(r.right_lung)[1].mean() < cols / 2 < np.nonzero(r.left_lung)[1].mean()
    assert len(r.boxes) == len(r.kinds) >= 1 and set(r.kinds) <= {"consolidation", "ground-glass"}
    assert not (r.opacity_mask & ~r.lung_mask).any()
    assert r.view_position == "PA" and 0.1 < r.pixel_spacing_mm < 10


def test_negative_radiograph_has_no_opacity() -> None:
    r = synth.make_radiograph(np.random.default_rng(4), 160, 160, positive=False)
    assert r.boxes == [] and r.kinds == [] and not r.opacity_mask.any()


def test_opacity_is_visible() -> None:
    """Inside the opacity the picture is brighter (denser) than in the rest of the lungs."""
    positive = synth.make_radiograph(np.random.default_rng(5), 256, 256, positive=True, n_boxes=1)
    shown = synth.presentation_image(positive)
    mask = positive.opacity_mask
    lungs_elsewhere = positive.lung_mask & ~ndimage.binary_dilation(mask, iterations=6)
    assert shown[mask].mean() > shown[lungs_elsewhere].mean() + 0.04


def test_monochrome1_stores_the_inverted_scene() -> None:
    args = dict(rows=150, cols=130, positive=True, bits_stored=12)
    m2 = synth.make_radiograph(np.random.default_rng(11), photometric_interpretation="MONOCHROME2", **args)
    m1 = synth.make_radiograph(np.random.default_rng(11), photometric_interpretation="MONOCHROME1", **args)
    assert (m1.pixels.astype(np.int32) == 4095 - m2.pixels.astype(np.int32)).all()
    assert m1.boxes == m2.boxes and (m1.lung_mask == m2.lung_mask).all()
    assert np.allclose(synth.presentation_image(m1), synth.presentation_image(m2))


def test_arguments_are_checked() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="bits_stored"):
        synth.make_radiograph(rng, 64, 64, positive=False, bits_stored=17)
    with pytest.raises(ValueError, match="photometric_interpretation"):
        synth.make_radiograph(rng, 64, 64, positive=False, photometric_interpretation="RGB")
    with pytest.raises(ValueError, match="n_boxes"):
        synth.make_radiograph(rng, 64, 64, positive=False, n_boxes=2)
    r = synth.make_radiograph(rng, 64, 64, positive=False)
    with pytest.raises(ValueError, match="modality"):
        synth.make_dataset(r, patient_id="x", modality="CT", rng=rng)
    with pytest.raises(ValueError, match="not DICOM keywords"):
        synth.make_dataset(r, patient_id="x", modality="CR", rng=rng, PatientNam="SYNTH^X")


# --- DICOM -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "modality, photometric, bits, view",
    [
        ("CR", "MONOCHROME1", 8, "PA"),
        ("CR", "MONOCHROME2", 16, "AP"),
        ("DX", "MONOCHROME2", 8, "AP"),
        ("DX", "MONOCHROME1", 16, "PA"),
        ("DX", "MONOCHROME2", 12, "PA"),
    ],
)
def test_dciodvfy_accepts_the_files(modality: str, photometric: str, bits: int, view: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(21)
    r = synth.make_radiograph(
        rng, 97, 120, positive=True, bits_stored=bits, photometric_interpretation=photometric, view_position=view
    )
    ds = synth.make_dataset(r, patient_id="6f1c2b9e-0d4a-4e8b-9a57-3c2d1e0f9b8a", modality=modality, rng=rng)
    path = tmp_path / "image.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert assert_valid_dicom(path) == [], "dciodvfy warnings"
    back = pydicom.dcmread(path)
    assert (back.pixel_array == r.pixels).all()
    assert back.PhotometricInterpretation == photometric and back.ViewPosition == view
    assert back.PatientOrientation == ["L", "F"]
    if modality == "DX":
        assert back.PresentationIntentType == "FOR PRESENTATION"
        assert back.PresentationLUTShape == ("INVERSE" if photometric == "MONOCHROME1" else "IDENTITY")
    else:
        assert back.PixelSpacing == back.ImagerPixelSpacing


def test_dataset_files_pass_dciodvfy(dataset: Path) -> None:
    for path in sorted((dataset / "stage_2_train_images").glob("*.dcm")):
        assert assert_valid_dicom(path) == [], f"dciodvfy warnings for {path.name}"


def test_header_keywords_override(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    r = synth.make_radiograph(rng, 64, 64, positive=False)
    ds = synth.make_dataset(
        r, patient_id="p1", modality="DX", rng=rng, PatientName="SYNTH^TEST", SOPInstanceUID="1.2.3"
    )
    assert ds.PatientName == "SYNTH^TEST" and ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3"


# --- statistics ------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not REAL_LABELS.is_file(), reason="the real RSNA label file is not in shared/data")
def test_committed_statistics_match_the_real_labels() -> None:
    recomputed = synth.compute_box_stats(REAL_LABELS, REAL_CLASS_INFO if REAL_CLASS_INFO.is_file() else None)
    committed = json.loads(synth.BOX_STATS_PATH.read_text())
    if "class_rows" not in recomputed:
        committed = {k: v for k, v in committed.items() if k not in ("class_rows", "normal_fraction_of_negatives")}
    assert json.loads(json.dumps(recomputed)) == committed


def test_plans_follow_the_rsna_frequencies() -> None:
    stats = synth.load_box_stats()
    plans = synth.sample_image_plans(np.random.default_rng(0), 400, size_range=(512, 3000))
    assert sum(p.positive for p in plans) == round(400 * 0.225)
    assert all(512 <= p.rows <= 3000 and 512 <= p.cols <= 3000 for p in plans)
    assert all(0.75 <= p.cols / p.rows <= 1.3 for p in plans)
    assert {p.bits_stored for p in plans} <= set(range(8, 17)) and {8, 16} <= {p.bits_stored for p in plans}
    assert {p.modality for p in plans} == {"CR", "DX"} and {p.view_position for p in plans} == {"PA", "AP"}
    negatives = [p for p in plans if not p.positive]
    normal = sum(p.negative_class == "Normal" for p in negatives) / len(negatives)
    assert normal == pytest.approx(stats.normal_fraction_of_negatives, abs=0.08)

    counts = np.bincount(
        [p.n_boxes for p in synth.sample_image_plans(np.random.default_rng(1), 800, positive_fraction=1.0)],
        minlength=5,
    )[1:]
    real = np.array([stats.boxes_per_positive_image.get(k, 0) for k in range(1, 5)], dtype=float)
    assert counts / counts.sum() == pytest.approx(real / real.sum(), abs=0.05)


def test_box_sizes_follow_the_rsna_distribution() -> None:
    """Boxes of generated images, scaled to 1024 px, against the real quartiles (after clipping to the lungs)."""
    raw = json.loads(synth.BOX_STATS_PATH.read_text())
    levels = raw["quantile_levels"]
    size = 160
    widths, heights, per_image = [], [], []
    for i in range(120):
        r = synth.make_radiograph(np.random.default_rng([5, i]), size, size, positive=True)
        per_image.append(len(r.boxes))
        widths += [w * 1024 / size for _, _, w, _ in r.boxes]
        heights += [h * 1024 / size for _, _, _, h in r.boxes]
    assert min(per_image) >= 1 and max(per_image) <= 4
    for got, real in ((widths, raw["width_quantiles"]), (heights, raw["height_quantiles"])):
        mine = np.quantile(got, levels)
        middle = slice(1, 4)  # quartiles and median
        assert mine[middle] == pytest.approx(np.array(real)[middle], rel=0.15), (mine, real)


# --- command line ----------------------------------------------------------------------------------------------------


def test_main_and_python_m(tmp_path: Path) -> None:
    args = synth.get_args_parser().parse_args(
        [str(tmp_path / "a"), "--n", "2", "--seed", "3", "--min-size", "64", "--max-size", "96"]
    )
    assert synth.main(args) == 0
    assert synth.main(args) == 2, "a second run into the same folder is refused"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "models.synth",
            str(tmp_path / "b"),
            "--n",
            "2",
            "--seed",
            "3",
            "--min-size",
            "64",
            "--max-size",
            "96",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
