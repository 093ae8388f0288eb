"""DICOM pixel data → the array the Predictor documents (models.preprocess): Modality LUT, VOI LUT or window,
MONOCHROME1 inverted, any bit depth from 1 to 16. Runs in the worker, never on the network thread."""

from __future__ import annotations

import numpy as np
from pydicom import Dataset

from models.data.dicom import check_radiograph, presentation_pixels

__all__ = ["check_radiograph", "prepare"]


def prepare(ds: Dataset) -> np.ndarray:
    """The image as a radiologist would see it, as float32 (rows, columns); ImageError names what is wrong."""
    return presentation_pixels(ds)
