"""Pieces shared by the SR builders: observer, algorithm, image library, coding, text."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_io.codes import ANATOMICAL_STRUCTURE, STRUCTURES, Structure
from dicom_io.equipment import AlgorithmInfo, add_contributing_equipment
from dicom_io.source_header import character_set_of, conform_copied_attributes

logger = logging.getLogger(__name__)

#: Private coding scheme of mednode's own concepts (free-text findings, VQA). PS3.3 8.2: a
#: designator starting with "99" is private and is declared in CodingSchemeIdentificationSequence.
MEDNODE_CODING_SCHEME = "99MEDNODE"

_CROSS_SECTIONAL = {"CT", "MR", "PT"}
_PROJECTION = {"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"}

#: Terms a model says that pydicom's SNOMED CT dictionary does not spell the same way.
_SNOMED_SYNONYMS: dict[str, hd.sr.CodedConcept] = {
    "lungs": hd.sr.CodedConcept("39607008", "SCT", "Lung"),
    "left lung": hd.sr.CodedConcept("44029006", "SCT", "Left lung"),
    "right lung": hd.sr.CodedConcept("3341006", "SCT", "Right lung"),
    "atelectasis": hd.sr.CodedConcept("46621007", "SCT", "Atelectasis"),
    "fracture": hd.sr.CodedConcept("125605004", "SCT", "Fracture of bone"),
    "pneumonia": hd.sr.CodedConcept("233604007", "SCT", "Pneumonia"),
    "emphysema": hd.sr.CodedConcept("87433001", "SCT", "Pulmonary emphysema"),
}


#: Longest Series Description (VR LO: 64 characters).
_MAX_LO = 64


@dataclass(frozen=True)
class InstanceReference:
    """Where an earlier object mednode wrote lives, e.g. the SR a new version replaces.

    Enough to reference it (PS3.3 Table 10-4 Hierarchical SOP Instance Reference Macro)
    without reading its file.
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str

    def as_dataset(self) -> Dataset:
        """The four identifying attributes as a dataset, as highdicom takes references."""
        ds = Dataset()
        ds.StudyInstanceUID = self.study_instance_uid
        ds.SeriesInstanceUID = self.series_instance_uid
        ds.SOPClassUID = self.sop_class_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        return ds


def versioned_description(base: str, version: int | None) -> str:
    """Series Description of a result version: ``"mednode measurements v2"``.

    ``None`` (a first version) keeps ``base`` as it is, so first results look as they always did.

    Raises
    ------
    ValueError
        If ``version`` is less than 1.
    """
    if version is None:
        return base[:_MAX_LO]
    if version < 1:
        raise ValueError(f"a result version starts at 1, got {version}.")
    suffix = f" v{version}"
    return base[: _MAX_LO - len(suffix)] + suffix


def device_observation_context(algorithm: AlgorithmInfo) -> hd.sr.ObservationContext:
    """Observation context whose observer is the algorithm as a device (TID 1004)."""
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=algorithm.device_uid,
                name=algorithm.name,
                manufacturer_name=algorithm.manufacturer,
                model_name=algorithm.name,
            ),
        )
    )


