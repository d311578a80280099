"""Coded concepts for the structures mednode segments and the reports it writes.

Segmented property categories and types follow PS3.16 CID 7150 / CID 7151 (SNOMED CT).
"""

from __future__ import annotations

from dataclasses import dataclass

from highdicom.sr import CodedConcept


@dataclass(frozen=True)
class Structure:
    """A structure mednode segments: its label and SNOMED CT category and type."""

    label: str
    category: CodedConcept
    type: CodedConcept


ANATOMICAL_STRUCTURE = CodedConcept("91723000", "SCT", "Anatomical Structure")
TISSUE = CodedConcept("85756007", "SCT", "Tissue")

#: Structures keyed by the names inference uses for masks.
STRUCTURES: dict[str, Structure] = {
    "body": Structure("Body", ANATOMICAL_STRUCTURE, CodedConcept("38266002", "SCT", "Entire body")),
    "lungs": Structure("Lungs", ANATOMICAL_STRUCTURE, CodedConcept("39607008", "SCT", "Lung")),
    "bone": Structure("Bone", TISSUE, CodedConcept("272673000", "SCT", "Bone")),
}

# Measurement report concepts
VOLUME = CodedConcept("118565006", "SCT", "Volume")
MILLILITER = CodedConcept("ml", "UCUM", "milliliter")
ATTENUATION_COEFFICIENT = CodedConcept("112031", "DCM", "Attenuation Coefficient")
MEAN = CodedConcept("373098007", "SCT", "Mean")
HOUNSFIELD_UNIT = CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
COMMENT = CodedConcept("121106", "DCM", "Comment")
ARTIFICIAL_INTELLIGENCE = CodedConcept("123110", "DCM", "Artificial Intelligence")
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("272519000", "SCT", "Absent")
UNCERTAIN = CodedConcept("64957009", "SCT", "Uncertain")

#: Procedure Reported (TID 1500) describes the imaging procedure, not the algorithm.
PROCEDURES: dict[str, CodedConcept] = {
    "CT": CodedConcept("77477000", "SCT", "Computed tomography"),
    "MR": CodedConcept("113091000", "SCT", "Magnetic resonance imaging"),
    "CR": CodedConcept("168537006", "SCT", "Plain radiography"),
    "DX": CodedConcept("168537006", "SCT", "Plain radiography"),
}
IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")


def procedure_for_modality(modality: str | None) -> CodedConcept:
    """Return the Procedure Reported code of a source modality (generic if unknown)."""
    return PROCEDURES.get(modality or "", IMAGING_PROCEDURE)
