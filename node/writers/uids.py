"""Content-true, deterministic UIDs for the objects cxrnode writes.

Two promises, both needed at a PACS that keeps the first object it receives under a SOP Instance UID:

- **Same input, same UIDs.** Re-analysing an image, or re-sending its results, must never create a second object:
  every UID is a function of what the object says, never of the clock or a random number.
- **Other content, other UIDs.** Two different images that carry one SOP Instance UID (anonymisers and broken
  modalities make them), a corrected header, or the same image analysed with other weights, thresholds or options
  must not produce different objects under one UID.

So every result UID derives from a `ResultKey`:

============================ ========================================================================================
source SOP Instance UID      which image the result is about
source digest                SHA-256 of the source data set as received: every data element outside the File Meta
                             Information, Pixel Data included (its bytes as stored, not decoded). Anything in the
                             header that the results copy or depend on (patient and study identity, Patient
                             Orientation, pixel spacing, VOI) is covered, and so is every pixel.
model version                the weights (`Finding.model_version`: name and checksum prefix)
settings                     the thresholds that made the Finding (`Finding.thresholds`), the cxrnode version (it
                             decides how the objects are encoded), and every output option that changes an object
                             (the SR's orientation note, whether the SR references a SEG, the SEG's UID)
============================ ========================================================================================

The clock is not part of the key: a job's Content Date/Time is the time the image was received, so the same file
received twice gives objects that differ only there, under the same UIDs, as a re-send must.

Series UIDs leave the source out: all results of one kind for one study, made with one model version and the same
settings, form one series. Tracking UIDs (one per segment or opacity) derive from the full key.

The UIDs are UUID-derived UIDs under the root "2.25" (DICOM PS3.5 Annex B.2, ISO/IEC 9834-8): "2.25." followed by
the decimal value of a name-based UUID (RFC 4122 version 5, SHA-1) of the inputs. No organisational root is needed,
and the result is at most 44 characters long (the limit of a UI value is 64).

`pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)` is not used: with ``prefix=None`` pydicom ignores
``entropy_srcs`` and returns a random UUID.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

from models.finding import Finding

# The namespace of every name-based UUID below. Changing it changes every UID cxrnode has ever written.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cxrnode:dicom-uid")

_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _require(name: str, value: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f'Argument "{name}" must be a str, not {type(value).__name__}.')
    if value.strip() == "":
        raise ValueError(f'Argument "{name}" may not be empty.')


def _uuid_derived_uid(*fields: str) -> UID:
    """A "2.25." UID from the name-based UUID of `fields` (JSON-encoded, so ("ab", "c") and ("a", "bc") differ)."""
    name = json.dumps(list(fields), ensure_ascii=False, separators=(",", ":"))
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, name).int}")


def source_digest(source: Dataset) -> str:
    """SHA-256 (hex) of `source` as received: its data elements in Explicit VR Little Endian, Pixel Data last, as
    its stored bytes (compressed pixel data is hashed compressed, never decoded).

    Raises ValueError when `source` has no pixel data: a result's UIDs must change when its pixels do, so an image
    read without them (``stop_before_pixels``) cannot be given any.
    """
    pixels = [keyword for keyword in _PIXEL_DATA_KEYWORDS if keyword in source]
    if not pixels:
        raise ValueError(
            f"Source {source.get('SOPInstanceUID', '(no SOP Instance UID)')} has no Pixel Data; result UIDs are "
            "derived from a digest of it (read the file with its pixel data)."
        )
    digest = hashlib.sha256(_header_bytes(source))
    for keyword in pixels:
        value = source[keyword].value
        digest.update(keyword.encode())
        digest.update(value if isinstance(value, bytes) else bytes(value))
    return digest.hexdigest()


def _header_bytes(source: Dataset) -> bytes:
    """`source`'s data elements but pixel data, encoded in Explicit VR Little Endian; an element pydicom cannot
    encode (a value invalid for its VR in a hostile file) is taken as its tag, VR and value's repr instead."""
    buffer = DicomFileLike(BytesIO())
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    for element in source:
        if element.keyword in _PIXEL_DATA_KEYWORDS:
            continue
        single = Dataset()
        single.add(element)
        try:
            write_dataset(buffer, single)
        except Exception:  # pydicom raises many kinds for values it cannot encode
            buffer.write(f"{element.tag}{element.VR}{element.value!r}".encode("utf-8", "replace"))
    return bytes(buffer.parent.getvalue())  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ResultKey:
    """Everything the results of one image depend on (see the module docstring); its UIDs derive from it."""

    source_sop_instance_uid: str
    source_digest: str
    study_instance_uid: str
    model_version: str
    settings: str
    """Canonical JSON of the thresholds, the cxrnode version and the output options."""

    def __post_init__(self) -> None:
        for name in ("source_sop_instance_uid", "source_digest", "study_instance_uid", "model_version", "settings"):
            _require(name, getattr(self, name))

    def _instance_fields(self) -> tuple[str, ...]:
        return (
            self.source_sop_instance_uid.strip(),
            self.source_digest,
            self.model_version,
            self.settings,
        )

    def instance_uid(self, kind: str, *options: str) -> UID:
        """SOP Instance UID (or another instance-level UID) of the `kind` result ("seg", "sr", "gsps", "sc", or an
        item inside one such as "seg/dimension-organization"); `options` are what else changes that one object
        (e.g. the SR: the UID of the SEG it references)."""
        _require("kind", kind)
        return _uuid_derived_uid("instance", *self._instance_fields(), kind, *options)

    def series_uid(self, kind: str) -> UID:
        """Series Instance UID of the study's `kind` results made with this model version and these settings."""
        _require("kind", kind)
        return _uuid_derived_uid("series", self.study_instance_uid.strip(), self.model_version, self.settings, kind)

    def tracking_uid(self, tracking_identifier: str) -> UID:
        """Tracking Unique Identifier (DCM 112040) of one region or segment found in this image."""
        _require("tracking_identifier", tracking_identifier)
        return _uuid_derived_uid("tracking", *self._instance_fields(), tracking_identifier)


