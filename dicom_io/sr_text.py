"""The narrative text of a structured report, as a reader would read it aloud.

A prior study's report usually reaches a PACS as an SR (Basic Text, Enhanced or Comprehensive,
TID 2000 "Basic Diagnostic Imaging Report" or a vendor's variant). What a model comparing studies
needs from it is its text, by section: ``Findings: …`` / ``Impression: …``.

The walk (PS3.3 C.17.3, Document Content Module) keeps TEXT items and the coded or numeric
findings (CODE, NUM) that sit in a section, and skips what only describes the document: the
observation context (``HAS OBS CONTEXT``), concept modifiers (``HAS CONCEPT MOD``: language,
procedure reported) and acquisition context. Each section (CONTAINER) gives its concept name as a
heading, once, before its first line.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

#: SR Storage SOP classes whose content tree may hold a narrative report (PS3.4 B.5)
SR_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.35",  # Extensible SR
})
_SKIPPED_RELATIONSHIPS = frozenset({"HAS OBS CONTEXT", "HAS CONCEPT MOD", "HAS ACQ CONTEXT"})


def _name(item: Dataset) -> str:
    codes = item.get("ConceptNameCodeSequence")
    return str(codes[0].get("CodeMeaning", "")).strip() if codes else ""


def _value(item: Dataset) -> str | None:
    kind = str(item.get("ValueType", ""))
    if kind == "TEXT":
        return str(item.get("TextValue", "")).strip() or None
    if kind == "CODE" and item.get("ConceptCodeSequence"):
        return str(item.ConceptCodeSequence[0].get("CodeMeaning", "")).strip() or None
    if kind == "NUM" and item.get("MeasuredValueSequence"):
        measured = item.MeasuredValueSequence[0]
        units = measured.get("MeasurementUnitsCodeSequence")
        unit = str(units[0].get("CodeValue", "")) if units else ""
        return f"{measured.get('NumericValue', '')} {'' if unit in ('1', '') else unit}".strip() or None
    return None


def report_text(ds: Dataset, *, max_chars: int = 4000) -> str | None:
    """The narrative text of an SR document, one line per item, sections as headings.

    Parameters
    ----------
    ds
        An SR instance (any of :data:`SR_SOP_CLASSES`).
    max_chars
        The text is cut at this length (a line boundary when there is one), so one long prior
        report cannot crowd out a model's context.

    Returns
    -------
    str or None
        ``None`` when ``ds`` is not an SR or its tree holds no text, code or number to read.
    """
    if str(ds.get("SOPClassUID", "")) not in SR_SOP_CLASSES or "ContentSequence" not in ds:
        return None
    lines: list[str] = []

    def walk(items: list[Dataset], heading: str | None) -> None:
        announced = False
        for item in items:
            if str(item.get("RelationshipType", "")) in _SKIPPED_RELATIONSHIPS:
                continue
            kind = str(item.get("ValueType", ""))
            if kind == "CONTAINER":
                walk(list(item.get("ContentSequence", [])), _name(item) or heading)
                continue
            value = _value(item)
            if value is None:
                continue
            if heading and not announced:
                lines.append(f"{heading}:")
                announced = True
            name = _name(item)
            # "Finding: …" under "Findings:" says nothing new; other names (a NUM's) do
            lines.append(value if kind == "TEXT" or not name else f"{name}: {value}")
            if "ContentSequence" in item:
                walk(list(item.ContentSequence), None)

    walk(list(ds.ContentSequence), None)
    text = "\n".join(lines).strip()
    if not text:
        return None
    if len(text) > max_chars:
        cut = text.rfind("\n", 0, max_chars)
        text = text[:cut if cut > max_chars // 2 else max_chars].rstrip() + " …"
    return text
