"""Every SR cxrnode writes passes independent validators, and its SEG and GSPS do too.

- PixelMed `DicomSRValidator` (David Clunie's TID checker; Debian pixelmed-apps): 0 errors, 0 warnings.
- DCMTK: `dsrdump` reads it without a complaint; `dsr2xml +Xs` turns it into XML that DCMTK's own schema
  (dsr2xml.xsd) accepts (`xml2dsr +Vs` validates against it).
- dicom3tools `dciodvfy`: no errors.
- highdicom reads the numbers back (`result_checks.check_report`).
- PixelMed `DicomInstanceValidator` on the SEG: no errors but the three docs/conformance.md explains (it knows
  neither the GSPS nor the Enhanced SR SOP Class; dciodvfy checks those, DicomSRValidator the SR's IOD too).

Cases: a positive image (three boxes, pixel spacing), a negative one (no box: the empty opacity segment has its SR
group), one without pixel spacing (no areas), and SRs alone (no SEG: the image-level numbers in a TID 1410 group on
the whole image) with two boxes and the orientation note, with one box, and with none. One box alone is the case
PixelMed's template choice used to trip on (a TID 1501 group beside exactly one Image Region): the test also shows
that the old layout still gets its two errors, so the validator does look at those groups.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_validation import assert_valid_dicom
from models.finding import Finding
from node.outputs import build_results, encode
from node.writers.sr import IMAGE_TRACKING_IDENTIFIER
from result_checks import check_report
from test_writers import ALLOWED_WARNINGS, CR, DX_PRESENTATION, make_finding, make_source

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
DSR2XML_XSD = next(iter(sorted(Path("/usr/share").glob("dcmtk*/dsr2xml.xsd"))), None)
# The JDK's XPath limits are lower than PixelMed's compiled templates need.
JAVA_OPTIONS = "-Djdk.xml.xpathExprOpLimit=0 -Djdk.xml.xpathExprGrpLimit=0 -Djdk.xml.xpathTotalOpLimit=0"
NOTE = "No usable Patient Orientation: the standard display (patient's right on the image's left, head up) assumed."

# PixelMed's IOD validator on the SEG: three findings that are not faults of the object (docs/conformance.md 7.1).
PIXELMED_SEG_EXPLAINED = (
    "DerivationImageMacro/DerivationImageSequence/: SharedFunctionalGroupsSequence",
    "GeneralImageModule/PatientOrientation/: PatientOrientation: Incorrect value multiplicity - got 2",
    "GeneralSeriesModule/Laterality/: : Missing conditional attribute",
)


def tools_missing() -> list[str]:
    missing = [tool for tool in ("java", "dsrdump", "dsr2xml", "xml2dsr", "dciodvfy") if shutil.which(tool) is None]
    if not PIXELMED_JAR.is_file():
        missing.append(str(PIXELMED_JAR))
    if DSR2XML_XSD is None:
        missing.append("dsr2xml.xsd")
    return missing


pytestmark = pytest.mark.skipif(bool(tools_missing()), reason=f"not installed: {', '.join(tools_missing())}")


@dataclass(frozen=True)
class Case:
    name: str
    source: Dataset
    n_opacities: int
    spacing: tuple[float, float] | None
    objects: tuple[str, ...] = ("SEG", "SR", "GSPS")
    orientation_note: str | None = None


CASES = [
    Case("positive", make_source(DX_PRESENTATION, number=31), 3, (0.2 / 1.25, 0.25 / 1.25)),
    Case("negative", make_source(CR, number=32), 0, (0.5, 0.4)),
    Case("no-pixel-spacing", make_source(CR, spacing=False, number=33), 1, None),
    Case("sr-alone-with-note", make_source(CR, number=34), 2, (0.5, 0.4), ("SR",), NOTE),
    Case("sr-alone-one-box", make_source(CR, number=35), 1, (0.5, 0.4), ("SR",)),
    Case("sr-alone-no-box", make_source(DX_PRESENTATION, number=36), 0, (0.2 / 1.25, 0.25 / 1.25), ("SR",)),
]


@dataclass(frozen=True)
class Written:
    case: Case
    finding: Finding
    paths: dict[str, Path]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> list[Written]:
    directory = tmp_path_factory.mktemp("sr-conformance")
    results = []
    for case in CASES:
        finding = make_finding((int(case.source.Rows), int(case.source.Columns)), case.n_opacities)
        paths = {}
        built = build_results(
            case.source,
            finding,
            case.objects,
            datetime.datetime(2024, 5, 6, 7, 8, 9),
            orientation_note=case.orientation_note,
        )
        for kind, ds in built:
            paths[kind] = directory / f"{case.name}-{kind}.dcm"
            paths[kind].write_bytes(encode(ds))
        results.append(Written(case, finding, paths))
    return results


def pixelmed(validator: str, paths: list[Path]) -> dict[Path, tuple[list[str], list[str]]]:
    """(errors, warnings) of PixelMed's `validator` for each file; the JVMs run side by side (each takes seconds)."""
    environment = {**os.environ, "JAVA_TOOL_OPTIONS": JAVA_OPTIONS}
    command = ["java", "-cp", str(PIXELMED_JAR), f"com.pixelmed.validate.{validator}"]
    running = {
        path: subprocess.Popen(
            [*command, str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
        )
        for path in paths
    }
    reports = {}
    for path, process in running.items():
        output, _ = process.communicate(timeout=600)
        assert "validation complete" in output.lower(), f"PixelMed did not finish on {path.name}:\n{output[-2000:]}"
        lines = output.splitlines()
        reports[path] = (
            [line for line in lines if line.startswith("Error")],
            [line for line in lines if line.startswith("Warning")],
        )
    return reports


def content_items(dataset: Dataset) -> list[Dataset]:
    """Every content item of an SR's tree, depth first."""
    items = []
    for item in dataset.get("ContentSequence", []):
        items.append(item)
        items.extend(content_items(item))
    return items


# What PixelMed 20220618 says when the image-level numbers are a TID 1501 group (no region) beside exactly one Image
# Region SCOORD: it then checks every group as TID 1410 and misses the region (docs/conformance.md 7.2).
PIXELMED_TID_1501_BESIDE_ONE_BOX = (
    'Template 1410 PlanarROIMeasurements/[Row 1] CONTAINER (125007,DCM,"Measurement Group")/[Row 5] SCOORD',
    'Template 1410 PlanarROIMeasurements/[Row 1] CONTAINER (125007,DCM,"Measurement Group")/[Row 7] IMAGE',
)


def without_whole_image_region(sr: Path, path: Path) -> Path:
    """`sr` with the Image Region of its whole-image group removed: that group becomes the TID 1501 group the SR
    alone used to carry (tracking identifier, finding, finding site, measurements)."""
    ds = pydicom.dcmread(sr)
    (measurements,) = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    (group,) = [
        g
        for g in measurements.ContentSequence
        if g.ValueType == "CONTAINER"
        and any(i.get("TextValue") == IMAGE_TRACKING_IDENTIFIER for i in g.ContentSequence)
    ]
    group.ContentSequence = [i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue != "111030"]
    ds.save_as(path, enforce_file_format=True)
    return path


def test_pixelmed_sr_validator_finds_nothing(written: list[Written], tmp_path: Path) -> None:
    (one_box,) = [w.paths["SR"] for w in written if w.case.name == "sr-alone-one-box"]
    old_layout = without_whole_image_region(one_box, tmp_path / "sr-alone-one-box-tid-1501-SR.dcm")
    reports = pixelmed("DicomSRValidator", [w.paths["SR"] for w in written] + [old_layout])
    errors, warnings = reports.pop(old_layout)
    assert len(errors) == 2 and warnings == [], "\n".join(errors + warnings)
    for expected in PIXELMED_TID_1501_BESIDE_ONE_BOX:
        assert any(expected in error and "Missing conditional content item" in error for error in errors), errors
    for path, (errors, warnings) in reports.items():
        assert errors == [] and warnings == [], f"{path.name}:\n" + "\n".join(errors + warnings)


def test_pixelmed_iod_validator_on_the_seg(written: list[Written]) -> None:
    """(PixelMed 20220618's DicomInstanceValidator knows neither the GSPS nor the Enhanced SR SOP Class: the SR's IOD
    is checked by DicomSRValidator above, the GSPS by dciodvfy.)"""
    paths = [w.paths["SEG"] for w in written if w.case.name in ("positive", "negative")]
    for path, (errors, _) in pixelmed("DicomInstanceValidator", paths).items():
        unexplained = [e for e in errors if not any(text in e for text in PIXELMED_SEG_EXPLAINED)]
        assert unexplained == [], f"{path.name}:\n" + "\n".join(unexplained)
        assert len(errors) <= len(PIXELMED_SEG_EXPLAINED), f"{path.name}:\n" + "\n".join(errors)


def test_dcmtk_reads_the_sr_and_its_xml_fits_dcmtk_s_schema(written: list[Written], tmp_path: Path) -> None:
    assert DSR2XML_XSD is not None
    shutil.copy(DSR2XML_XSD, tmp_path / "dsr2xml.xsd")  # +Xs references the schema beside the XML
    for w in written:
        sr = w.paths["SR"]
        dump = subprocess.run(["dsrdump", "-Ee", "-Ec", str(sr)], capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0 and dump.stderr == "", f"{sr.name}: {dump.stderr}"
        assert "Imaging Measurement Report" in dump.stdout
        if w.case.orientation_note:
            assert 'TEXT:(,,"Comment")="No usable Patient' in dump.stdout  # dsrdump shortens long texts, dump.stdout
        xml = tmp_path / f"{w.case.name}.xml"
        converted = subprocess.run(
            ["dsr2xml", "+Xs", "+Xn", str(sr), str(xml)], capture_output=True, text=True, timeout=60
        )
        assert converted.returncode == 0 and converted.stderr == "", f"{sr.name}: {converted.stderr}"
        back = subprocess.run(
            ["xml2dsr", "+Vs", "+Vn", xml.name, f"{w.case.name}.back.dcm"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,  # libxml2 finds the schema the XML names relative to the working directory
        )
        assert back.returncode == 0 and back.stderr == "", f"{xml.name} does not fit dsr2xml.xsd: {back.stderr}"


def test_schema_validation_can_fail(written: list[Written], tmp_path: Path) -> None:
    """xml2dsr +Vs does check: an XML with a renamed element is refused."""
    assert DSR2XML_XSD is not None
    shutil.copy(DSR2XML_XSD, tmp_path / "dsr2xml.xsd")
    xml = tmp_path / "report.xml"
    subprocess.run(["dsr2xml", "+Xs", "+Xn", str(written[0].paths["SR"]), str(xml)], check=True, timeout=60)
    xml.write_text(xml.read_text().replace("<value>", "<valeur>", 1).replace("</value>", "</valeur>", 1))
    back = subprocess.run(
        ["xml2dsr", "+Vs", "+Vn", xml.name, "back.dcm"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert back.returncode != 0 and "does not validate" in back.stderr, back.stderr


def test_dciodvfy_and_highdicom_read_back(written: list[Written]) -> None:
    for w in written:
        for path in w.paths.values():
            assert_valid_dicom(path, allowed_warnings=ALLOWED_WARNINGS)
        seg = hd.seg.segread(w.paths["SEG"]) if "SEG" in w.paths else None
        sr = hd.sr.srread(w.paths["SR"])
        check_report(w.case.source, w.finding, seg, sr, w.case.spacing, w.finding.model_version)


def test_numbers_are_rounded_to_the_stated_precision(written: list[Written]) -> None:
    for w in written:
        values = [
            str(item.MeasuredValueSequence[0].NumericValue)
            for item in content_items(pydicom.dcmread(w.paths["SR"]))
            if "MeasuredValueSequence" in item
        ]
        assert values, w.case.name
        for value in values:
            assert re.fullmatch(r"-?\d+(\.\d{1,2})?", value), f"{w.case.name}: {value} has more than 2 decimals"


def test_the_ai_result_carries_what_ihe_air_asks(written: list[Written]) -> None:
    """Algorithm identification, tracking identifiers, and the source's patient and study identity copied exactly."""
    for w in written:
        source = w.case.source
        for kind, path in w.paths.items():
            ds = pydicom.dcmread(path)
            for keyword in (
                "PatientName",
                "PatientID",
                "PatientBirthDate",
                "PatientSex",
                "StudyInstanceUID",
                "StudyDate",
                "StudyTime",
                "StudyID",
                "AccessionNumber",
                "ReferringPhysicianName",
            ):
                assert ds.get(keyword) == source.get(keyword), (w.case.name, kind, keyword)
            assert ds.Manufacturer == "cxrnode" and ds.SoftwareVersions, (w.case.name, kind)
        sr = pydicom.dcmread(w.paths["SR"])
        names = {
            item.ConceptNameCodeSequence[0].CodeMeaning: item
            for item in content_items(sr)
            if item.get("ValueType") == "TEXT"
        }
        assert names["Algorithm Name"].TextValue == "cxrnode"
        assert names["Algorithm Version"].TextValue == w.finding.model_version
        if "SEG" in w.paths:
            seg = pydicom.dcmread(w.paths["SEG"])
            for segment in seg.SegmentSequence:
                algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
                assert algorithm.AlgorithmName == "cxrnode" and segment.TrackingUID
                assert algorithm.AlgorithmVersion == w.finding.model_version
