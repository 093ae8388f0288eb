"""DIMSE status codes the node sends and understands, by name (PS3.4 Annex B for the Storage Service Class)."""

from __future__ import annotations

from pydicom import Dataset

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
"""Refused: Out of Resources — the object could not be stored durably (disk full, database unwritable)."""
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
"""Error: Data Set Does Not Match SOP Class — e.g. a STOW-RS instance of another study than the URL names."""
CANNOT_UNDERSTAND = 0xC000
"""Error: Cannot Understand — the data set cannot be parsed."""
COERCION_OF_DATA_ELEMENTS = 0xB000
ELEMENT_DISCARDED = 0xB006
DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007

DELIVERED = frozenset(
    {SUCCESS, COERCION_OF_DATA_ELEMENTS, ELEMENT_DISCARDED, DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING}
)
"""Statuses from a destination that mean it has the object: Success and the three storage warnings."""


def status_dataset(status: int, comment: str) -> Dataset:
    """A status with an Error Comment (LO, at most 64 characters) that says what went wrong."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment.replace("\\", "/")[:64]
    return ds
