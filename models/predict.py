"""The Predictor: load both networks once, then turn batches of radiographs into Findings.

    predictor = Predictor.load()                 # the demo weights, GPU when there is one
    findings = predictor.predict([image, ...])   # one Finding per image, in order

The input is described in `models.preprocess` (2-D arrays in presentation polarity, any size and bit depth).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.errors import WeightsError
from models.finding import Finding, Opacity, Thresholds
from models.nets import DetectorConfig, LungConfig, build_detector, build_lung_segmenter
from models.preprocess import as_tensor, check_image, detector_shape, letterbox, to_network_input
from models.severity import lung_involvement
from models.weights import DEMO_WEIGHTS, MANIFEST, load_into, load_network, read_manifest, thresholds_of

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """'auto' is CUDA when a GPU is usable, else CPU; 'cuda' without a GPU is an error, not a silent fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA GPU is available; use 'auto' or 'cpu'")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', not {device!r}")
    return torch.device(device)


@dataclass(frozen=True)
class RawDetections:
    """Detector output for one image at network resolution."""

    boxes: torch.Tensor  # (N, 4) in network pixels
    scores: torch.Tensor  # (N,)
    masks: torch.Tensor  # (N, 1, h, w) probabilities at network resolution
    network_shape: tuple[int, int]


class Predictor:
    """Both networks, loaded once, on one device. Not thread-safe: give each worker thread its own, or serialise."""

    max_batch = 8
    """`predict` runs the networks on at most this many images at a time (bounds memory for long lists)."""

    def __init__(
        self,
        detector: torch.nn.Module,
        detector_config: DetectorConfig,
        lungs: torch.nn.Module,
        lung_config: LungConfig,
        thresholds: Thresholds,
        model_version: str,
        device: torch.device,
    ) -> None:
        self.detector = detector.eval().to(device)
        self.lungs = lungs.eval().to(device)
        if device.type == "cuda":  # convolutions in NHWC are what the GPU's tensor cores want
            self.detector = self.detector.to(memory_format=torch.channels_last)
            self.lungs = self.lungs.to(memory_format=torch.channels_last)
        self.detector_config = detector_config
        self.lung_config = lung_config
        self.thresholds = thresholds
        self.model_version = model_version
        self.device = device
        self.autocast = device.type == "cuda"

    @classmethod
    def load(
        cls, weights_dir: Path | str | None = None, device: str = "auto", thresholds: Thresholds | None = None
    ) -> Predictor:
        """Read and verify the weights in `weights_dir` (default: the demo weights shipped in models/weights)."""
        folder = Path(weights_dir) if weights_dir is not None else DEMO_WEIGHTS
        manifest = read_manifest(folder)
        if not manifest:
            raise WeightsError(f"{folder}: no {MANIFEST}; pass a folder written by `cxrnode train`")
        torch_device = resolve_device(device)
        detector_weights = load_network(folder, "detector")
        lung_weights = load_network(folder, "lungs")
        detector_config = DetectorConfig.from_dict(detector_weights.entry["config"])
        lung_config = LungConfig.from_dict(lung_weights.entry["config"])
        detector = build_detector(detector_config)
        load_into(detector, detector_weights, folder / detector_weights.entry["file"])
        lungs = build_lung_segmenter(lung_config)
        load_into(lungs, lung_weights, folder / lung_weights.entry["file"])
        version = (
            f"{manifest.get('name', folder.name)} {manifest.get('version', '?')} "
            f"({detector_weights.sha256[:8]}/{lung_weights.sha256[:8]})"
        )
        chosen = thresholds or thresholds_of(detector_weights.entry)
        log.info("models loaded: %s on %s, thresholds %s", version, torch_device, chosen)
        return cls(detector, detector_config, lungs, lung_config, chosen, version, torch_device)

    # -- the two networks -------------------------------------------------------------------------------------------

    def upload(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """The images as float32 tensors on the Predictor's device: uploaded once, resized there (on a GPU the
        full-resolution resizing is GPU work, not CPU work)."""
        return [as_tensor(image, self.device) for image in images]

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray | torch.Tensor]) -> list[RawDetections]:
        """Detector only, at network resolution (used by evaluation and training's validation too)."""
        size = self.detector_config.input_size
        shapes = [detector_shape(*image.shape, size) for image in images]
        batch = torch.stack([letterbox(to_network_input(i, s), size) for i, s in zip(images, shapes, strict=True)])
        batch = batch.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, enabled=self.autocast):
            outputs = self.detector(list(batch))
        for output, (rows, columns) in zip(outputs, shapes, strict=True):  # nothing lies in the letterbox padding
            output["boxes"][:, 0::2] = output["boxes"][:, 0::2].clamp(0, columns)
            output["boxes"][:, 1::2] = output["boxes"][:, 1::2].clamp(0, rows)
        return [
            RawDetections(
                boxes=o["boxes"].float(),
                scores=o["scores"].float(),
                masks=o["masks"].float()[..., : shape[0], : shape[1]],
                network_shape=shape,
            )
            for o, shape in zip(outputs, shapes, strict=True)
        ]

    @torch.inference_mode()
    def segment_lungs(self, images: Sequence[np.ndarray | torch.Tensor]) -> list[torch.Tensor]:
        """Lung-class logits (3, s, s) per image at the segmenter's resolution."""
        size = self.lung_config.input_size
        batch = torch.stack([to_network_input(image, (size, size)) for image in images]).to(self.device)
        if self.device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, enabled=self.autocast):
            logits = self.lungs(batch)["out"]
        return list(logits.float())

    # -- the whole thing --------------------------------------------------------------------------------------------

    def predict(self, images: Sequence[np.ndarray]) -> list[Finding]:
        """One Finding per image; see models.preprocess for what an image must be."""
        for index, image in enumerate(images):
            check_image(image, f"image {index}")
        findings: list[Finding] = []
        for start in range(0, len(images), self.max_batch):
            chunk = images[start : start + self.max_batch]
            uploaded = self.upload(chunk)
            detections = self.detect(uploaded)
            lung_logits = self.segment_lungs(uploaded)
            findings.extend(
                self.finding(image.shape, raw, logits)  # type: ignore[arg-type]
                for image, raw, logits in zip(chunk, detections, lung_logits, strict=True)
            )
        return findings

    @torch.inference_mode()
    def finding(self, shape: tuple[int, int], raw: RawDetections, lung_logits: torch.Tensor) -> Finding:
        """Combine one image's network outputs into its Finding at the original resolution `shape`."""
        rows, columns = shape
        th = self.thresholds
        right_lung, left_lung = lung_masks(lung_logits, shape)
        probability = float(raw.scores.max()) if raw.scores.numel() else 0.0
        keep = torch.nonzero(raw.scores >= th.score).flatten()
        opacities = []
        if keep.numel():
            masks = upsample_masks(raw.masks[keep], shape) >= th.mask
            scale = torch.tensor(
                [columns / raw.network_shape[1], rows / raw.network_shape[0]] * 2, device=raw.boxes.device
            )
            boxes = (raw.boxes[keep] * scale).cpu().numpy()
            for box, score, mask in zip(boxes, raw.scores[keep].cpu().numpy(), masks.cpu().numpy(), strict=True):
                x0, y0, x1, y1 = (float(v) for v in box)
                opacities.append(Opacity(box=(x0, y0, x1, y1), score=float(score), mask=mask[0]))
        opacity = involved(opacities, raw.masks[keep], shape, th)
        severity, extent = lung_involvement(opacity, right_lung, left_lung)
        return Finding(
            image_shape=(rows, columns),
            opacities=tuple(opacities),
            right_lung=right_lung,
            left_lung=left_lung,
            severity=severity,
            extent=extent,
            opacity_probability=probability,
            opacity_present=probability >= th.present,
            thresholds=th,
            model_version=self.model_version,
        )


