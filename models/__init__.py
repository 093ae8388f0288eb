"""cxrnode's ML side: the opacity detector, the lung-field segmenter, severity, data, training and evaluation.

The node uses `Predictor` and `Finding` (and `models.data.dicom` to prepare pixels the same way training does).
`Predictor` is imported on first use (PEP 562), so that importing `models` for `Finding` or an error class does not
load torch: the node's receiving process never needs it.
"""

from typing import TYPE_CHECKING, Any

from models.finding import ExtentScore, Finding, Opacity, Severity, Thresholds

if TYPE_CHECKING:
    from models.predict import Predictor

__all__ = ["ExtentScore", "Finding", "Opacity", "Predictor", "Severity", "Thresholds"]


def __getattr__(name: str) -> Any:
    if name == "Predictor":
        from models.predict import Predictor

        return Predictor
    raise AttributeError(f"module 'models' has no attribute {name!r}")
