"""The coded concepts cxrnode's result objects use, each with its source.

Concepts come from DICOM PS3.16 (the DCM scheme, and SNOMED CT / UCUM concepts the standard's context groups list),
taken from pydicom's tables where pydicom has them. Where neither DICOM nor SNOMED CT has a concept, cxrnode uses
its own coding scheme (designator "99CXRNODE"; PS3.3 8.2: private designators begin with "99"), declared in the
Coding Scheme Identification Sequence of every object that uses it.
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

# --- What was found ------------------------------------------------------------------------------------------------

OPACITY = Code("112001", "DCM", "Opacity")
"""DCM 112001 "Opacity" (CID 6102 Chest Finding or Feature Modifier, CID 6104 Abnormal Opacity Finding or Feature;
terms after Fraser and Paré): an area that attenuates the X-ray beam more than its surroundings. Chosen because it is
exactly what the detector reports (the RSNA "Lung Opacity" class) without claiming a cause: SNOMED CT's nearest
concepts ("Consolidation of lung", "Pneumonia", "Infiltrate") are diagnoses the model does not make, and no DICOM
context group offers a pre-coordinated SNOMED CT "lung opacity". The lung as the site is said separately (LUNG)."""

MORPHOLOGICALLY_ABNORMAL_STRUCTURE = codes.SCT.MorphologicallyAbnormalStructure
"""SCT 49755003 (CID 7150 Segmentation Property Category): the category of an opacity."""

ANATOMICAL_STRUCTURE = codes.SCT.AnatomicalStructure
"""SCT 91723000 (CID 7150 Segmentation Property Category): the category of a lung."""

LUNG = codes.SCT.Lung
"""SCT 39607008 "Lung" (CID 7151, CID 7155 Thoracic Segmentation Type): anatomic region of the opacity; finding site
of lung-level measurements, with a laterality."""

RIGHT_LUNG = Code("3341006", "SCT", "Right lung")
"""SCT 3341006 "Right lung structure": the patient's right lung segment (image left on a PA/AP view)."""

LEFT_LUNG = Code("44029006", "SCT", "Left lung")
"""SCT 44029006 "Left lung structure": the patient's left lung segment."""

RIGHT = codes.SCT.Right
"""SCT 24028007 "Right" (CID 244 Laterality)."""

LEFT = codes.SCT.Left
"""SCT 7771000 "Left" (CID 244 Laterality)."""

BILATERAL = codes.SCT.Bilateral
"""SCT 51440002 (CID 244 Laterality): both lungs taken together."""

# --- How it was found ----------------------------------------------------------------------------------------------

ARTIFICIAL_INTELLIGENCE = codes.DCM.ArtificialIntelligence
"""DCM 123110 "Artificial Intelligence" (CID 7162 Surface Processing Algorithm Family): algorithm family."""

IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
"""SCT 363679005 "Imaging procedure" (CID 100 Quantitative Diagnostic Imaging Procedure): the TID 1500 Procedure
Reported. CID 100 has no projection-radiography entry; its general term is used rather than a code from outside the
group (SCT 399208008 "Plain chest X-ray" was used before, and strict validators refuse it). What was imaged is the
source study's own description."""

# --- How it is written down -----------------------------------------------------------------------------------------

QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
"""UMLS C0034375: the TID 1500 row 12 container of document-level evaluations."""

COMMENT = codes.DCM.Comment
"""DCM 121106 "Comment": a TEXT under Qualitative Evaluations (TID 1500 row 14), e.g. that the image orientation
was assumed."""

# --- What is reported about it -------------------------------------------------------------------------------------

YES = codes.SCT.Yes
"""SCT 373066001 "Yes" (CID 230 Yes-No)."""

NO = codes.SCT.No
"""SCT 373067005 "No" (CID 230 Yes-No)."""

CERTAINTY_OF_FINDING = codes.DCM.CertaintyOfFinding
"""DCM 111012 "Certainty of Finding" (the CAD SR templates' measure of a CAD finding's likelihood, CID 6048): the
detector's score of one opacity, or the image-level opacity probability, in percent. TID 1500 has no row of its own
for an algorithm's confidence, so it is a measurement (TID 300) of the group."""

AREA = codes.SCT.Area
"""SCT 42798000 "Area" (CID 7469 Generic Intensity and Size Measurement, CID 7471 Area Measurement)."""

EXTENT = Code("260858005", "SCT", "Extent")
"""SCT 260858005 "Extent (attribute)": with unit percent and a lung as finding site, the share of that lung's area
covered by opacity (the "severity" of models.severity)."""

GEOGRAPHIC_EXTENT_SCORE = Code("GES", "99CXRNODE", "Geographic extent score")
"""cxrnode's own concept: the geographic-extent score of Wong et al. (Radiology 2020), 0-4 per lung, 0-8 for both.
Neither DICOM nor SNOMED CT nor LOINC has a concept for it."""


def cxrnode_coding_scheme() -> CodingSchemeIdentificationItem:
    """Declaration of the "99CXRNODE" scheme, for the objects that use GEOGRAPHIC_EXTENT_SCORE (a new item each call:
    it is a Dataset, and one item must not sit in two objects)."""
    return CodingSchemeIdentificationItem(
        designator=GEOGRAPHIC_EXTENT_SCORE.scheme_designator,
        name="cxrnode concepts",
        responsible_organization="cxrnode",
    )


# --- Units (UCUM, CID 7181 and friends) ----------------------------------------------------------------------------

PERCENT = codes.UCUM.Percent
"""UCUM "%"."""

SQUARE_MILLIMETER = codes.UCUM.SquareMillimeter
"""UCUM "mm2"."""

SCORE = Code("{score}", "UCUM", "score")
"""UCUM "{score}": a dimensionless count (a UCUM annotation in braces stands for the unit 1), as LOINC uses for
scores; pydicom's table has no entry for it."""
