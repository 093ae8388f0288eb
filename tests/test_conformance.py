"""docs/conformance.md lists exactly the SOP classes and transfer syntaxes the SCP accepts and the SCU proposes —
checked against real associations, not only against our own tables — and its AI Results (IHE AIR) table says only
what the objects the node writes carry."""

from __future__ import annotations

import datetime
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from conftest import REPO, free_port
from models.finding import Finding, Opacity, Thresholds
from models.severity import lung_involvement
from models.synth import make_dataset, make_radiograph
from node.audit import AuditLog
from node.config import Peer, load_settings
from node.outputs import KINDS, build_results, encode
from node.queue import connect
from node.scp import VERIFICATION_TRANSFER_SYNTAXES, Receiver, make_ae, start_server
from node.sender import store
from node.spool import Spool

DOC = (REPO / "docs" / "conformance.md").read_text()


def table(marker: str) -> set[str]:
    """The UIDs in the table between <!-- marker --> and <!-- end marker -->."""
    match = re.search(rf"<!-- {marker}[^>]*-->(.*?)<!-- end {marker} -->", DOC, re.S)
    assert match, f"docs/conformance.md has no {marker} table"
    return set(re.findall(r"`([0-9.]+)`", match.group(1)))


def test_scp_sop_classes_and_transfer_syntaxes_match_a_real_association(tmp_path: Path) -> None:
    settings = load_settings(
        None, environ={}, overrides={"node.port": free_port(), "node.data_dir": str(tmp_path), "node.min_free_mb": 0}
    )
    ae = make_ae(settings)
    documented = table("scp-sop-classes")
    syntaxes = table("scp-transfer-syntaxes")
    assert {c.abstract_syntax for c in ae.supported_contexts} == documented
    # Propose, for a sample of documented classes, every documented syntax plus one we do not support.
    spool = Spool(tmp_path)
    spool.prepare()
    receiver = Receiver(
        lambda: settings, spool, connect(f"sqlite://{tmp_path / 'q.sqlite'}"), threading.Event(), AuditLog(tmp_path)
    )
    server = start_server(ae, settings, receiver)
    try:
        sample = sorted(documented)[::12] + [
            "1.2.840.10008.5.1.4.1.1.1",
            "1.2.840.10008.5.1.4.1.1.1.1",
            str(Verification),
        ]
        undocumented_syntax = "1.2.840.10008.1.2.4.100"  # MPEG2: not supported
        accepted: dict[str, set[str]] = {}
        for sop_class in sample:
            for syntax in sorted(syntaxes) + [undocumented_syntax]:
                scu = AE(ae_title="PROBE")
                scu.add_requested_context(sop_class, syntax)
                assoc = scu.associate("127.0.0.1", settings.node.port, ae_title="CXRNODE")
                if assoc.is_established:
                    accepted.setdefault(sop_class, set()).update(
                        str(c.transfer_syntax[0]) for c in assoc.accepted_contexts
                    )
                    assoc.release()
        for sop_class in sample:
            expected = set(VERIFICATION_TRANSFER_SYNTAXES) if sop_class == str(Verification) else syntaxes
            assert accepted.get(sop_class) == expected, sop_class
        query = "1.2.840.10008.5.1.4.1.2.1.1"  # Patient Root Query/Retrieve FIND: not a class we support
        assert query not in documented
        scu = AE(ae_title="PROBE")
        scu.add_requested_context(query, ExplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", settings.node.port, ae_title="CXRNODE")
        assert not assoc.is_established or not assoc.accepted_contexts
        if assoc.is_established:
            assoc.release()
    finally:
        server.shutdown()


def _finding(shape: tuple[int, int]) -> Finding:
    right = np.zeros(shape, bool)
    left = np.zeros(shape, bool)
    right[40:200, 30:110] = True
    left[40:200, 150:230] = True
    mask = np.zeros(shape, bool)
    mask[60:120, 40:90] = True
    severity, extent = lung_involvement(mask, right, left)
    return Finding(
        shape,
        (Opacity((40.0, 60.0, 90.0, 120.0), 0.9, mask),),
        right,
        left,
        severity,
        extent,
        0.9,
        True,
        Thresholds(0.5, 0.5, 0.5),
        "test-model",
    )


def test_scu_proposes_exactly_the_documented_contexts(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    radiograph = make_radiograph(rng, 256, 256, positive=True)
    source = make_dataset(radiograph, patient_id="conformance", modality="DX", rng=rng)
    finding = _finding((256, 256))
    pixels = radiograph.pixels.astype(np.float32)
    paths = []
    for kind, ds in build_results(source, finding, KINDS, datetime.datetime(2025, 1, 1), pixels):
        path = tmp_path / f"{kind}.dcm"
        path.write_bytes(encode(ds))
        paths.append((path, str(ds.SOPClassUID)))
    proposed: list[tuple[str, list[str]]] = []

    def capture(event: evt.Event) -> None:
        for context in event.assoc.requestor.primitive.presentation_context_definition_list:
            proposed.append((str(context.abstract_syntax), [str(t) for t in context.transfer_syntax]))

    destination = AE(ae_title="PACS")
    for _, sop_class in paths:
        destination.add_supported_context(sop_class, ExplicitVRLittleEndian)
    port = free_port()
    server = destination.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_REQUESTED, capture), (evt.EVT_C_STORE, lambda e: 0)]
    )
    try:
        store(
            Peer(name="pacs", ae_title="PACS", host="127.0.0.1", port=port, may_send=False),
            [p for p, _ in paths],
            calling_ae="CXRNODE",
            timeout=10,
            sop_classes=[c for _, c in paths],
        )
    finally:
        server.shutdown()
    assert {sop for sop, _ in proposed} == table("scu-sop-classes")
    assert len(proposed) == len(table("scu-sop-classes"))  # one context per SOP class
    for _, syntaxes in proposed:
        assert set(syntaxes) == table("scu-transfer-syntaxes")


