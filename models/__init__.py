"""cxrnode's ML side: the opacity detector, the lung-field segmenter, severity, data, training and evaluation.

The node uses only what is exported here.
"""

from models.finding import ExtentScore, Finding, Opacity, Severity, Thresholds

__all__ = ["ExtentScore", "Finding", "Opacity", "Severity", "Thresholds"]
