"""A DICOM radiograph → the presentation-polarity array the Predictor takes (see models.preprocess).

Used by the training and evaluation readers here and by the node's worker, so that both prepare pixels the same way.
"""

from __future__ import annotations

import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from models.errors import ImageError

SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")


def check_radiograph(ds: Dataset) -> None:
    """Raise ImageError, naming the attribute, when the header does not describe one grayscale frame."""
    sop = ds.get("SOPInstanceUID", "?")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageError(f"SOP Instance {sop}: no Pixel Data (7FE0,0010)")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in SUPPORTED_PHOTOMETRIC:
        raise ImageError(
            f"SOP Instance {sop}: Photometric Interpretation {photometric or '(missing)'} is not supported; "
            "only grayscale MONOCHROME1 / MONOCHROME2 radiographs can be analysed"
        )
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise ImageError(f"SOP Instance {sop}: Samples per Pixel {ds.SamplesPerPixel}; expected 1 (grayscale)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ImageError(f"SOP Instance {sop}: {frames} frames; only single-frame radiographs can be analysed")
    bits = int(ds.get("BitsStored", 0) or 0)
    if not 1 <= bits <= 16:
        raise ImageError(f"SOP Instance {sop}: Bits Stored {bits or '(missing)'}; expected 1 to 16")


def presentation_pixels(ds: Dataset) -> np.ndarray:
    """Decode the pixels, apply the Modality LUT, the first VOI LUT or window, and invert MONOCHROME1.

    Returns float32 (rows, columns) where brighter means denser, as a viewer would display it."""
    check_radiograph(ds)
    try:
        stored = ds.pixel_array
    except Exception as error:  # the decoders raise many kinds for broken streams
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID", None) if meta is not None else None
        raise ImageError(
            f"SOP Instance {ds.get('SOPInstanceUID', '?')}: cannot decode Pixel Data "
            f"(transfer syntax {syntax.name if syntax else 'unknown'}): {error}"
        ) from error
    if stored.ndim != 2:
        raise ImageError(f"SOP Instance {ds.get('SOPInstanceUID', '?')}: decoded pixels have shape {stored.shape}")
    values = modality_values(stored, ds)
    if "VOILUTSequence" in ds:
        values = np.asarray(apply_voi_lut(values, ds, index=0, prefer_lut=True), dtype=np.float32)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        apply_window(values, ds)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        np.negative(values, out=values)  # any decreasing map will do: the Predictor rescales by percentiles
    return values


def _first(value: object) -> float:
    """The first of a multi-valued window attribute, or its only value."""
    return float(value[0] if isinstance(value, MultiValue | list | tuple) else value)  # type: ignore[arg-type]


def modality_values(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """The Modality LUT: a Modality LUT Sequence through pydicom, Rescale Slope / Intercept here, in float32 and
    in place (pydicom's own path makes several float64 copies of a large image)."""
    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    values = stored.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1:
        values *= slope
    if intercept:
        values += intercept
    return values


def apply_window(values: np.ndarray, ds: Dataset) -> None:
    """The first window (PS3.3 C.11.2.1.2), in place, onto the output range [0, 1]: LINEAR (the default),
    LINEAR_EXACT or SIGMOID per VOI LUT Function."""
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function == "SIGMOID":
        values -= center
        values *= -4.0 / width
        np.exp(values, out=values)
        values += 1.0
        np.reciprocal(values, out=values)
        return
    if function == "LINEAR_EXACT":
        values -= center
        values *= 1.0 / width
    else:  # LINEAR: y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped
        values -= center - 0.5
        values *= 1.0 / max(width - 1.0, 1.0)
    values += 0.5
    np.clip(values, 0.0, 1.0, out=values)