def involved(opacities: Sequence[Opacity], masks: torch.Tensor, shape: tuple[int, int], th: Thresholds) -> np.ndarray:
    """The union of the reported opacities that counts towards lung involvement: their masks (`masks`, the network's
    probabilities) at `th.severity_mask` where that differs from the reported masks' threshold."""
    opacity = np.zeros(shape, dtype=bool)
    if th.severity_mask_or_mask == th.mask:
        for item in opacities:
            opacity |= item.mask
    elif masks.numel():
        opacity = (upsample_masks(masks, shape) >= th.severity_mask_or_mask).any(dim=0)[0].cpu().numpy()
    return opacity


def upsample_masks(masks: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(N, 1, h, w) probabilities → (N, 1, rows, columns), bilinear."""
    return F.interpolate(masks, size=shape, mode="bilinear", align_corners=False)


def lung_masks(logits: torch.Tensor, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Right and left lung boolean masks at `shape` from the segmenter's (3, s, s) logits: the argmax of the
    bilinearly upsampled logits. Upsampling is linear, so the two lungs' margins over the background are upsampled
    instead of the three logits, and compared: the same answer as argmax, a third less upsampling and no
    full-resolution argmax (which costs more than both networks together on a large image)."""
    margins = F.interpolate((logits[1:] - logits[:1])[None], size=shape, mode="bilinear", align_corners=False)[0]
    right_margin, left_margin = margins[0], margins[1]
    right = (right_margin > 0) & (right_margin >= left_margin)
    left = (left_margin > 0) & (left_margin > right_margin)
    return right.cpu().numpy(), left.cpu().numpy()