def sr_algorithm_id(algorithm: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification of ``algorithm``."""
    parameters = [f"family={algorithm.family}"] if algorithm.family else None
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name, version=algorithm.version, parameters=parameters
    )


def mednode_coding_scheme() -> hd.coding_schemes.CodingSchemeIdentificationItem:
    """Declaration of the private 99MEDNODE scheme."""
    return hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=MEDNODE_CODING_SCHEME,
        name="mednode local concepts",
        responsible_organization="mednode",
    )


def _can_describe(ds: Dataset) -> bool:
    """Whether highdicom can write a TID 1601 image library entry for ``ds``."""
    modality = str(ds.get("Modality", ""))
    if modality in _CROSS_SECTIONAL:
        return all(
            ds.get(keyword) not in (None, "")
            for keyword in (
                "PixelSpacing",
                "ImageOrientationPatient",
                "ImagePositionPatient",
                "SliceThickness",
            )
        )
    if modality in _PROJECTION:
        orientation = ds.get("PatientOrientation")
        return bool(orientation) and len(orientation) == 2 and bool(ds.get("ImagerPixelSpacing"))
    return True


def image_library_sources(datasets: Iterable[Dataset]) -> list[Dataset] | None:
    """Sources for ``MeasurementReport(referenced_images=...)``, or ``None`` to omit TID 1601.

    highdicom 0.28 fails on a CR/DX without Patient Orientation or Imager Pixel Spacing
    and on a CT/MR without Slice Thickness; the image library is optional, so it is
    left out when any source cannot be described.
    """
    sources = list(datasets)
    if not sources:
        return None
    undescribable = [str(ds.SOPInstanceUID) for ds in sources if not _can_describe(ds)]
    if undescribable:
        logger.info(
            "no TID 1601 image library: instances %s lack the attributes it needs",
            undescribable,
        )
        return None
    return sources


#: Control characters a UT/LO value may not hold (PS3.5 6.1.3 allows only TAB, LF, FF, CR; ESC only
#: for ISO 2022 code extensions, which mednode never writes).
_FORBIDDEN_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def clean_text(text: str) -> str:
    """Make model text safe for a TEXT/UT value: drop control characters, keep everything else.

    Model output may contain any token, including control characters that would make the SR
    invalid; the words stay as the model wrote them.
    """
    return _FORBIDDEN_CONTROL.sub("", text)


def _slug(text: str) -> str:
    return "-".join(w for w in re.split(r"[^a-z0-9]+", text.lower()) if w)


def coded_term(text: str) -> hd.sr.CodedConcept:
    """Code a free-text term: SNOMED CT where pydicom's dictionary knows it, else private.

    The lookup is by exact meaning (``"pleural effusion"`` -> SCT 60046008); an unknown
    term becomes a reproducible 99MEDNODE code whose meaning is the text itself.

    Raises
    ------
    ValueError
        If ``text`` is blank.
    """
    text = clean_text(text).replace("\\", "/")  # LO: no control characters, no backslash
    normalized = " ".join(text.split()).lower()
    if not normalized:
        raise ValueError("a finding or site needs a non-blank name.")
    if normalized in _SNOMED_SYNONYMS:
        return _SNOMED_SYNONYMS[normalized]
    keyword = "".join(w.capitalize() for w in re.split(r"[^a-z0-9]+", normalized) if w)
    if keyword and hasattr(codes.SCT, keyword):
        code = getattr(codes.SCT, keyword)
        return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)
    slug = _slug(normalized)
    if not slug or len(slug) > 16:
        digest = hashlib.sha1(normalized.encode("utf-8")).hexdigest()[:8]
        slug = f"{slug[:7]}-{digest}" if slug else f"t-{digest}"
    return hd.sr.CodedConcept(slug, MEDNODE_CODING_SCHEME, " ".join(text.split())[:64])


def mednode_sr(
    *,
    evidence: Sequence[Dataset],
    content: Dataset | hd.sr.MeasurementReport,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    series_description: str,
    algorithm: AlgorithmInfo,
    specific_character_set: str | list[str] | None,
    coding_schemes: Sequence[hd.coding_schemes.CodingSchemeIdentificationItem],
    previous_versions: Sequence[InstanceReference] = (),
) -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR as mednode writes every result: complete, preliminary, UNVERIFIED,
    the algorithm as manufacturer/model/version, and the IHE AIR Contributing Equipment item.

    ``previous_versions`` are the SRs this one replaces, written in the Predecessor Documents
    Sequence (PS3.3 C.17.2.1: SR instances whose content this document includes, with or
    without modification), so a PACS or viewer can tell an amendment from a second finding.

    The patient and study attributes highdicom copies from the evidence are checked first: a
    missing or invalid one is left empty (:func:`dicom_io.source_header.conform_copied_attributes`).
    """
    sr = hd.sr.ComprehensiveSR(
        evidence=conform_copied_attributes(evidence, purpose=f"SR {sop_instance_uid}"),
        content=content,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        series_description=series_description,
        is_complete=True,
        is_final=False,
        is_verified=False,
        specific_character_set=specific_character_set,
        coding_schemes=list(coding_schemes),
        previous_versions=[ref.as_dataset() for ref in previous_versions] or None,
    )
    add_contributing_equipment(sr, algorithm)
    return sr


def structure_for(label: str) -> Structure:
    """The coded structure of a segment label: mednode's own (``body``, ``lungs``, ``bone``), or
    any other label a segmentation model names (``spleen``, ``liver``…), coded by
    :func:`coded_term` as an anatomical structure.

    Raises
    ------
    ValueError
        If ``label`` is blank.
    """
    if label in STRUCTURES:
        return STRUCTURES[label]
    concept = coded_term(label)
    return Structure(concept.meaning[:64], ANATOMICAL_STRUCTURE, concept)


#: Language codes (RFC 5646) with their English names, for the language content item.
_LANGUAGES = {
    "en": "English",
    "zh": "Chinese",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "pt": "Portuguese",
    "ru": "Russian",
}


def language_concept(language: str) -> hd.sr.CodedConcept:
    """RFC 5646 coded language (PS3.16 CID 5000), e.g. ``"zh"`` -> (zh, RFC5646, Chinese).

    Raises
    ------
    ValueError
        If ``language`` is not a plausible RFC 5646 tag.
    """
    if not re.fullmatch(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*", language):
        raise ValueError(f"language {language!r} is not an RFC 5646 tag such as 'en' or 'zh-CN'.")
    primary = language.split("-")[0].lower()
    return hd.sr.CodedConcept(language, "RFC5646", _LANGUAGES.get(primary, language))


def character_set_for_text(source: Dataset, texts: Sequence[str]) -> str | list[str] | None:
    """Specific Character Set for an SR holding ``texts``.

    ASCII text keeps the source's character set; any other text switches the whole
    object to ``ISO_IR 192`` (UTF-8), which encodes every value (patient name included).
    """
    if all(text.isascii() for text in texts):
        return character_set_of(source)
    return "ISO_IR 192"
