"""A DICOM radiograph → the presentation-polarity array the Predictor takes (see models.preprocess).

Used by the training and evaluation readers here and by the node's worker, so that both prepare pixels the same way.
"""

from __future__ import annotations

import numpy as np
from pydicom import Dataset
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
        raise ImageError(
            f"SOP Instance {ds.get('SOPInstanceUID', '?')}: cannot decode Pixel Data "
            f"(transfer syntax {ds.file_meta.get('TransferSyntaxUID', '?') if 'file_meta' in ds else '?'}): {error}"
        ) from error
    if stored.ndim != 2:
        raise ImageError(f"SOP Instance {ds.get('SOPInstanceUID', '?')}: decoded pixels have shape {stored.shape}")
    values = apply_modality_lut(stored, ds)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        values = apply_voi_lut(values, ds, index=0, prefer_lut=True)
    values = np.asarray(values, dtype=np.float32)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        values = -values  # any decreasing map will do: the Predictor rescales each image by its percentiles
    return values
