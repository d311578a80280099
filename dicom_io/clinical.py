"""The clinical context a radiologist reads before the images: age, sex, why the study was asked for.

:func:`read_clinical_context` takes it from a header — Patient's Age (or the age at the study
from Patient's Birth Date and Study Date), Patient's Sex, Reason for the Requested Procedure,
Requested Procedure Description and Admitting Diagnoses Description, at the top level or in the
Request Attributes Sequence (PS3.3 C.7.3.1, C.4.10) — and never the patient's name or ID: a free
text that quotes either has it replaced by ``[removed]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

from pydicom import Dataset

#: longest text kept of one reason (a prompt is no place for a whole referral letter)
MAX_REASON_CHARS = 200
REMOVED = "[removed]"


@dataclass(frozen=True)
class ClinicalContext:
    """What the request says about the patient and the question, without identity."""

    age_years: int | None = None
    #: ``M``, ``F`` or ``O`` (PS3.3 C.7.1.1)
    sex: str | None = None
    #: Reason for the Requested Procedure, one per request
    reasons: tuple[str, ...] = ()
    #: Requested Procedure Description
    procedures: tuple[str, ...] = ()
    #: Admitting Diagnoses Description
    diagnoses: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self.age_years is None and self.sex is None and not (self.reasons or self.procedures or self.diagnoses)


def age_in_years(patient_age: str | None, birth_date: str | None = None, study_date: str | None = None) -> int | None:
    """Years from an AS value (``045Y``; ``018M`` → 1; days and weeks → 0), else from the dates.

    None when neither gives a plausible age (0-150 years).
    """
    match = re.fullmatch(r"(\d{3})([DWMY])", (patient_age or "").strip().upper())
    if match:
        number, unit = int(match[1]), match[2]
        years = {"Y": number, "M": number // 12, "W": number // 52, "D": number // 365}[unit]
        return years if years <= 150 else None
    try:
        born = date(int(birth_date[:4]), int(birth_date[4:6]), int(birth_date[6:8])) if birth_date else None
        seen = date(int(study_date[:4]), int(study_date[4:6]), int(study_date[6:8])) if study_date else None
    except (ValueError, TypeError):
        return None
    if born is None or seen is None or seen < born:
        return None
    years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
    return years if years <= 150 else None


def _identity_words(ds: Dataset) -> list[str]:
    words = [str(ds.get("PatientID", "") or "").strip()]
    name = str(ds.get("PatientName", "") or "")
    words += [w for w in re.split(r"[\^=\s,]+", name) if len(w) >= 2]
    return sorted({w for w in words if w}, key=len, reverse=True)


def _scrubbed(text: str, identity: list[str]) -> str:
    for word in identity:
        text = re.sub(re.escape(word), REMOVED, text, flags=re.IGNORECASE)
    text = " ".join(text.split())
    return text[:MAX_REASON_CHARS].rstrip()


def _texts(ds: Dataset, keyword: str, identity: list[str]) -> tuple[str, ...]:
    values: list[str] = []
    for source in (ds, *(ds.get("RequestAttributesSequence", None) or [])):
        value = source.get(keyword)
        if value is None or value == "":
            continue
        items = list(value) if not isinstance(value, str) and hasattr(value, "__iter__") else [value]
        values += [_scrubbed(str(v), identity) for v in items if str(v).strip()]
    return tuple(dict.fromkeys(v for v in values if v and v != REMOVED))


def read_clinical_context(ds: Dataset) -> ClinicalContext:
    """The clinical context of the study ``ds`` belongs to (any instance's header will do)."""
    identity = _identity_words(ds)
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    return ClinicalContext(
        age_years=age_in_years(str(ds.get("PatientAge", "") or ""), str(ds.get("PatientBirthDate", "") or ""),
                               str(ds.get("StudyDate", "") or "")),
        sex=sex if sex in ("M", "F", "O") else None,
        reasons=_texts(ds, "ReasonForTheRequestedProcedure", identity),
        procedures=_texts(ds, "RequestedProcedureDescription", identity),
        diagnoses=_texts(ds, "AdmittingDiagnosesDescription", identity),
    )
