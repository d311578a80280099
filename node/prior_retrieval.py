"""Fetching a patient's prior studies from a PACS: C-FIND (study, then series), then C-GET.

One association per job carries everything: the study-level query by Patient ID and date range,
a series-level query per candidate study (newest first, until :func:`node.priors.choose` has its
count), and C-GET of the chosen image series and of the candidate's SR series (its report). The
association proposes the Study Root information models and falls back to Patient Root when the
PACS accepts only that; C-GET's sub-operations arrive as C-STORE requests on the same association
(PS3.4 C.4.3), so storage contexts with the SCP role are proposed for the classes needed.

Retrieved files go into the store's priors area (``priors/<job>/…``), never into the index: they
are not received studies and trigger no work. The job removes them when it ends; the retention
cleaner removes what a crashed job left (:func:`storage.store.InstanceStore.purge_priors`).

Every wait is bounded: ACSE, DIMSE and network timeouts are the rule's ``timeout_s``. A PACS that
refuses, does not answer or answers a query with a failure raises
:class:`PriorsUnavailableError`; the pipeline then goes on without a prior or retries, as the
rule says.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from dicom_io.equipment import names_mednode
from dicom_io.errors import DicomIOError
from dicom_io.sr_text import SR_SOP_CLASSES, report_text
from dicom_io.volume import read_dataset
from node.config import Destination, RulePriors
from node.priors import (
    CurrentStudy,
    PriorChoice,
    SeriesMatch,
    StudyMatch,
    candidate_studies,
    choose,
    parse_da,
    study_date_range,
)
from node.tls import client_context
from storage.store import InstanceStore, check_uid

log = logging.getLogger(__name__)

#: Transfer syntaxes accepted for retrieved instances (the PACS picks one or transcodes)
RETRIEVE_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                     JPEG2000Lossless, JPEG2000, JPEGLosslessSV1, JPEGBaseline8Bit, JPEGExtended12Bit,
                     JPEGLSLossless, RLELossless]
#: At most this many candidate studies are queried at series level
MAX_CANDIDATES = 10
_PENDING = (0xFF00, 0xFF01)


class PriorsUnavailableError(ConnectionError):
    """The PACS holding the priors refused, did not answer in time, or answered with a failure."""


@dataclass(frozen=True)
class RetrievedPrior:
    """A prior study as the job uses it: its images (read from the priors area) and report text."""

    study: StudyMatch
    images: list[Dataset]
    report: str | None = None
    series: tuple[SeriesMatch, ...] = field(default=())


def _ae(calling_ae_title: str, timeout_s: float, storage_classes: Sequence[str]) -> tuple[AE, list]:
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    for model in (StudyRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelFind,
                  StudyRootQueryRetrieveInformationModelGet, PatientRootQueryRetrieveInformationModelGet):
        ae.add_requested_context(model)
    roles = []
    for uid in dict.fromkeys([*storage_classes, *sorted(SR_SOP_CLASSES)]):
        ae.add_requested_context(uid, RETRIEVE_SYNTAXES)
        roles.append(build_role(uid, scp_role=True))
    return ae, roles


def _accepted(assoc: Association, *models: str) -> str | None:
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    return next((m for m in models if m in accepted), None)


class _Receiver:
    """Where C-GET's C-STORE sub-operations land: the peer's bytes, as sent, in the priors area."""

    def __init__(self, store: InstanceStore, area: str) -> None:
        self.store, self.area = store, area
        self.received: list[str] = []

    def on_store(self, event: Event) -> int:
        try:
            sop_uid = check_uid(str(event.request.AffectedSOPInstanceUID))
            relative = f"{self.area}/{sop_uid}.dcm"
            self.store.write(relative, event.encoded_dataset())
        except Exception as exc:  # noqa: BLE001 (a handler never raises: answer a status instead)
            log.warning("priors: a retrieved instance could not be kept (%s)", type(exc).__name__)
            return 0xA700
        self.received.append(relative)
        return 0x0000


class _Session:
    """One association to the PACS: queries and retrievals, each failure a PriorsUnavailableError."""

    def __init__(self, assoc: Association, source: Destination, receiver: _Receiver) -> None:
        self.assoc, self.source, self.receiver = assoc, source, receiver
        study_root = _accepted(assoc, str(StudyRootQueryRetrieveInformationModelFind))
        self.find_model = study_root or _accepted(assoc, str(PatientRootQueryRetrieveInformationModelFind))
        self.get_model = _accepted(assoc, str(StudyRootQueryRetrieveInformationModelGet)) if study_root \
            else _accepted(assoc, str(PatientRootQueryRetrieveInformationModelGet))
        if self.find_model is None:
            raise PriorsUnavailableError(f"{source} accepts no C-FIND information model (Study or Patient Root)")

    def find(self, identifier: Dataset) -> list[Dataset]:
        answers = []
        for status, found in self.assoc.send_c_find(identifier, self.find_model):
            code = int(getattr(status, "Status", -1)) if status else -1
            if code in _PENDING and found is not None:
                answers.append(found)
            elif code != 0x0000:
                raise PriorsUnavailableError(
                    f"C-FIND at {identifier.QueryRetrieveLevel} level on {self.source} ended with "
                    f"{'no answer (timeout or abort)' if code < 0 else f'status 0x{code:04X}'}")
        return answers

    def get_series(self, study_uid: str, series_uid: str, patient_id: str) -> list[str]:
        if self.get_model is None:
            raise PriorsUnavailableError(f"{self.source} accepts no C-GET information model")
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "SERIES"
        if self.get_model == str(PatientRootQueryRetrieveInformationModelGet):
            identifier.PatientID = patient_id
        identifier.StudyInstanceUID = study_uid
        identifier.SeriesInstanceUID = series_uid
        received = self.receiver.received
        before = len(received)
        final = None
        for status, _ in self.assoc.send_c_get(identifier, self.get_model):
            final = int(getattr(status, "Status", -1)) if status else -1
        if final is None or final < 0 or (final not in (0x0000, 0xB000) and len(received) == before):
            raise PriorsUnavailableError(f"C-GET of a prior series from {self.source} ended with "
                                         f"{'no answer (timeout or abort)' if not final or final < 0 else f'status 0x{final:04X}'}")
        return received[before:]


def _study_query(current: CurrentStudy, rule: RulePriors) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = current.patient_id
    ds.StudyDate = study_date_range(current, rule)
    ds.StudyInstanceUID = ""
    ds.ModalitiesInStudy = ""
    return ds


def _series_query(study_uid: str, patient_id: str, patient_root: bool) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    if patient_root:
        ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = ""
    ds.Modality = ""
    ds.BodyPartExamined = ""
    ds.SeriesNumber = ""
    return ds


def _study_match(ds: Dataset) -> StudyMatch | None:
    uid = str(ds.get("StudyInstanceUID", "") or "").strip()
    if not uid:
        return None
    modalities = ds.get("ModalitiesInStudy") or []
    modalities = [modalities] if isinstance(modalities, str) else list(modalities)
    return StudyMatch(uid, parse_da(ds.get("StudyDate")), frozenset(str(m) for m in modalities if m))


def _series_match(ds: Dataset) -> SeriesMatch | None:
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    if not uid:
        return None
    number = ds.get("SeriesNumber")
    try:
        series_number = int(number) if number not in (None, "") else None
    except (TypeError, ValueError):
        series_number = None
    return SeriesMatch(uid, str(ds.get("Modality", "") or ""), str(ds.get("BodyPartExamined", "") or "") or None,
                       series_number)


def _read(store: InstanceStore, relative: str) -> Dataset | None:
    try:
        return read_dataset(store.absolute(relative))
    except (OSError, DicomIOError, ValueError) as exc:
        log.warning("priors: a retrieved instance cannot be read (%s)", type(exc).__name__)
        return None


def _prior_report(store: InstanceStore, paths: Sequence[str]) -> str | None:
    """The text of the prior's report: the newest SR not written by mednode itself."""
    documents = [ds for ds in (_read(store, p) for p in paths) if ds is not None
                 and str(ds.get("SOPClassUID", "")) in SR_SOP_CLASSES and not names_mednode(ds.get("Manufacturer"))]
    documents.sort(key=lambda ds: (str(ds.get("ContentDate", "")), str(ds.get("ContentTime", ""))), reverse=True)
    return next((text for text in map(report_text, documents) if text), None)


