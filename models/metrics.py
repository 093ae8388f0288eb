"""Scores for detections, image-level decisions and lung masks.

Boxes here are (x0, y0, x1, y1) arrays in pixels.

`rsna_map` is the RSNA Pneumonia Detection Challenge metric and `map50` is COCO-style average precision at IoU 0.5.
They are different numbers: the challenge's winners scored about 0.25 on `rsna_map`, while detection papers usually
report something like `map50`. Always say which one you quote.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

RSNA_IOU_THRESHOLDS = (0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75)


@dataclass(frozen=True)
class ImageDetections:
    """Truth and prediction for one image."""

    truth: np.ndarray  # (M, 4)
    boxes: np.ndarray  # (N, 4)
    scores: np.ndarray  # (N,)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(M, N) intersection over union of two sets of (x0, y0, x1, y1) boxes."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def rsna_image_score(image: ImageDetections, thresholds: Sequence[float] = RSNA_IOU_THRESHOLDS) -> float | None:
    """The challenge score of one image, or None for an image with neither truth nor prediction (left out).

    At each IoU threshold t, predictions in descending confidence each take the still-unmatched truth box they
    overlap most, if that IoU exceeds t (a "hit" is IoU > t, as the challenge defines it); the image scores
    TP / (TP + FP + FN) there, averaged over the thresholds. No truth and any prediction scores 0."""
    truth, boxes = image.truth.reshape(-1, 4), image.boxes.reshape(-1, 4)
    if len(truth) == 0 and len(boxes) == 0:
        return None
    if len(truth) == 0 or len(boxes) == 0:
        return 0.0
    order = np.argsort(-np.asarray(image.scores, dtype=np.float64), kind="stable")
    iou = box_iou(boxes[order], truth)
    total = 0.0
    for t in thresholds:
        matched = np.zeros(len(truth), dtype=bool)
        tp = 0
        for row in iou:
            candidates = np.where(~matched & (row > t), row, -1.0)
            best = int(np.argmax(candidates))
            if candidates[best] > t:
                matched[best] = True
                tp += 1
        fp = len(boxes) - tp
        fn = len(truth) - tp
        total += tp / (tp + fp + fn)
    return total / len(thresholds)


def rsna_map(images: Sequence[ImageDetections]) -> float | None:
    """Mean of `rsna_image_score` over the images that count; None when none does."""
    scores = [s for s in (rsna_image_score(i) for i in images) if s is not None]
    return float(np.mean(scores)) if scores else None


def map50(images: Sequence[ImageDetections]) -> float | None:
    """COCO-style AP at IoU 0.5 (101-point interpolation, all areas, up to 100 detections) with pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not any(len(i.truth.reshape(-1, 4)) for i in images):
        return None
    gt: dict = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "lung opacity"}]}
    detections = []
    for index, image in enumerate(images):
        gt["images"].append({"id": index})
        for box in image.truth.reshape(-1, 4):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": index,
                    "category_id": 1,
                    "bbox": [float(box[0]), float(box[1]), w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for box, score in zip(image.boxes.reshape(-1, 4), image.scores, strict=True):
            detections.append(
                {
                    "image_id": index,
                    "category_id": 1,
                    "score": float(score),
                    "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        if not detections:
            return 0.0
        evaluation = COCOeval(coco, coco.loadRes(detections), iouType="bbox")
        evaluation.params.iouThrs = np.array([0.5])
        evaluation.params.maxDets = [100]
        evaluation.params.areaRng = [[0, 1e10]]
        evaluation.params.areaRngLbl = ["all"]
        evaluation.evaluate()
        evaluation.accumulate()
    precision = evaluation.eval["precision"][0, :, 0, 0, 0]  # (iou, recall, class, area, maxdets)
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else 0.0


def roc_auc(labels: Sequence[bool], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); None unless both classes are present."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        return None
    ranks = rankdata(s)
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """2|A∩B| / (|A|+|B|); 1.0 when both are empty."""
    a, b = prediction.astype(bool), truth.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
