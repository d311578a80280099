"""Narrative report (findings, impression, questions and answers) as a Comprehensive SR.

The content tree follows TID 2000 "Basic Diagnostic Imaging Report": root LN 18748-4
"Diagnostic Imaging Report", a language item, the device observer, a Findings
section (LN 59776-5) with TEXT DCM 121071 "Finding" and an Impressions section
(LN 19005-8) with TEXT DCM 121073 "Impression". Visual question answering has no
standard codes: it is a section in the private 99MEDNODE scheme, declared in the
Coding Scheme Identification Sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset

from dicom_io.codes import procedure_for_modality
from dicom_io.equipment import AlgorithmInfo
from dicom_io.seg import ihe_coding_scheme
from dicom_io.sr_common import (
    MEDNODE_CODING_SCHEME,
    InstanceReference,
    character_set_for_text,
    clean_text,
    device_observation_context,
    language_concept,
    mednode_coding_scheme,
    mednode_sr,
    versioned_description,
)

logger = logging.getLogger(__name__)

DIAGNOSTIC_IMAGING_REPORT = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic Imaging Report")
FINDINGS_SECTION = hd.sr.CodedConcept("59776-5", "LN", "Findings")
IMPRESSIONS_SECTION = hd.sr.CodedConcept("19005-8", "LN", "Impressions")
FINDING = hd.sr.CodedConcept("121071", "DCM", "Finding")
IMPRESSION = hd.sr.CodedConcept("121073", "DCM", "Impression")
PROCEDURE_REPORTED = hd.sr.CodedConcept("121058", "DCM", "Procedure reported")
LANGUAGE = hd.sr.CodedConcept("121049", "DCM", "Language of Content Item and Descendants")
QUESTIONS_AND_ANSWERS = hd.sr.CodedConcept("vqa", MEDNODE_CODING_SCHEME, "Questions and answers")
QUESTION_AND_ANSWER = hd.sr.CodedConcept("vqa-pair", MEDNODE_CODING_SCHEME, "Question and answer")
QUESTION = hd.sr.CodedConcept("question", MEDNODE_CODING_SCHEME, "Question")
ANSWER = hd.sr.CodedConcept("answer", MEDNODE_CODING_SCHEME, "Answer")

_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS


def _section(
    name: hd.sr.CodedConcept, children: Sequence[hd.sr.ContentItem]
) -> hd.sr.ContainerContentItem:
    section = hd.sr.ContainerContentItem(name=name, relationship_type=_CONTAINS)
    section.ContentSequence = hd.sr.ContentSequence(list(children))
    return section


def _text(name: hd.sr.CodedConcept, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=clean_text(value), relationship_type=_CONTAINS)


def build_narrative_report(
    source_datasets: Sequence[Dataset],
    *,
    findings: str,
    impression: str | None,
    language: str,
    questions_answers: Sequence[tuple[str, str]] = (),
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    algorithm: AlgorithmInfo,
    previous_versions: Sequence[InstanceReference] = (),
    version: int | None = None,
) -> hd.sr.ComprehensiveSR:
    """Build a Comprehensive SR holding a model's narrative report.

    Parameters
    ----------
    source_datasets
        The images the report is about (headers suffice), all of one study.
    findings
        Findings text (required, non-blank).
    impression
        Impression text, or ``None``/blank to leave the section out.
    language
        RFC 5646 tag (``"en"``, ``"zh"``...) written as the language content item;
        non-ASCII text makes the object UTF-8 (``ISO_IR 192``).
    questions_answers
        ``(question, answer)`` pairs of visual question answering.
    series_instance_uid, sop_instance_uid, series_number
        Identity of the new instance.
    algorithm
        The model, written as the device observer and as contributing equipment.
    previous_versions
        The SRs this one replaces (same slot, earlier version of the study's results):
        written in the Predecessor Documents Sequence.
    version
        Result version shown in the Series Description (``"… v2"``); ``None`` for a first
        version, which keeps the plain description.

    Returns
    -------
    highdicom.sr.ComprehensiveSR
        In the source study, Verification Flag UNVERIFIED, Completion COMPLETE,
        Preliminary Flag PRELIMINARY.

    Raises
    ------
    ValueError
        If there is no source, the sources span studies, ``findings`` is blank,
        ``language`` is not an RFC 5646 tag, or a question or answer is blank.
    """
    sources = list(source_datasets)
    if not sources:
        raise ValueError("build_narrative_report needs at least one source dataset.")
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) != 1:
        raise ValueError(f"sources span {len(studies)} studies; a report belongs to one study.")
    if not clean_text(findings).strip():
        raise ValueError("findings must not be blank.")
    for question, answer in questions_answers:
        if not clean_text(question).strip() or not clean_text(answer).strip():
            raise ValueError("every question-answer pair needs a non-blank question and answer.")

    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=LANGUAGE,
            value=language_concept(language),
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        ),
        *device_observation_context(algorithm),
        hd.sr.CodeContentItem(
            name=PROCEDURE_REPORTED,
            value=procedure_for_modality(str(sources[0].get("Modality", ""))),
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        ),
        _section(FINDINGS_SECTION, [_text(FINDING, findings)]),
    ]
    if impression and impression.strip():
        items.append(_section(IMPRESSIONS_SECTION, [_text(IMPRESSION, impression)]))
    if questions_answers:
        pairs = [
            _section(QUESTION_AND_ANSWER, [_text(QUESTION, question), _text(ANSWER, answer)])
            for question, answer in questions_answers
        ]
        items.append(_section(QUESTIONS_AND_ANSWERS, pairs))

    root = hd.sr.ContainerContentItem(name=DIAGNOSTIC_IMAGING_REPORT)
    root.ContentSequence = hd.sr.ContentSequence(items)

    texts = [findings, impression or "", *(t for pair in questions_answers for t in pair)]
    sr = mednode_sr(
        evidence=sources,
        content=root,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        series_number=series_number,
        series_description=versioned_description("mednode report", version),
        previous_versions=previous_versions,
        algorithm=algorithm,
        specific_character_set=character_set_for_text(sources[0], texts),
        coding_schemes=[ihe_coding_scheme(), mednode_coding_scheme()],
    )
    logger.info(
        "built narrative SR %s (%s, %d question(s))",
        sop_instance_uid,
        language,
        len(questions_answers),
    )
    return sr
