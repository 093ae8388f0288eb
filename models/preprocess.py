"""From a radiograph as the caller has it to the tensors the networks take. Training and inference both use this.

What the Predictor expects (the node's `pixels` module prepares exactly this):

- one 2-D numpy array per image, (rows, columns), any size from 32 x 32 up;
- any real dtype: uint8, uint16, int16, int32, float32, float64 (bool and complex are refused);
- presentation values: Modality LUT (rescale slope/intercept) and VOI LUT or window already applied when the source
  has them, and MONOCHROME1 already inverted, so that a brighter value means denser tissue (bone, heart, opacity) and
  the lungs are dark — the picture a radiologist sees;
- no particular range: each image is rescaled on its own, its 0.5th percentile to 0 and its 99.5th percentile to 1
  (clipped), so 8-bit, 12-bit and 16-bit images, and images with or without a window applied, all work. NaN or
  infinite values are refused.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.errors import ImageError

LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
MIN_SIDE = 32


def check_image(image: np.ndarray, name: str = "image") -> None:
    """Raise ImageError when `image` is not what the module docstring describes."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.ndim != 2:
        raise ImageError(
            f"{name}: expected a 2-D (rows, columns) grayscale image, got shape {image.shape}; "
            "colour and multi-frame images must be reduced to one grayscale frame first"
        )
    if image.dtype.kind not in "uif":
        raise ImageError(f"{name}: expected integer or floating-point pixels, got dtype {image.dtype}")
    if min(image.shape) < MIN_SIDE:
        raise ImageError(f"{name}: image {image.shape[0]} x {image.shape[1]} is smaller than {MIN_SIDE} x {MIN_SIDE}")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ImageError(f"{name}: image contains NaN or infinite values")


def detector_shape(rows: int, columns: int, long_side: int) -> tuple[int, int]:
    """(rows, columns) after scaling the long side to `long_side`, aspect ratio kept."""
    scale = long_side / max(rows, columns)
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def as_tensor(image: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    """The image as a float32 (rows, columns) tensor on `device` (through pinned memory when that is a GPU)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    if device is not None and device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def resize(image: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Area-averaged (antialiased) resize to `shape`, as a float32 (rows, columns) tensor of the original values,
    on the device the image is on."""
    tensor = (image if isinstance(image, torch.Tensor) else as_tensor(image))[None, None]
    if tuple(tensor.shape[-2:]) != shape:
        tensor = F.interpolate(tensor, size=shape, mode="bilinear", antialias=True, align_corners=False)
    return tensor[0, 0]


def normalize(image: torch.Tensor) -> torch.Tensor:
    """Rescale so the 0.5th percentile is 0 and the 99.5th is 1, clipped to [0, 1]."""
    flat = image.flatten()
    if flat.numel() > 65536:  # percentiles of a regular subsample are as good and much faster
        flat = flat[:: flat.numel() // 65536]
    low, high = torch.quantile(
        flat.float(), torch.tensor([LOW_PERCENTILE / 100, HIGH_PERCENTILE / 100], device=flat.device)
    )
    if float(high - low) <= 1e-6:
        return torch.zeros_like(image)
    return ((image - low) / (high - low)).clamp_(0.0, 1.0)


def to_network_input(image: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """One radiograph → a (3, rows, columns) float tensor in [0, 1] of the given shape (on the image's device)."""
    return normalize(resize(image, shape)).expand(3, -1, -1).contiguous()


def letterbox(image: torch.Tensor, size: int) -> torch.Tensor:
    """Pad a (..., rows, columns) tensor with zeros at the bottom and right to (..., size, size).

    The detector always sees size x size, so a batch is a plain stack and an image's result never depends on which
    other images share its batch (torchvision would otherwise pad each batch to its largest member). Padding at the
    bottom and right keeps pixel coordinates unchanged."""
    rows, columns = image.shape[-2:]
    if rows > size or columns > size:
        raise ValueError(f"image {rows} x {columns} does not fit a {size} x {size} letterbox")
    return F.pad(image, (0, size - columns, 0, size - rows))
