"""The two networks, built from torchvision parts: the opacity detector (Mask R-CNN) and the lung-field segmenter.

Nothing here downloads anything: every network starts from random weights unless the caller passes the path of a
pretrained state dict (ImageNet backbone or COCO Mask R-CNN), which is then read from disk.

Both networks take 3-channel float images in [0, 1] (the grayscale radiograph repeated three times, so that ImageNet
and COCO weights fit); `models.preprocess` makes them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import densenet121, mobilenet_v3_large, resnet18, resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.segmentation import lraspp_mobilenet_v3_large
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from models.errors import WeightsError

BACKBONES = ("mobilenet_v3_large_fpn", "resnet18_fpn", "resnet50_fpn", "densenet121_fpn")
"""Detector backbones. ResNet-50-FPN is the usual Mask R-CNN baseline; DenseNet-121 behind an FPN is the paper's
backbone; MobileNetV3-Large-FPN is the compact CPU-friendly one the demo weights use."""

LUNG_ARCHITECTURES = ("lraspp_mobilenet_v3_large",)

PAPER_ANCHORS_AT_256 = (16, 32, 64, 128)
"""The paper's anchor sizes at a 256 px input. Real RSNA boxes at 1024 px have a median of about 217 x 298 px
(1st-99th percentile of sqrt(area) ~98-482 px, i.e. ~24-120 px at 256), which these cover."""

NUM_DETECTOR_CLASSES = 2  # background + lung opacity
LUNG_CLASSES = ("background", "right lung", "left lung")  # the patient's right lung is on the image's left


def default_anchor_sizes(input_size: int, levels: int) -> tuple[int, ...]:
    """The paper's anchors scaled from 256 px to `input_size`, one size per feature level.

    A backbone with five levels (stride 4 to 64) gets one more, smaller size in front."""
    scale = input_size / 256
    sizes = [round(s * scale) for s in PAPER_ANCHORS_AT_256]
    while len(sizes) < levels:
        sizes.insert(0, max(4, sizes[0] // 2))
    return tuple(sizes[-levels:])


@dataclass(frozen=True)
class DetectorConfig:
    """Everything needed to rebuild the detector; stored beside its weights."""

    backbone: str = "mobilenet_v3_large_fpn"
    input_size: int = 320
    """Long side, in pixels, the radiograph is resized to before the detector sees it (aspect ratio kept)."""
    anchor_sizes: tuple[int, ...] = ()
    """One anchor size per feature level at `input_size`; empty means `default_anchor_sizes`."""
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    fpn_channels: int = 256
    box_head_size: int = 1024
    mask_head_channels: int = 256
    detections_per_image: int = 10
    box_score_floor: float = 0.02
    """Detections below this score are dropped inside the network (the reporting threshold is separate)."""

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown detector backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.input_size < 64 or self.input_size % 32:
            raise ValueError(f"detector input_size must be a multiple of 32 and at least 64, not {self.input_size}")

    @staticmethod
    def from_dict(values: dict[str, Any]) -> DetectorConfig:
        known = {k: v for k, v in values.items() if k in DetectorConfig.__dataclass_fields__}
        for key in ("anchor_sizes", "aspect_ratios"):
            if key in known:
                known[key] = tuple(known[key])
        return DetectorConfig(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LungConfig:
    """Everything needed to rebuild the lung-field segmenter; stored beside its weights."""

    architecture: str = "lraspp_mobilenet_v3_large"
    input_size: int = 256
    """The radiograph is resized to input_size x input_size (aspect ratio not kept) for the segmenter."""
    classes: tuple[str, ...] = field(default=LUNG_CLASSES)

    def __post_init__(self) -> None:
        if self.architecture not in LUNG_ARCHITECTURES:
            raise ValueError(f"unknown lung segmenter {self.architecture!r}; choose one of {LUNG_ARCHITECTURES}")

    @staticmethod
    def from_dict(values: dict[str, Any]) -> LungConfig:
        known = {k: v for k, v in values.items() if k in LungConfig.__dataclass_fields__}
        if "classes" in known:
            known["classes"] = tuple(known["classes"])
        return LungConfig(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _load_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file (the {what} weights); pass an existing file") from None
    except Exception as error:  # torch raises many kinds for a corrupt file
        raise WeightsError(f"{path}: cannot read the {what} weights ({error})") from error
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict for the {what}, found {type(state).__name__}")
    return state


def _backbone(config: DetectorConfig, pretrained_backbone: Path | None) -> BackboneWithFPN:
    """A classification network's feature layers behind a feature pyramid network."""
    net: nn.Module
    if config.backbone == "mobilenet_v3_large_fpn":
        net = mobilenet_v3_large(weights=None)
        # Layers 6, 12 and 16 end the stride-8, -16 and -32 stages.
        body, return_layers, channels = "features", {"6": "0", "12": "1", "16": "2"}, [40, 112, 960]
    elif config.backbone in ("resnet18_fpn", "resnet50_fpn"):
        net = resnet18(weights=None) if config.backbone == "resnet18_fpn" else resnet50(weights=None)
        body = ""
        return_layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
        channels = [64, 128, 256, 512] if config.backbone == "resnet18_fpn" else [256, 512, 1024, 2048]
    else:  # densenet121_fpn
        net = densenet121(weights=None)
        body = "features"
        return_layers = {"denseblock1": "0", "denseblock2": "1", "denseblock3": "2", "norm5": "3"}
        channels = [256, 512, 1024, 1024]
    if pretrained_backbone is not None:
        state = _load_state_dict(pretrained_backbone, f"{config.backbone} ImageNet backbone")
        missing, unexpected = net.load_state_dict(state, strict=False)
        if len(missing) > len(state) // 2:
            raise WeightsError(
                f"{pretrained_backbone}: these are not weights for {config.backbone.removesuffix('_fpn')} "
                f"({len(missing)} of its tensors missing, e.g. {missing[:3]})"
            )
    features = getattr(net, body) if body else net
    return BackboneWithFPN(features, return_layers, channels, config.fpn_channels, extra_blocks=LastLevelMaxPool())


