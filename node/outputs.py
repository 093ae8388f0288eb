"""Turn one Finding into the result objects the configuration asks for, and keep them durably in the store under

    results/<Study Instance UID>/<kind>-<SOP Instance UID>.dcm   (node.store.result_key; with the file store in
                                                                  the data dir, that file in it)

UIDs are content-true and deterministic (node.writers.uids): writing the same job twice — after a crash, or a
resend — produces the same objects under the same names, and another image under the same SOP Instance UID, or other
thresholds or options, produces objects under other UIDs.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from io import BytesIO

import numpy as np
from pydicom import Dataset, dcmwrite

from models import Finding
from node.faults import crash_point
from node.queue import ResultObject
from node.store import Store, result_key
from node.writers import cxrnode_version, uids
from node.writers.gsps import presentation_state
from node.writers.sc import burned_in_capture
from node.writers.seg import segmentation
from node.writers.sr import measurement_report

KINDS = ("SEG", "SR", "GSPS", "SC")


def finding_summary(finding: Finding) -> dict[str, object]:
    """What the models found, small enough to keep with the job (status page, `cxrnode jobs`)."""
    return {
        "opacity_present": bool(finding.opacity_present),
        "opacity_probability": round(float(finding.opacity_probability), 4),
        "boxes": len(finding.opacities),
        "severity_percent": {
            "right": round(float(finding.severity.right), 1),
            "left": round(float(finding.severity.left), 1),
            "total": round(float(finding.severity.total), 1),
        },
        "extent_score": {
            "right": int(finding.extent.right),
            "left": int(finding.extent.left),
            "total": int(finding.extent.total),
        },
    }


def encode(ds: Dataset) -> bytes:
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def build_results(
    source: Dataset,
    finding: Finding,
    objects: Sequence[str],
    content_datetime: datetime.datetime,
    pixels: np.ndarray | None = None,
    orientation_note: str | None = None,
) -> list[tuple[str, Dataset]]:
    """(kind, dataset) for each requested object, SEG first so that the SR can reference it. The burned-in SC needs
    the source's presentation `pixels` (on the stored grid, as `finding` is). `orientation_note` (from
    `node.orientation.Orientation.note`), when the image had no usable Patient Orientation and the standard display
    was assumed, is said in the SR.

    One `node.writers.uids.ResultKey` (a digest of `source`, pixel data included) is computed for all objects, so
    `source` must be read with its pixel data."""
    unknown = set(objects) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown result object(s) {sorted(unknown)}; choose from {', '.join(KINDS)}")
    key = uids.result_key(source, finding, cxrnode_version())
    built: list[tuple[str, Dataset]] = []
    seg = None
    if "SEG" in objects:
        seg = segmentation(source, finding, content_datetime=content_datetime, key=key)
        built.append(("SEG", seg))
    if "SR" in objects:
        report = measurement_report(
            source, finding, seg, content_datetime=content_datetime, orientation_note=orientation_note, key=key
        )
        built.append(("SR", report))
    if "GSPS" in objects:
        built.append(("GSPS", presentation_state(source, finding, content_datetime=content_datetime, key=key)))
    if "SC" in objects:
        if pixels is None:
            raise ValueError("the burned-in SC needs the image's pixels")
        built.append(("SC", burned_in_capture(source, pixels, finding, content_datetime=content_datetime, key=key)))
    return built


def write_results(
    source: Dataset,
    finding: Finding,
    objects: Sequence[str],
    store: Store,
    content_datetime: datetime.datetime,
    pixels: np.ndarray | None = None,
    orientation_note: str | None = None,
) -> list[ResultObject]:
    """Build the results (`build_results`) and keep each durably in the store, in order."""
    results = []
    for kind, ds in build_results(source, finding, objects, content_datetime, pixels, orientation_note):
        key = result_key(str(source.StudyInstanceUID), kind, str(ds.SOPInstanceUID))
        store.put(key, encode(ds))
        crash_point("writing")
        results.append(ResultObject(kind, str(ds.SOPClassUID), str(ds.SOPInstanceUID), key))
    return results
