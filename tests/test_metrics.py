"""The detection and classification metrics on hand-worked cases and on the real RSNA label file."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REAL_CXR, needs
from models.data.rsna import corners, read_labels
from models.metrics import ImageDetections, box_iou, dice, map50, roc_auc, rsna_image_score, rsna_map


def image(truth: list[list[float]], boxes: list[list[float]], scores: list[float] | None = None) -> ImageDetections:
    return ImageDetections(
        truth=np.array(truth, dtype=float).reshape(-1, 4),
        boxes=np.array(boxes, dtype=float).reshape(-1, 4),
        scores=np.array(scores if scores is not None else [1.0] * len(boxes), dtype=float),
    )


def test_iou_of_known_boxes() -> None:
    assert box_iou(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 6]]))[0, 0] == pytest.approx(0.6)
    assert box_iou(np.array([[0, 0, 10, 10]]), np.array([[10, 10, 20, 20]]))[0, 0] == 0.0


def test_perfect_prediction_scores_one() -> None:
    assert rsna_image_score(image([[0, 0, 10, 10]], [[0, 0, 10, 10]])) == 1.0


def test_hit_needs_iou_strictly_above_the_threshold() -> None:
    # IoU exactly 0.5: a hit at 0.40 and 0.45 only -> 2 of 8 thresholds score 1, the rest TP=0, FP=1, FN=1 -> 0.
    assert rsna_image_score(image([[0, 0, 10, 10]], [[0, 0, 10, 5]])) == pytest.approx(2 / 8)


def test_empty_images() -> None:
    assert rsna_image_score(image([], [])) is None  # left out of the mean
    assert rsna_image_score(image([], [[0, 0, 5, 5]])) == 0.0  # any prediction on a negative image scores 0
    assert rsna_image_score(image([[0, 0, 5, 5]], [])) == 0.0
    assert rsna_map([image([], []), image([[0, 0, 10, 10]], [[0, 0, 10, 10]])]) == 1.0
    assert rsna_map([image([], [])]) is None


def test_two_truths_three_predictions() -> None:
    # One perfect, one at IoU 0.6, one false positive.
    # t in 0.40..0.55: TP=2 FP=1 FN=0 -> 2/3 ; t in 0.60..0.75: TP=1 FP=2 FN=1 -> 1/4.
    case = image(
        [[0, 0, 10, 10], [50, 50, 60, 60]],
        [[0, 0, 10, 10], [50, 50, 60, 56], [100, 100, 110, 110]],
        [0.9, 0.8, 0.7],
    )
    assert rsna_image_score(case) == pytest.approx((4 * 2 / 3 + 4 * 1 / 4) / 8)


def test_confidence_order_decides_which_prediction_matches() -> None:
    # Truth: an outer box T1 and a shorter box T2 inside it. A overlaps both (IoU 0.9 with T1, 0.889 with T2);
    # B overlaps T1 at 0.667 and T2 at exactly 0.5. Each prediction, in descending confidence, takes the unmatched
    # truth it overlaps most.
    truth = [[0, 0, 10, 10], [0, 0, 10, 8]]
    a, b = [0, 0, 10, 9], [0, 2, 10, 12]
    # A first: A takes T1; B is left with T2 (0.5, a hit at t = 0.40, 0.45 only).
    #   t 0.40, 0.45: TP=2 -> 1; t 0.50..0.75: TP=1 FP=1 FN=1 -> 1/3.  (2 + 6/3) / 8 = 0.5
    a_first = image(truth, [a, b], [0.9, 0.5])
    assert rsna_image_score(a_first) == pytest.approx(0.5)
    # B first: B takes T1 while t < 0.667, then A takes T2 (0.889).
    #   t 0.40..0.65: TP=2 -> 1; t 0.70, 0.75: B misses both, A takes T1: TP=1 FP=1 FN=1 -> 1/3.  (6 + 2/3) / 8
    b_first = image(truth, [a, b], [0.5, 0.9])
    assert rsna_image_score(b_first) == pytest.approx((6 + 2 / 3) / 8)
    # Only the scores moved, not the order of the boxes in the input: the same input order with B's score higher
    # must score as B first.
    assert rsna_image_score(image(truth, [b, a], [0.9, 0.5])) == pytest.approx(rsna_image_score(b_first))
    lone_poor = image([[0, 0, 10, 10]], [[0, 0, 10, 7]], [0.9])
    assert rsna_image_score(lone_poor) == pytest.approx(6 / 8)  # hit while t < 0.7


@needs(REAL_CXR)
def test_real_label_file_scored_against_itself_is_perfect() -> None:
    labels = read_labels(REAL_CXR / "rsna" / "stage_2_train_labels.csv")
    assert len(labels) == 26684
    images = []
    for boxes in labels.values():
        truth = np.array([corners(b) for b in boxes], dtype=float).reshape(-1, 4)
        images.append(ImageDetections(truth, truth.copy(), np.ones(len(truth))))
    positives = sum(1 for b in labels.values() if b)
    assert positives == 6012
    assert rsna_map(images) == pytest.approx(1.0)
    assert map50(images[:3000]) == pytest.approx(1.0)


def test_map50_orders_by_confidence() -> None:
    hits_first = [image([[0, 0, 10, 10]], [[0, 0, 10, 10], [30, 30, 40, 40]], [0.9, 0.1])]
    misses_first = [image([[0, 0, 10, 10]], [[0, 0, 10, 10], [30, 30, 40, 40]], [0.1, 0.9])]
    assert map50(hits_first) == pytest.approx(1.0)
    assert map50(misses_first) == pytest.approx(0.5, abs=0.01)
    assert map50([image([], [[0, 0, 1, 1]])]) is None


def test_auc() -> None:
    assert roc_auc([True, False, True, False], [0.9, 0.1, 0.8, 0.85]) == pytest.approx(0.75)
    assert roc_auc([True, False], [0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([True, True], [0.1, 0.2]) is None


def test_dice() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert dice(a, b) == 1.0
    a[:2] = True
    b[1:3] = True
    assert dice(a, b) == pytest.approx(0.5)
