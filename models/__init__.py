"""cxrnode's ML side: the opacity detector, the lung-field segmenter, severity, data, training and evaluation.

The node uses `Predictor` and `Finding` (and `models.data.dicom` to prepare pixels the same way training does).
"""

from models.finding import ExtentScore, Finding, Opacity, Severity, Thresholds
from models.predict import Predictor

__all__ = ["ExtentScore", "Finding", "Opacity", "Predictor", "Severity", "Thresholds"]
