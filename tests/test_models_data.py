"""Readers, severity, preprocessing and weights files: real behaviour on small inputs, and clear errors on bad ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import LUNGS_REAL, REAL_CXR, needs
from models.data.lungs import is_holdout, read_mask, read_pairs, split_lungs
from models.data.rsna import ellipse_mask, read_dataset, read_labels
from models.errors import DatasetError, ImageError, WeightsError
from models.nets import DetectorConfig, LungConfig, build_detector, build_lung_segmenter, default_anchor_sizes
from models.preprocess import check_image, normalize, to_network_input
from models.severity import extent_score, lung_involvement
from models.weights import load_network, save_network

# -- severity -----------------------------------------------------------------------------------------------------------


def test_severity_is_opacity_inside_lung_over_lung_area() -> None:
    right = np.zeros((10, 20), bool)
    left = np.zeros((10, 20), bool)
    right[:, :8] = True  # 80 px
    left[:, 12:] = True  # 80 px
    opacity = np.zeros((10, 20), bool)
    opacity[:5, :10] = True  # 40 px in the right lung, 10 px in the mediastinum (not counted)
    severity, extent = lung_involvement(opacity, right, left)
    assert severity.right == pytest.approx(50.0)
    assert severity.left == 0.0
    assert severity.total == pytest.approx(25.0)
    assert (extent.right, extent.left, extent.total) == (3, 0, 3)


@pytest.mark.parametrize(
    "percent,score", [(0, 0), (0.01, 1), (24.9, 1), (25, 2), (49.9, 2), (50, 3), (75, 3), (75.1, 4), (100, 4)]
)
def test_extent_score_bands(percent: float, score: int) -> None:
    assert extent_score(percent) == score


# -- RSNA layout ----------------------------------------------------------------------------------------------------------


def write_labels(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "stage_2_train_labels.csv"
    path.write_text(text)
    return path


def test_label_reader_groups_boxes_per_patient(tmp_path: Path) -> None:
    path = write_labels(tmp_path, "patientId,x,y,width,height,Target\na,,,,,0\nb,1,2,3,4,1\nb,5.5,6,7,8,1\n")
    assert read_labels(path) == {"a": (), "b": ((1.0, 2.0, 3.0, 4.0), (5.5, 6.0, 7.0, 8.0))}


@pytest.mark.parametrize(
    "body,expected",
    [
        ("a,1,2,3,4,2\n", ":2: Target must be 0 or 1"),
        ("a,1,2,3\n", ":2: 4 columns"),
        ("a,x,2,3,4,1\n", ":2: x 'x' is not a number"),
        ("a,1,2,0,4,1\n", ":2: box"),
        ("a,1,2,3,4,0\n", ":2: Target 0 but a box is given"),
        ("ok,,,,,0\na,1,2,3,nan,1\n", ":3: height 'nan' is not a finite number"),
    ],
)
def test_label_reader_names_the_bad_line(tmp_path: Path, body: str, expected: str) -> None:
    path = write_labels(tmp_path, "patientId,x,y,width,height,Target\n" + body)
    with pytest.raises(DatasetError, match=expected):
        read_labels(path)


def test_label_reader_checks_the_header(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="header must be"):
        read_labels(write_labels(tmp_path, "id,x,y,w,h,t\n"))


def test_dataset_in_the_wrong_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not in the RSNA layout"):
        read_dataset(tmp_path)
    (tmp_path / "stage_2_train_images").mkdir()
    write_labels(tmp_path, "patientId,x,y,width,height,Target\nmissing,,,,,0\n")
    with pytest.raises(DatasetError, match="1 labelled image.s. missing, e.g. missing.dcm"):
        read_dataset(tmp_path)


def test_ellipse_mask_fills_its_box() -> None:
    mask = ellipse_mask((10, 20, 40, 20), (64, 64))
    rows, columns = np.nonzero(mask)
    assert (columns.min(), columns.max() + 1, rows.min(), rows.max() + 1) == (10, 50, 20, 40)
    assert mask.sum() == pytest.approx(np.pi * 20 * 10, rel=0.05)


# -- lung masks ---------------------------------------------------------------------------------------------------------


def test_split_puts_the_patients_right_lung_on_the_image_left() -> None:
    mask = np.zeros((40, 60), bool)
    mask[5:35, 5:25] = True
    mask[8:30, 35:55] = True
    mask[2:4, 50:52] = True  # a speck: joins the nearer lung
    right, left = split_lungs(mask)
    assert right[:, :30].sum() == right.sum() == 600
    assert left.sum() == 22 * 20 + 4
    touching = mask.copy()
    touching[15:20, 25:35] = True  # the lungs touch: cut at the narrowest column
    right, left = split_lungs(touching)
    assert right.sum() > 500 and left.sum() > 400 and not (right & left).any()


def test_holdout_is_fixed_by_name() -> None:
    names = [f"image-{i}.png" for i in range(2000)]
    share = sum(map(is_holdout, names)) / len(names)
    assert 0.17 < share < 0.23
    assert [is_holdout(n) for n in names[:50]] == [is_holdout(n) for n in names[:50]]


@needs(LUNGS_REAL)
def test_real_pairs_read_with_views() -> None:
    pairs = read_pairs(LUNGS_REAL)
    assert len(pairs) == 427
    assert {p.view for p in pairs} == {"PA", "AP", "AP Supine"}
    from models.data.lungs import read_gray

    image = read_gray(pairs[0].image)
    right, left = split_lungs(read_mask(pairs[0].mask, image.shape))
    assert right.sum() > 0 and left.sum() > 0


@needs(REAL_CXR)
def test_montgomery_style_pairs() -> None:
    pairs = read_pairs(REAL_CXR / "lung_masks_montgomery")
    assert [p.name for p in pairs] == ["1.jpg", "2.jpg", "3.jpg", "4.jpg"]


# -- preprocessing --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image,message",
    [
        (np.zeros((10, 10, 3)), "2-D"),
        (np.zeros((64, 64), dtype=bool), "dtype bool"),
        (np.zeros((16, 64)), "smaller than 32"),
        (np.full((64, 64), np.nan), "NaN"),
        ([[1, 2]], "numpy array"),
    ],
)
def test_bad_images_are_refused(image: object, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        check_image(image)  # type: ignore[arg-type]


def test_normalisation_ignores_bit_depth() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((100, 120))
    eight = to_network_input((image * 255).astype(np.uint8), (50, 60))
    sixteen = to_network_input((image * 65535).astype(np.uint16), (50, 60))
    assert eight.shape == (3, 50, 60)
    assert torch.allclose(eight, sixteen, atol=0.02)
    assert float(normalize(torch.ones(8, 8)).max()) == 0.0  # a flat image is not divided by zero


# -- networks and weights ----------------------------------------------------------------------------------------------


def test_anchor_sizes_scale_with_the_input() -> None:
    assert default_anchor_sizes(256, 4) == (16, 32, 64, 128)
    assert default_anchor_sizes(512, 4) == (32, 64, 128, 256)
    assert default_anchor_sizes(256, 5) == (8, 16, 32, 64, 128)


@pytest.mark.parametrize("backbone", ["mobilenet_v3_large_fpn", "resnet18_fpn", "densenet121_fpn", "resnet50_fpn"])
def test_every_backbone_builds_and_detects(backbone: str) -> None:
    model = build_detector(
        DetectorConfig(backbone=backbone, input_size=128, fpn_channels=64, box_head_size=128, mask_head_channels=64)
    ).eval()
    with torch.inference_mode():
        out = model([torch.rand(3, 128, 96)])[0]
    assert set(out) == {"boxes", "labels", "scores", "masks"}


def test_weights_round_trip_and_checksum(tmp_path: Path) -> None:
    config = LungConfig(input_size=64)
    model = build_lung_segmenter(config)
    save_network(tmp_path, "lungs", model, config)
    loaded = load_network(tmp_path, "lungs")
    assert set(loaded.state) == set(model.state_dict())
    path = tmp_path / "lungs.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match"):
        load_network(tmp_path, "lungs")
    path.unlink()
    with pytest.raises(WeightsError, match="missing"):
        load_network(tmp_path, "lungs")
    with pytest.raises(WeightsError, match="no 'detector' entry"):
        load_network(tmp_path, "detector")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_network(tmp_path, "lungs")


def test_pretrained_weights_only_from_a_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no such file"):
        build_detector(DetectorConfig(input_size=128), pretrained_backbone=tmp_path / "nope.pth")
    torch.save({"x": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="not weights for"):
        build_detector(DetectorConfig(input_size=128), pretrained_backbone=tmp_path / "wrong.pth")


@pytest.mark.parametrize("function", [None, "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_presentation_pixels_match_pydicom_up_to_scale(photometric: str, function: str | None) -> None:
    """Our in-place float32 Modality LUT and window give pydicom's apply_modality_lut + apply_voi_lut, up to the
    affine map the Predictor's percentile scaling removes (and negated for MONOCHROME1)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    from models.data.dicom import presentation_pixels
    from models.synth import make_dataset, make_radiograph

    rng = np.random.default_rng(4)
    radiograph = make_radiograph(rng, 300, 280, positive=True, bits_stored=12, photometric_interpretation=photometric)
    ds = make_dataset(radiograph, patient_id="lut", modality="CR", rng=rng)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.WindowCenter, ds.WindowWidth = float(ds.WindowCenter) * 2 - 100, float(ds.WindowWidth) * 2
    if function:
        ds.VOILUTFunction = function
    ours = presentation_pixels(ds).astype(np.float64).ravel()
    reference = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds, index=0).astype(np.float64).ravel()
    if photometric == "MONOCHROME1":
        reference = -reference
    slope, intercept = np.polyfit(reference, ours, 1)
    assert slope > 0 and np.abs(ours - (slope * reference + intercept)).max() < 1e-5
