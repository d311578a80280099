"""What must not leave the hospital for a remote model: burned-in text and identifiers in text.

Pixel data can carry the patient's name, ID or dates burned in: ultrasound and secondary capture
almost always do, and any image whose Burned In Annotation (0028,0301) is YES says it does
(PS3.3 C.7.6.1.1.7; PS3.15 E.1.1 treats such images as needing pixel cleaning). Before an image
goes to a model outside the hospital it is refused, or, for ultrasound whose Sequence of
Ultrasound Regions (PS3.3 C.8.5.5) says where the image data is, masked: everything outside those
regions (where scanners write their annotations) is set to black.

Text that goes with the images (a prior report) may quote identifiers; :func:`scrub_text` replaces
each identifying value of the study's headers (the PS3.15 E.1.1 Basic Profile attributes a report
can quote: names, IDs, accession number, birth date) with ``[REDACTED]``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset

BurnedInPolicy = Literal["refuse", "mask"]
#: Modalities whose pixels carry burned-in text unless the header says otherwise
TEXT_BEARING_MODALITIES = frozenset({"US", "SC", "OT", "XC", "ES", "DOC"})
#: SOP classes of the same kind: Secondary Capture (single and multi-frame), Ultrasound
TEXT_BEARING_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.6.", "1.2.840.10008.5.1.4.1.1.3.")
#: Header attributes whose values are identifiers a text may quote (PS3.15 E.1.1 Basic Profile)
IDENTIFYING_KEYWORDS = ("PatientName", "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "AccessionNumber",
                        "PatientBirthDate", "ReferringPhysicianName", "PerformingPhysicianName",
                        "NameOfPhysiciansReadingStudy", "OperatorsName", "StudyID", "InstitutionName",
                        "PatientAddress", "PatientTelephoneNumbers", "MilitaryRank", "OtherPatientNames")
REDACTED = "[REDACTED]"


def burned_in_text_reason(ds: Dataset) -> str | None:
    """Why ``ds``'s pixels may hold burned-in text, or None when nothing says so.

    Burned In Annotation YES always counts; ultrasound and secondary capture count unless it is NO.
    """
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if flag == "YES":
        return "Burned In Annotation is YES"
    modality = str(ds.get("Modality", "") or "").strip().upper()
    sop_class = str(ds.get("SOPClassUID", ""))
    if flag != "NO" and (modality in TEXT_BEARING_MODALITIES or sop_class.startswith(TEXT_BEARING_SOP_PREFIXES)):
        return f"{modality or 'this'} images usually carry burned-in text and Burned In Annotation is not NO"
    return None


def ultrasound_regions(ds: Dataset) -> list[tuple[int, int, int, int]]:
    """The image regions of an ultrasound frame as ``(x0, y0, x1, y1)``, inclusive pixel bounds."""
    regions = []
    for region in ds.get("SequenceOfUltrasoundRegions", []) or []:
        try:
            box = tuple(int(region[k].value) for k in ("RegionLocationMinX0", "RegionLocationMinY0",
                                                       "RegionLocationMaxX1", "RegionLocationMaxY1"))
        except (KeyError, TypeError, ValueError):
            continue
        if box[2] >= box[0] and box[3] >= box[1]:
            regions.append((box[0], box[1], box[2], box[3]))
    return regions


def mask_outside(pixels: np.ndarray, regions: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
    """A copy of a frame (rows, columns[, samples]) with every pixel outside ``regions`` set to 0.

    Raises
    ------
    ValueError
        If there is no region: nothing would be known to be free of text.
    """
    if not regions:
        raise ValueError("no region to keep: the image cannot be masked, only refused")
    keep = np.zeros(pixels.shape[:2], dtype=bool)
    for x0, y0, x1, y1 in regions:
        keep[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = True
    out = np.zeros_like(pixels)
    out[keep] = pixels[keep]
    return out


def _values(ds: Dataset) -> Iterable[str]:
    for keyword in IDENTIFYING_KEYWORDS:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        items = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
        for item in items:
            text = str(item).strip()
            if not text:
                continue
            if keyword.endswith(("Name", "Names")):
                # a person name: each component (family, given…) on its own, and the whole
                yield from (p for p in re.split(r"[\^=]", text) if p.strip())
            if keyword == "PatientBirthDate" and len(text) == 8 and text.isdigit():
                yield f"{text[:4]}-{text[4:6]}-{text[6:]}"
                yield f"{text[6:]}.{text[4:6]}.{text[:4]}"
                yield f"{text[4:6]}/{text[6:]}/{text[:4]}"
            yield text.replace("^", " ").strip()


def identifying_values(datasets: Iterable[Dataset]) -> list[str]:
    """The identifiers of ``datasets``' headers a text could quote, longest first; values of
    fewer than 2 characters are left out (they would redact ordinary words)."""
    found = {v.strip() for ds in datasets for v in _values(ds) if len(v.strip()) >= 2}
    return sorted(found, key=lambda v: (-len(v), v))


def scrub_text(text: str, values: Sequence[str]) -> tuple[str, int]:
    """``text`` with each of ``values`` (case-insensitive, as a whole word) replaced by
    :data:`REDACTED`; returns the text and how many replacements were made."""
    total = 0
    for value in values:
        pattern = re.compile(rf"(?<!\w){re.escape(value)}(?!\w)", re.IGNORECASE)
        text, count = pattern.subn(REDACTED, text)
        total += count
    return text, total
