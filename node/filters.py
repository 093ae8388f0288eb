"""Acceptance filters: is a received object a frontal chest radiograph this node should analyse?

An object outside the filters is still acknowledged (a PACS auto-routing rule may send us anything) and recorded as
`skipped` with the reason this function gives.
"""

from __future__ import annotations

from pydicom import Dataset
from pydicom.uid import UID

from node.config import Filters


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value).strip().upper() if value is not None else ""


def reason_to_skip(ds: Dataset, sop_class_uid: str, filters: Filters) -> str | None:
    """None when the object is in scope, else a short reason naming the attribute and its value."""
    if sop_class_uid not in filters.sop_classes:
        return f"SOP Class {UID(sop_class_uid).name} is not analysed"
    modality = _text(ds, "Modality")
    if modality not in {m.upper() for m in filters.modalities}:
        return f"Modality {modality or '(empty)'} is not one of {', '.join(filters.modalities)}"
    body_part = _text(ds, "BodyPartExamined")
    if body_part not in {b.upper() for b in filters.body_parts}:
        return f"Body Part Examined {body_part or '(empty)'} is not one of {', '.join(b or '(empty)' for b in filters.body_parts)}"
    view = _text(ds, "ViewPosition")
    if view not in {v.upper() for v in filters.view_positions}:
        return f"View Position {view or '(empty)'} is not a frontal view ({', '.join(v or '(empty)' for v in filters.view_positions)})"
    if (
        _text(ds, "PresentationIntentType") == "FOR PROCESSING"
        and "DX" in modality
        and not any(uid.endswith(".1.1.1.1.1") for uid in filters.sop_classes)
    ):
        return "DX For Processing images are not analysed"
    return None
