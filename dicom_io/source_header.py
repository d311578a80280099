"""Patient and study attributes of source images, made fit to be copied into mednode's results.

highdicom copies every root attribute of the source's Patient and Study modules (PS3.3 C.7.1.1
Patient, C.7.2.1 General Study, C.7.2.2 Patient Study, the Clinical Trial Subject and Study
modules) into each SEG and SR, and its constructors read the Type 2 ones (PatientBirthDate,
AccessionNumber, StudyID…) as attributes. Real sources break that: de-identifiers put a hash in
Patient's Birth Date or a 56-character pseudonym in Accession Number (SH, 16 at most), some
scanners leave Type 2 elements out. The copy then fails (``Unable to convert … to 'DA'``,
``… has no attribute 'AccessionNumber'``) or the result fails validation.

:func:`conform_copied_attributes` checks each attribute that will be copied against its VR (with
pydicom's own validators) and its Type, and returns copies of the sources in which each invalid
value is left empty and each missing Type 2 element is present and empty (PS3.5 7.4: empty
means unknown). It logs one warning per call naming the attributes by keyword and what was
wrong, never their values (they are patient data).
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from highdicom._standard_utils import (
    get_iod_module_map,
    get_module_attribute_map,
    get_sop_class_iod_map,
)
from pydicom import config
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.multival import MultiValue

from dicom_io.values import value_problem

logger = logging.getLogger(__name__)

#: Information entities whose root attributes highdicom copies from the source (``SOPClass.
#: copy_patient_and_study_information``).
COPIED_ENTITIES = ("Patient", "Study")
#: The modules of those entities every image IOD has (CT Image, DX Image…): used for a SOP
#: class highdicom does not know.
_DEFAULT_MODULES = ("patient", "clinical-trial-subject", "general-study", "patient-study", "clinical-trial-study")
_MANDATORY_MODULES = ("patient", "general-study")
_VALIDATION_MODE_LOCK = threading.Lock()
#: Datasets :func:`conform_copied_attributes` returned (found fit, or its repaired copies), by
#: ``id``: a job's sources are conformed once when loaded, then passed again to the SEG and the SR
#: builders, which found nothing more to repair at ~0.1–0.16 s each for 300 sources. Weak, so a
#: dataset is forgotten with its last use; the ``is`` test guards against a reused ``id``.
_CONFORMED: weakref.WeakValueDictionary[int, Dataset] = weakref.WeakValueDictionary()
#: Types whose attribute may be written empty (PS3.5 7.4): a bad value becomes "unknown".
_MAY_BE_EMPTY = frozenset({"2", "2C", "3"})


@dataclass(frozen=True)
class CopiedAttribute:
    """One attribute highdicom copies: its keyword, VR and Type in the module that holds it, and
    whether that module is mandatory in the source's IOD (the Type 2 elements of an optional
    module, such as Clinical Trial Subject, are required only when the module is there)."""

    keyword: str
    tag: int
    vr: str
    type: str
    mandatory_module: bool


@dataclass(frozen=True)
class Repair:
    """What was wrong with one attribute of a source, and so left empty."""

    keyword: str
    problem: str
    tag: int
    vr: str

    def __str__(self) -> str:
        return f"{self.keyword} ({self.problem})"


@lru_cache(maxsize=64)
def copied_attributes(sop_class_uid: str) -> tuple[CopiedAttribute, ...]:
    """The root attributes highdicom copies into a result from a source of ``sop_class_uid``.

    Taken from highdicom's own tables of the standard (the IOD's modules of the Patient and
    Study entities), so exactly what highdicom copies is checked. A SOP class highdicom does not
    know is read as an image IOD with the usual Patient and Study modules.
    """
    modules_of_iod = get_iod_module_map()
    iod = get_sop_class_iod_map().get(sop_class_uid)
    if iod is not None and iod in modules_of_iod:
        modules = [(m["key"], m["usage"] == "M") for m in modules_of_iod[iod] if m["ie"] in COPIED_ENTITIES]
    else:
        modules = [(key, key in _MANDATORY_MODULES) for key in _DEFAULT_MODULES]
    attributes = get_module_attribute_map()
    found: dict[str, CopiedAttribute] = {}
    for module, mandatory in modules:
        for item in attributes.get(module, []):
            keyword = str(item["keyword"])
            tag = tag_for_keyword(keyword)
            if item["path"] or keyword in found or tag is None:
                continue
            found[keyword] = CopiedAttribute(keyword, tag, dictionary_VR(tag), str(item["type"]), mandatory)
    return tuple(found.values())


def check_copied_attributes(ds: Dataset) -> list[Repair]:
    """What :func:`conform_copied_attributes` would leave empty or add empty in ``ds``.

    Only attributes that may be empty (Type 2, 2C, 3) are repaired: a bad Type 1 value (an
    invalid Study Instance UID) is an input error that highdicom reports as such.
    """
    repairs: list[Repair] = []
    for attribute in copied_attributes(str(ds.get("SOPClassUID", ""))):
        if attribute.type not in _MAY_BE_EMPTY or attribute.vr == "SQ":
            continue
        tag = attribute.tag
        if tag not in ds:
            if attribute.type == "2" and attribute.mandatory_module:
                repairs.append(Repair(attribute.keyword, "missing, Type 2", tag, attribute.vr))
            continue
        element = _quietly(ds, tag)
        if element is None:
            repairs.append(Repair(attribute.keyword, "unreadable", tag, attribute.vr))
            continue
        problem = value_problem(element.VR if element.VR != "UN" else attribute.vr, element.value)
        if problem is not None:
            repairs.append(Repair(attribute.keyword, problem, attribute.tag, attribute.vr))
    return repairs


def _quietly(ds: Dataset, tag: int) -> DataElement | None:
    """``ds[tag]``, converted from its raw bytes without pydicom's validation warnings (which
    quote the value); ``None`` if it cannot be decoded at all.

    pydicom's validation mode is a process-wide setting: the lock keeps two threads here from
    restoring each other's value; another thread reading meanwhile only misses a warning.
    """
    with _VALIDATION_MODE_LOCK:
        previous = config.settings.reading_validation_mode
        config.settings.reading_validation_mode = config.IGNORE
        try:
            return ds[tag]
        except (ValueError, TypeError, LookupError):
            return None
        finally:
            config.settings.reading_validation_mode = previous


def _repaired(ds: Dataset, repairs: Iterable[Repair]) -> Dataset:
    """A copy of ``ds`` sharing its elements, with each repaired attribute present and empty."""
    if isinstance(ds, FileDataset) and isinstance(ds.filename, str):
        # deferred values (Pixel Data read with defer_size) stay deferred: the copy reads them
        # from the file as its source would, a slice or frame at a time, instead of all here
        fixed: Dataset = FileDataset(ds.filename, {tag: ds.get_item(tag, keep_deferred=True) for tag in ds.keys()},  # noqa: SIM118
                                     preamble=ds.preamble, file_meta=ds.file_meta)
        fixed.timestamp = ds.timestamp
    else:
        fixed = Dataset({tag: ds.get_item(tag) for tag in ds.keys()})  # noqa: SIM118 (tags, not elements)
        if hasattr(ds, "file_meta"):
            fixed.file_meta = ds.file_meta
        if getattr(ds, "filename", None):
            fixed.filename = ds.filename  # a header-only source still finds its pixels
    for repair in repairs:
        fixed.add(DataElement(repair.tag, repair.vr, None))
    return fixed


#: The default repertoire as the first value of a multi-valued Specific Character Set.
DEFAULT_REPERTOIRE_EXTENSIONS = "ISO 2022 IR 6"


def character_set_of(ds: Dataset) -> str | list[str] | None:
    """Specific Character Set of a source, as highdicom takes it; ``None`` where absent or empty.

    highdicom refuses an empty Specific Character Set copied from a source (a real CT does
    this); empty means the default repertoire, which is written by omission. With code
    extensions (``\\ISO 2022 IR 87``, Japanese) an empty first value also means the default
    repertoire (PS3.3 C.12.1.1.2), which highdicom accepts only by its name, ISO 2022 IR 6.
    """
    value = ds.get("SpecificCharacterSet")
    if value is None or value == "" or (isinstance(value, list | MultiValue) and not any(value)):
        return None
    if isinstance(value, list | MultiValue):
        values = [corrected_character_set(str(v).strip()) for v in value]
        if len(values) == 1:
            return values[0]
        return [values[0] or DEFAULT_REPERTOIRE_EXTENSIONS, *values[1:]]
    return corrected_character_set(str(value).strip())


_MISSPELLED_ISO_IR = re.compile(r"^ISO[ _-]?IR[ _-]?(\d+)$", re.IGNORECASE)


def corrected_character_set(term: str) -> str:
    """A defined term of Specific Character Set as the standard spells it.

    Senders write ``ISO-IR 100`` or ``ISO_IR100`` for ``ISO_IR 100``; pydicom reads them (with a
    warning) but highdicom refuses to write them into a new object. A term that is neither a
    defined term nor such a misspelling is returned as it is (and refused by the builder with its
    own message).
    """
    if term in python_encoding:
        return term
    match = _MISSPELLED_ISO_IR.match(term)
    if match is not None and f"ISO_IR {match.group(1)}" in python_encoding:
        return f"ISO_IR {match.group(1)}"
    return term


def conform_copied_attributes(datasets: Sequence[Dataset], *, purpose: str) -> list[Dataset]:
    """The sources, with every copied patient or study attribute fit to be copied.

    Parameters
    ----------
    datasets
        Source images (headers suffice). Those without a problem are returned as they are.
    purpose
        What the sources are for, to identify the warning: a job key, or the kind and SOP
        Instance UID of the object being built.

    Returns
    -------
    list of pydicom.dataset.Dataset
        In the same order; a source with a problem is replaced by a copy sharing its elements
        (pixel data included, nothing is decoded) in which each invalid value is left empty and
        each missing Type 2 element is present and empty. One warning lists the attributes, by
        keyword, with what was wrong; the sources themselves are not changed.

    Notes
    -----
    A dataset this returned is not checked again when passed again (the same object): sources
    are read, not edited, once loaded. Edit a copy, not a returned dataset, if its patient or
    study attributes are to change.
    """
    conformed: list[Dataset] = []
    found: dict[str, Repair] = {}
    series: set[str] = set()
    for ds in datasets:
        if _CONFORMED.get(id(ds)) is ds:
            conformed.append(ds)
            continue
        repairs = check_copied_attributes(ds)
        if repairs:
            for repair in repairs:
                found.setdefault(repair.keyword, repair)
            series.add(str(ds.get("SeriesInstanceUID", "")))
            ds = _repaired(ds, repairs)
        _CONFORMED[id(ds)] = ds
        conformed.append(ds)
    if found:
        logger.warning(
            "%s: source attributes left empty in the results, as their value is missing or "
            "invalid in series %s: %s",
            purpose,
            ", ".join(sorted(series)),
            "; ".join(str(r) for r in found.values()),
        )
    return conformed
