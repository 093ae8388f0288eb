"""Deterministic UIDs for the objects cxrnode writes.

Reprocessing an image, or re-sending its results, must never create a second object at the PACS: every UID a writer
assigns is a function of what it describes (source image, model version, object kind), never of the clock or a random
number.

The UIDs are UUID-derived UIDs under the root "2.25" (DICOM PS3.5 Annex B.2, ISO/IEC 9834-8): "2.25." followed by
the decimal value of a name-based UUID (RFC 4122 version 5, SHA-1) of the inputs. No organisational root is needed,
and the result is at most 44 characters long (the limit of a UI value is 64).

`pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)` is not used: with ``prefix=None`` pydicom ignores
``entropy_srcs`` and returns a random UUID.
"""

from __future__ import annotations

import json
import uuid

from pydicom.uid import UID

# The namespace of every name-based UUID below. Changing it changes every UID cxrnode has ever written.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cxrnode:dicom-uid")


def _require(name: str, value: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f'Argument "{name}" must be a str, not {type(value).__name__}.')
    if value.strip() == "":
        raise ValueError(f'Argument "{name}" may not be empty.')


def _uuid_derived_uid(*fields: str) -> UID:
    """A "2.25." UID from the name-based UUID of `fields` (JSON-encoded, so ("ab", "c") and ("a", "bc") differ)."""
    name = json.dumps(list(fields), ensure_ascii=False, separators=(",", ":"))
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, name).int}")


def result_uid(source_sop_instance_uid: str, model_version: str, kind: str) -> UID:
    """SOP Instance UID (or any other instance-level UID) of the `kind` result of one source image.

    `kind` names the object or item, e.g. "seg", "sr", "gsps", "sc"; writers also use it for UIDs inside an object
    ("seg/dimension-organization").
    """
    _require("source_sop_instance_uid", source_sop_instance_uid)
    _require("model_version", model_version)
    _require("kind", kind)
    return _uuid_derived_uid("instance", source_sop_instance_uid.strip(), model_version, kind)


def result_series_uid(study_instance_uid: str, model_version: str, kind: str) -> UID:
    """Series Instance UID of a study's `kind` results: one series per study, model version and object kind."""
    _require("study_instance_uid", study_instance_uid)
    _require("model_version", model_version)
    _require("kind", kind)
    return _uuid_derived_uid("series", study_instance_uid.strip(), model_version, kind)


def tracking_uid(source_sop_instance_uid: str, model_version: str, tracking_identifier: str) -> UID:
    """Tracking Unique Identifier (DCM 112040) of one region or segment found in one source image."""
    _require("source_sop_instance_uid", source_sop_instance_uid)
    _require("model_version", model_version)
    _require("tracking_identifier", tracking_identifier)
    return _uuid_derived_uid("tracking", source_sop_instance_uid.strip(), model_version, tracking_identifier)


def device_observer_uid(model_version: str) -> UID:
    """Device Observer UID (DCM 121012) of cxrnode running the model `model_version`."""
    _require("model_version", model_version)
    return _uuid_derived_uid("device", model_version)