def fetch_priors(
    current: CurrentStudy, rule: RulePriors, source: Destination, *, calling_ae_title: str,
    store: InstanceStore, area: str, storage_classes: Sequence[str], log_key: str = "",
) -> list[RetrievedPrior]:
    """Query ``source`` for the patient's prior studies and retrieve those the rule asks for.

    Parameters
    ----------
    current
        The study the job runs on (its Patient ID is the query key).
    rule
        The rule's ``priors`` settings.
    source
        The PACS, with its options (TLS, calling AE title).
    calling_ae_title
        This node's AE title, unless ``source`` names its own; the PACS must know it for C-GET.
    store, area
        Where retrieved files go: ``area`` is a relative folder of ``store`` (``priors/<job>``).
    storage_classes
        SOP classes of the images to accept (the current study's); SR classes are always added.

    Returns
    -------
    list of RetrievedPrior
        Newest first; empty when the patient has no comparable prior study.

    Raises
    ------
    PriorsUnavailableError
        The PACS refused the association, did not answer within ``rule.timeout_s``, or a query
        or retrieval failed.
    """
    ae, roles = _ae(source.calling_ae_title or calling_ae_title, rule.timeout_s, storage_classes)
    tls_args = (client_context(source.tls), source.tls.server_hostname or source.host) if source.tls else None
    receiver = _Receiver(store, area)
    assoc = ae.associate(source.host, source.port, ae_title=source.ae_title, ext_neg=roles, tls_args=tls_args,
                         evt_handlers=[(evt.EVT_C_STORE, receiver.on_store)])
    if not assoc.is_established:
        how = "rejected" if assoc.is_rejected else "not established (down, unreachable or too slow?)"
        raise PriorsUnavailableError(f"association with {source} for prior studies {how}")
    try:
        session = _Session(assoc, source, receiver)
        patient_root = session.find_model == str(PatientRootQueryRetrieveInformationModelFind)
        studies = [m for m in map(_study_match, session.find(_study_query(current, rule))) if m]
        candidates = candidate_studies(current, studies, rule)[:MAX_CANDIDATES]
        series_by_study: dict[str, list[SeriesMatch]] = {}
        chosen: list[PriorChoice] = []
        for index, study in enumerate(candidates):
            answers = session.find(_series_query(study.study_instance_uid, current.patient_id, patient_root))
            series_by_study[study.study_instance_uid] = [m for m in map(_series_match, answers) if m]
            chosen = choose(current, candidates[:index + 1], series_by_study, rule)
            if len(chosen) >= rule.count:
                break
        log.info("priors %s: %d earlier studies found, %d candidate(s), %d chosen", log_key, len(studies),
                 len(candidates), len(chosen))
        retrieved = []
        for choice in chosen:
            uid = choice.study.study_instance_uid
            images: list[Dataset] = []
            for series in choice.image_series:
                if len(images) >= rule.max_images:
                    break
                paths = session.get_series(uid, series.series_instance_uid, current.patient_id)
                found = [ds for ds in (_read(store, p) for p in paths) if ds is not None]
                found.sort(key=lambda ds: int(ds.get("InstanceNumber") or 0))
                images.extend(found[:rule.max_images - len(images)])
            report_paths = [p for s in choice.report_series
                            for p in session.get_series(uid, s.series_instance_uid, current.patient_id)]
            report = _prior_report(store, report_paths)
            if images:
                retrieved.append(RetrievedPrior(choice.study, images, report, choice.image_series))
            log.info("priors %s: study %s: %d image(s), report %s", log_key, uid, len(images),
                     "found" if report else "none")
        return retrieved
    finally:
        if assoc.is_established:
            assoc.release()
