"""Narrative report (findings, impression, questions and answers) as a Comprehensive SR.

The content tree follows TID 2000 "Basic Diagnostic Imaging Report": root LN 18748-4
"Diagnostic Imaging Report", a language item, the device observer, a Findings
section (LN 59776-5) with TEXT DCM 121071 "Finding" and an Impressions section
(LN 19005-8) with TEXT DCM 121073 "Impression". Visual question answering has no
standard codes: it is a section in the private 99MEDNODE scheme, declared in the
Coding Scheme Identification Sequence.

A report written with a prior study open has a Comparison section (LN 18834-2, the heading IHE
MRRT report templates use): a TEXT "Procedure Description" naming the prior's date, and an IMAGE
"Baseline" (DCM 121079, CID 7003) per prior image the model saw. The prior images are also
evidence: highdicom lists instances of another study in the Pertinent Other Evidence Sequence
(PS3.3 C.17.2), so the SR's references name the prior study. Without a prior the section says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

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
COMPARISON_SECTION = hd.sr.CodedConcept("18834-2", "LN", "Comparison")
PROCEDURE_DESCRIPTION = hd.sr.CodedConcept("121065", "DCM", "Procedure Description")
BASELINE = hd.sr.CodedConcept("121079", "DCM", "Baseline")
#: The Comparison text when no prior study was compared
NO_PRIOR = "No prior study available."


@dataclass(frozen=True)
class Comparison:
    """What a report was compared with: the prior study's images the model saw, or nothing.

    Attributes
    ----------
    prior_images
        Headers of the prior images (one study); empty when no prior study was available.
    study_date
        The prior study's date, named in the Comparison text.
    reason
        Why there is no prior (e.g. "the PACS did not answer"), added to :data:`NO_PRIOR`.
    """

    prior_images: tuple[Dataset, ...] = ()
    study_date: date | None = None
    reason: str | None = None

    def text(self) -> str:
        """The Comparison section's sentence."""
        if not self.prior_images:
            return NO_PRIOR if not self.reason else f"{NO_PRIOR[:-1]} ({self.reason})."
        when = self.study_date.isoformat() if self.study_date else "unknown date"
        modality = str(self.prior_images[0].get("Modality", "") or "").strip()
        return f"Compared with the prior study of {when}{f' ({modality})' if modality else ''}."

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
    comparison: Comparison | None = None,
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
    comparison
        The prior study compared (a Comparison section and Pertinent Other Evidence), or a
        :class:`Comparison` without images for "No prior study available"; ``None`` for a rule
        that does not compare (no section).

    Returns
    -------
    highdicom.sr.ComprehensiveSR
        In the source study, Verification Flag UNVERIFIED, Completion COMPLETE,
        Preliminary Flag PRELIMINARY.

    Raises
    ------
    ValueError
        If there is no source, the sources span studies, ``findings`` is blank,
        ``language`` is not an RFC 5646 tag, a question or answer is blank, or the prior images
        span studies or belong to the current study.
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
    priors = list(comparison.prior_images) if comparison else []
    prior_studies = {str(ds.StudyInstanceUID) for ds in priors}
    if len(prior_studies) > 1 or prior_studies & studies:
        raise ValueError("the prior images must all belong to one study other than the report's.")

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
    if comparison is not None:
        items.append(_section(COMPARISON_SECTION, [
            _text(PROCEDURE_DESCRIPTION, comparison.text()),
            *(hd.sr.ImageContentItem(name=BASELINE, referenced_sop_class_uid=str(ds.SOPClassUID),
                                     referenced_sop_instance_uid=str(ds.SOPInstanceUID),
                                     relationship_type=_CONTAINS) for ds in priors),
        ]))
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
        evidence=[*sources, *priors],
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