def build_detector(
    config: DetectorConfig, *, pretrained_backbone: Path | None = None, pretrained_coco: Path | None = None
) -> MaskRCNN:
    """Mask R-CNN with two classes (background, lung opacity) on the configured backbone.

    `pretrained_coco` is a torchvision COCO Mask R-CNN state dict (ResNet-50-FPN); every tensor whose name and shape
    match is loaded, the class-specific predictors are left fresh."""
    backbone = _backbone(config, pretrained_backbone)
    levels = len(backbone.body.return_layers) + 1  # + LastLevelMaxPool
    sizes = config.anchor_sizes or default_anchor_sizes(config.input_size, levels)
    if len(sizes) == levels:
        anchor_sizes = tuple((s,) for s in sizes)
    else:  # any other count: every level gets every size
        anchor_sizes = (tuple(sizes),) * levels
    anchors = AnchorGenerator(anchor_sizes, (tuple(config.aspect_ratios),) * levels)
    names = [str(i) for i in range(levels - 1)]
    representation = config.box_head_size
    model = MaskRCNN(
        backbone,
        num_classes=None,  # given by the two predictors below
        min_size=config.input_size,
        max_size=config.input_size,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(config.fpn_channels * 7 * 7, representation),
        box_predictor=FastRCNNPredictor(representation, NUM_DETECTOR_CLASSES),
        mask_roi_pool=MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(config.fpn_channels, [config.mask_head_channels] * 4, 1),
        mask_predictor=MaskRCNNPredictor(config.mask_head_channels, config.mask_head_channels, NUM_DETECTOR_CLASSES),
        box_score_thresh=config.box_score_floor,
        box_detections_per_img=config.detections_per_image,
        # A radiograph has at most a handful of opacities (RSNA: 1-4 boxes), not COCO's dozens of objects:
        # fewer proposals and fewer sampled RoIs cost a fraction of the time for the same recall.
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=500,
        rpn_post_nms_top_n_test=200,
        box_batch_size_per_image=64,
    )
    if pretrained_coco is not None:
        state = _load_state_dict(pretrained_coco, "COCO Mask R-CNN")
        own = model.state_dict()
        fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if len(fitting) < len(own) // 2:
            raise WeightsError(
                f"{pretrained_coco}: only {len(fitting)} of {len(own)} tensors fit a {config.backbone} detector "
                f"with fpn_channels={config.fpn_channels}; COCO weights fit resnet50_fpn with the default heads"
            )
        model.load_state_dict(fitting, strict=False)
    return model


def build_lung_segmenter(config: LungConfig, *, pretrained_backbone: Path | None = None) -> nn.Module:
    """LR-ASPP on MobileNetV3-Large with three classes: background, right lung, left lung."""
    model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=len(config.classes))
    if pretrained_backbone is not None:
        state = _load_state_dict(pretrained_backbone, "MobileNetV3-Large ImageNet backbone")
        features = OrderedDict((k.removeprefix("features."), v) for k, v in state.items() if k.startswith("features."))
        missing, _ = model.backbone.load_state_dict(features, strict=False)
        if len(missing) > len(features) // 2:
            raise WeightsError(f"{pretrained_backbone}: these are not MobileNetV3-Large weights")
    return model
