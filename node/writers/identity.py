"""The identity every result object shares: who made it, when, and which UIDs and numbers it carries.

Every writer (SEG, SR, GSPS, SC) starts the same way: `checked_header` turns the received dataset into the header
highdicom is given and checks the finding against it; after its own checks the writer calls `result_identity` with
its call's options (`ResultNames` and the writer's own), which settles, once and for all four kinds,

- Content Date/Time (`content_datetime`, default now) and the model and software versions;
- the SOP Instance UID `key.instance_uid(kind, options)` and the Series Instance UID `key.series_uid(kind)` (see
  `node.writers.uids`: the same input and options always give the same UIDs);
- Series Number, Instance Number (default: the source's, else 1), Series Description (default: the writer's);
- Manufacturer, Manufacturer's Model Name (the algorithm's name), Software Versions and Device Serial Number
  (default: `uids.device_serial_number` of the cxrnode build and model version).

`ResultIdentity.highdicom_arguments` gives them as the keyword arguments highdicom's constructors share.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID

from models.finding import Finding, Thresholds
from node.writers import (
    check_finding,
    cxrnode_version,
    options_token,
    result_key,
    source_header,
    source_instance_number,
    uids,
)


@dataclass(frozen=True)
class ResultIdentity:
    """Who made one result object, when, and the UIDs and numbers it carries (see the module docstring)."""

    key: uids.ResultKey
    content_datetime: datetime.datetime
    model_version: str
    software_version: str
    sop_instance_uid: UID
    series_instance_uid: UID
    series_number: int
    instance_number: int
    series_description: str
    manufacturer: str
    algorithm_name: str
    device_serial_number: str

    def highdicom_arguments(self) -> dict[str, object]:
        """The identity as keyword arguments of highdicom's SEG, SR, GSPS and SC constructors (all take these)."""
        return {
            "series_instance_uid": self.series_instance_uid,
            "series_number": self.series_number,
            "sop_instance_uid": self.sop_instance_uid,
            "instance_number": self.instance_number,
            "manufacturer": self.manufacturer,
            "manufacturer_model_name": self.algorithm_name,
            "software_versions": self.software_version,
            "series_description": self.series_description,
        }

    def content_date_and_time(self) -> dict[str, object]:
        """Content Date and Content Time as keyword arguments (SEG, SR and SC; a GSPS has Presentation Creation)."""
        return {"content_date": self.content_datetime.date(), "content_time": self.content_datetime.time()}


def checked_header(source: Dataset, finding: Finding) -> Dataset:
    """`node.writers.source_header` of `source`, once `finding` is checked to fit it (`node.writers.check_finding`)."""
    header = source_header(source)
    check_finding(header, finding)
    return header


@dataclass(frozen=True)
class ResultNames:
    """What a writer call names its object (its keyword arguments of the same names); `default_series_description`
    follows the algorithm's name when the call gives no Series Description (e.g. "lung opacity SEG")."""

    algorithm_name: str
    manufacturer: str
    series_number: int
    instance_number: int | None
    series_description: str | None
    default_series_description: str


def result_identity(
    source: Dataset,
    header: Dataset,
    finding: Finding,
    kind: str,
    key: uids.ResultKey | None,
    software_version: str | None,
    content_datetime: datetime.datetime | None,
    names: ResultNames,
    options: dict[str, object],
) -> ResultIdentity:
    """The identity of the `kind` object of `finding` on `source` (`header`: its `checked_header`).

    `key`, `software_version` and `content_datetime` are the writer call's (None for the defaults); `options` are
    the other options of the call that change its object. The SOP Instance UID covers `names` (as given: None for
    the defaults) and `options`; a Device Serial Number among the options replaces the default one.
    """
    if content_datetime is None:
        content_datetime = datetime.datetime.now()
    model_version = finding.model_version
    software_version = software_version or cxrnode_version()
    key = result_key(source, finding, key, software_version)
    token = options_token(
        algorithm_name=names.algorithm_name,
        manufacturer=names.manufacturer,
        series_number=names.series_number,
        instance_number=names.instance_number,
        series_description=names.series_description,
        **options,
    )
    device_serial_number = options.get("device_serial_number")
    return ResultIdentity(
        key=key,
        content_datetime=content_datetime,
        model_version=model_version,
        software_version=software_version,
        sop_instance_uid=key.instance_uid(kind, token),
        series_instance_uid=key.series_uid(kind),
        series_number=names.series_number,
        instance_number=names.instance_number if names.instance_number is not None else source_instance_number(header),
        series_description=names.series_description or f"{names.algorithm_name} {names.default_series_description}",
        manufacturer=names.manufacturer,
        algorithm_name=names.algorithm_name,
        device_serial_number=str(device_serial_number or uids.device_serial_number(software_version, model_version)),
    )


def threshold_parameters(thresholds: Thresholds) -> dict[str, str]:
    """The thresholds that made a Finding, as the algorithm parameters the SEG and the SR record (the severity mask
    threshold only when the weights or the configuration set one)."""
    parameters = {
        "score_threshold": f"{thresholds.score:g}",
        "mask_threshold": f"{thresholds.mask:g}",
        "present_threshold": f"{thresholds.present:g}",
    }
    if thresholds.severity_mask is not None:
        parameters["severity_mask_threshold"] = f"{thresholds.severity_mask:g}"
    return parameters
