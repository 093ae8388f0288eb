"""Turn one Finding into the result objects the configuration asks for, and store them durably.

    data_dir/results/<Study Instance UID>/<kind>-<SOP Instance UID>.dcm

UIDs are deterministic (node.writers.uids), so writing the same job twice — after a crash, or a resend — produces
the same objects under the same names.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from io import BytesIO

from pydicom import Dataset, dcmwrite

from models import Finding
from node.faults import crash_point
from node.queue import ResultObject
from node.spool import Spool
from node.writers.seg import segmentation
from node.writers.sr import measurement_report


def encode(ds: Dataset) -> bytes:
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def build_results(
    source: Dataset, finding: Finding, objects: Sequence[str], content_datetime: datetime.datetime
) -> list[tuple[str, Dataset]]:
    """(kind, dataset) for each configured object, SEG first so that the SR can reference it."""
    built: list[tuple[str, Dataset]] = []
    seg = None
    if "SEG" in objects:
        seg = segmentation(source, finding, content_datetime=content_datetime)
        built.append(("SEG", seg))
    if "SR" in objects:
        built.append(("SR", measurement_report(source, finding, seg, content_datetime=content_datetime)))
    return built


def write_results(
    source: Dataset, finding: Finding, objects: Sequence[str], spool: Spool, content_datetime: datetime.datetime
) -> list[ResultObject]:
    results = []
    for kind, ds in build_results(source, finding, objects, content_datetime):
        path = spool.result_path(str(source.StudyInstanceUID), kind, str(ds.SOPInstanceUID))
        spool.store_result(path, encode(ds))
        crash_point("writing")
        results.append(ResultObject(kind, str(ds.SOPClassUID), str(ds.SOPInstanceUID), spool.relative(path)))
    return results