def result_key(
    source: Dataset, finding: Finding, software_version: str, options: Mapping[str, object] | None = None
) -> ResultKey:
    """The `ResultKey` of `finding` on `source`, written by cxrnode `software_version` with output `options`
    (JSON-serialisable values; keys sorted, so their order does not matter)."""
    _require("model_version", finding.model_version)
    _require("software_version", software_version)
    thresholds = finding.thresholds
    settings = json.dumps(
        {
            "thresholds": {"score": thresholds.score, "mask": thresholds.mask, "present": thresholds.present}
            | ({} if thresholds.severity_mask is None else {"severity_mask": thresholds.severity_mask}),
            "software_version": software_version,
            "options": dict(options or {}),
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return ResultKey(
        source_sop_instance_uid=str(source.get("SOPInstanceUID", "")),
        source_digest=source_digest(source),
        study_instance_uid=str(source.get("StudyInstanceUID", "")),
        model_version=finding.model_version,
        settings=settings,
    )


def device_observer_uid(model_version: str) -> UID:
    """Device Observer UID (DCM 121012) of cxrnode running the model `model_version`."""
    _require("model_version", model_version)
    return _uuid_derived_uid("device", model_version)


def device_serial_number(software_version: str, model_version: str) -> str:
    """Device Serial Number of the equipment that made a result: cxrnode is software, and the unit of software
    equipment is a build — this cxrnode version running these weights. 16 hexadecimal digits of SHA-256 of the two,
    the same on every host (a host-derived value would change with every container and break "same input, same
    objects")."""
    _require("software_version", software_version)
    _require("model_version", model_version)
    name = json.dumps([software_version, model_version], separators=(",", ":"))
    return hashlib.sha256(name.encode()).hexdigest()[:16].upper()