@pytest.mark.parametrize(
    "marker", ["scp-sop-classes", "scp-transfer-syntaxes", "scu-sop-classes", "scu-transfer-syntaxes"]
)
def test_tables_are_not_empty(marker: str) -> None:
    assert table(marker)


# --- AI Results (IHE AIR) ------------------------------------------------------------------------------------------

COPIED_EXACTLY = "copied exactly"


def air_rows() -> list[tuple[str, list[str], list[str]]]:
    """(what, object kinds, checks) per row of the air-items table."""
    match = re.search(r"<!-- air-items[^>]*-->(.*?)<!-- end air-items -->", DOC, re.S)
    assert match, "docs/conformance.md has no air-items table"
    rows = []
    for line in match.group(1).strip().splitlines()[2:]:  # after the header and the |---| line
        what, kinds, where = (cell.strip() for cell in line.strip().strip("|").split("|"))
        rows.append((what, [k.strip() for k in kinds.split(",")], re.findall(r"`([^`]+)`", where)))
    return rows


def content_concepts(dataset: Dataset) -> set[str]:
    """ "SCHEME VALUE" of every content item's concept name in an SR tree."""
    found = set()
    for item in dataset.get("ContentSequence", []):
        name = item.ConceptNameCodeSequence[0]
        found.add(f"{name.CodingSchemeDesignator} {name.CodeValue}")
        found |= content_concepts(item)
    return found


def values_at(dataset: Dataset, path: str) -> list[object]:
    """The non-empty values of the attribute at keyword path `A/B/C` (B in any item of A, ...)."""
    keyword, _, rest = path.partition("/")
    if keyword not in dataset:
        return []
    value = dataset[keyword].value
    if not rest:
        return [] if value in (None, "") or (hasattr(value, "__len__") and len(value) == 0) else [value]
    return [found for item in value for found in values_at(item, rest)]


@pytest.fixture(scope="module")
def air_objects() -> tuple[Dataset, dict[str, Dataset]]:
    rng = np.random.default_rng(5)
    radiograph = make_radiograph(rng, 256, 256, positive=True)
    source = make_dataset(radiograph, patient_id="air", modality="DX", rng=rng)
    # Every identity attribute non-empty, so that "copied exactly" is tested on real values.
    source.AccessionNumber = "ACC-AIR"
    source.ReferringPhysicianName = "Referrer^Ann"
    source.StudyID = "STUDY-7"
    source.PatientBirthDate = "19500101"
    source.PatientSex = "O"
    finding = _finding((256, 256))
    pixels = radiograph.pixels.astype(np.float32)
    built = build_results(source, finding, KINDS, datetime.datetime(2025, 1, 1), pixels, orientation_note="assumed")
    return source, dict(built)


def test_air_table_is_what_the_objects_carry(air_objects: tuple[Dataset, dict[str, Dataset]]) -> None:
    source, objects = air_objects
    rows = air_rows()
    assert {kind for _, kinds, _ in rows for kind in kinds} == set(KINDS)
    for what, kinds, checks in rows:
        assert checks, what
        for kind in kinds:
            ds = objects[kind]
            for check in checks:
                code = re.fullmatch(r"(DCM|SCT|UMLS) (\S+)", check)
                if code:
                    assert kind == "SR", f"{what}: {check} is an SR content item"
                    assert f"{code.group(1)} {code.group(2)}" in content_concepts(ds), f"{what}: {kind} lacks {check}"
                    continue
                assert values_at(ds, check), f"{what}: {kind} has no {check}"
                if COPIED_EXACTLY in what:
                    assert ds[check].value == source[check].value, f"{kind} {check} is not the source's"
                    assert source[check].value not in (None, ""), f"the test source needs a {check}"
    for kind, ds in objects.items():
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID, kind  # a series of its own


def test_air_identity_rows_cover_the_patient_and_study_modules(air_objects) -> None:
    """The identity rows name every Patient and General Study attribute the source has (all are copied)."""
    source, _ = air_objects
    documented = {check for what, _, checks in air_rows() if COPIED_EXACTLY in what for check in checks}
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "AccessionNumber",
    ):
        assert keyword in documented and keyword in source
