"""The grayscale pipeline of a presentation state, from the source image's own attributes (PS3.3 C.11, PS3.4 N.2).

- Modality LUT: the source's rescale (highdicom copies it) or its Modality LUT Sequence;
- VOI: one LUT or one window, as PS3.3 C.11.8 allows: a window the caller gives, else the source's first VOI LUT,
  else its first window (Window Center/Width, explanation, VOI LUT Function), else the full range of its Bits Stored
  (through the rescale); nothing here decodes pixel data;
- Presentation LUT Shape: INVERSE for a MONOCHROME1 image, IDENTITY otherwise (the presentation-state pipeline
  ignores Photometric Interpretation, so INVERSE is what keeps a MONOCHROME1 image's polarity).
"""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)


def presentation_lut_shape(header: Dataset) -> str:
    """INVERSE for a MONOCHROME1 image (minimum value white), IDENTITY for MONOCHROME2."""
    return "INVERSE" if str(header.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1" else "IDENTITY"


def modality_lut_transformation(header: Dataset) -> hd.ModalityLUTTransformation | None:
    """The source's Modality LUT Sequence; None leaves its rescale (if any) to highdicom, which copies it."""
    if "RescaleSlope" in header or not header.get("ModalityLUTSequence"):
        return None
    item = header.ModalityLUTSequence[0]
    first, data = _lut_first_and_data(item)
    return hd.ModalityLUTTransformation(
        modality_lut=hd.ModalityLUT(
            lut_type=str(item.get("ModalityLUTType") or "US"),
            first_mapped_value=first,
            lut_data=data,
            lut_explanation=item.get("LUTExplanation") or None,
        )
    )


def voi_lut_transformation(header: Dataset, window: tuple[float, float] | None) -> hd.pr.SoftcopyVOILUTTransformation:
    """The VOI stage, one LUT or one window (PS3.3 C.11.8 allows no more per image): `window`, else the source's
    first VOI LUT, else its first window (the view `models.data.dicom` prepares for the models, and a viewer shows
    first), else the full range of Bits Stored."""
    if window is not None:
        return _window(float(window[0]), float(window[1]), "cxrnode display window")
    if header.get("VOILUTSequence"):
        item = header.VOILUTSequence[0]
        first, data = _lut_first_and_data(item)
        return hd.pr.SoftcopyVOILUTTransformation(
            voi_luts=[
                hd.VOILUT(first_mapped_value=first, lut_data=data, lut_explanation=item.get("LUTExplanation") or None)
            ]
        )
    centers = _values(header.get("WindowCenter"))
    widths = _values(header.get("WindowWidth"))
    if centers and widths and widths[0] > 0:
        explanations = _values(header.get("WindowCenterWidthExplanation"), str)
        function = str(header.get("VOILUTFunction") or "").strip() or None
        return _window(centers[0], widths[0], explanations[0] if explanations else None, function)
    if centers or widths:
        logger.warning(
            "Source %s: Window Center %s / Width %s are unusable; the GSPS does not use them.",
            header.SOPInstanceUID,
            centers,
            widths,
        )
    center, width = full_range_window(header)
    logger.info(
        "Source %s has no VOI window or LUT; the GSPS shows the full range of its %s stored bits.",
        header.SOPInstanceUID,
        header.get("BitsStored"),
    )
    return _window(center, width, "Full range of Bits Stored")


def _window(
    center: float, width: float, explanation: str | None, function: str | None = None
) -> hd.pr.SoftcopyVOILUTTransformation:
    # Lists, not numbers: highdicom 0.28 turns a lone explanation string into a list of its characters.
    return hd.pr.SoftcopyVOILUTTransformation(
        window_center=[center],
        window_width=[width],
        window_explanation=[explanation] if explanation else None,
        voi_lut_function=function,
    )


def full_range_window(header: Dataset) -> tuple[float, float]:
    """(center, width) of a window spanning every value Bits Stored allows, after the source's rescale."""
    bits = int(header.get("BitsStored") or header.get("BitsAllocated") or 8)
    if int(header.get("PixelRepresentation") or 0) == 1:
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        low, high = 0, (1 << bits) - 1
    slope = float(header.get("RescaleSlope") or 1.0)
    intercept = float(header.get("RescaleIntercept") or 0.0)
    low, high = sorted((low * slope + intercept, high * slope + intercept))
    step = abs(slope)  # one stored step, so that LINEAR maps the lowest value to black and the highest to white
    return (low + high + step) / 2, high - low + step


def _lut_first_and_data(item: Dataset) -> tuple[int, np.ndarray]:
    """First Mapped Value and the entries of a LUT item (LUT Data as US values or OW bytes, 8 or 16 bits each).

    The First Mapped Value is kept as it is stored (a negative one of signed pixel data reads as US), so the copy
    says the same as the source."""
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    dtype = np.uint8 if bits == 8 else np.uint16
    raw = item.LUTData
    if isinstance(raw, (bytes, bytearray)):
        data = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))[:entries].astype(dtype)
    else:
        data = np.atleast_1d(np.asarray(raw, dtype=dtype))  # US values (a list, or one number)
    return first, data


def _values(value: object, kind: type = float) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [kind(value)]
    return [kind(v) for v in value]  # type: ignore[union-attr]
