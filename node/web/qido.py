"""QIDO-RS (PS3.18 10.6) over the index: studies, series and instances that mednode holds, and
the result objects it wrote (SR, SEG, KOS), as DICOM JSON.

Matching keys (PS3.18 Table 10.6.1-5), by keyword or tag (``PatientID`` or ``00100020``):

- study: StudyInstanceUID, PatientID, PatientName, StudyDate, AccessionNumber,
  ModalitiesInStudy, StudyDescription;
- series: those, and SeriesInstanceUID, Modality, SeriesNumber, SeriesDescription, BodyPartExamined;
- instance: those, and SOPInstanceUID, SOPClassUID, InstanceNumber.

UIDs match a list (``a,b`` or ``a\\b``); text matches exactly or with ``*``/``?`` wildcards
(PatientName case-insensitively); StudyDate an exact date or a range (``20240101-``,
``-20241231``, ``20240101-20241231``). Keys the index does not hold (StudyTime,
ReferringPhysicianName, StudyID…) are ignored with a ``Warning`` header, as PS3.18 10.6.1.3.1
allows. ``limit`` (at most :data:`MAX_LIMIT`) and ``offset`` page the answer: the instances and
series received first, then the results mednode wrote that it does not also hold as received
(a result the PACS sent back is listed once).

Patient identity (PatientName, PatientID, PatientBirthDate, PatientSex, AccessionNumber) is
returned, and may be matched on, only for a logged-in caller (:mod:`node.web.access`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydicom import Dataset
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from sqlalchemy import ColumnElement, Select, and_, func, or_, select
from sqlalchemy.orm import Session

from storage.models import Instance, Job, Patient, Result, Series, Study

Level = Literal["study", "series", "instance"]
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

STUDY_KEYS = frozenset({"StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "AccessionNumber",
                        "ModalitiesInStudy", "StudyDescription"})
SERIES_KEYS = STUDY_KEYS | {"SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined"}
INSTANCE_KEYS = SERIES_KEYS | {"SOPInstanceUID", "SOPClassUID", "InstanceNumber"}
MATCHABLE: dict[str, frozenset[str]] = {"study": STUDY_KEYS, "series": SERIES_KEYS, "instance": INSTANCE_KEYS}
#: returned and matched only for a caller who may see the patient's identity
IDENTITY_KEYS = frozenset({"PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber"})
#: query parameters that are not attributes (PS3.18 Table 8.3.4-1)
CONTROL_PARAMETERS = frozenset({"limit", "offset", "includefield", "fuzzymatching", "accept", "charset"})

_DATE = re.compile(r"^\d{8}$")
_KOS = "1.2.840.10008.5.1.4.1.1.88.59"
_SEG = "1.2.840.10008.5.1.4.1.1.66.4"
_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


class QidoRequestError(ValueError):
    """The query cannot be answered as asked (HTTP 400); the message says which parameter."""


class IdentityQueryError(PermissionError):
    """The query matches on patient identity, which needs a login (HTTP 401)."""


@dataclass(frozen=True)
class QidoQuery:
    level: Level
    #: keyword → the value to match (validated)
    filters: dict[str, str] = field(default_factory=dict)
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    #: matching keys given but not supported at this level (ignored, named in a Warning header)
    ignored: tuple[str, ...] = ()


def _keyword(name: str) -> str | None:
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        try:
            return keyword_for_tag(int(name, 16)) or None
        except (KeyError, ValueError):
            return None
    return name if tag_for_keyword(name) is not None else None


def parse_query(level: Level, params: Sequence[tuple[str, str]], *, identity: bool,
                study_uid: str | None = None, series_uid: str | None = None) -> QidoQuery:
    """Read QIDO-RS query parameters into a :class:`QidoQuery`.

    Raises
    ------
    QidoRequestError
        If a parameter is neither an attribute nor a control parameter, or a value is malformed
        (a date, a number, limit/offset).
    IdentityQueryError
        If the query matches on patient identity and ``identity`` is false.
    """
    filters: dict[str, str] = {}
    ignored: list[str] = []
    limit, offset = DEFAULT_LIMIT, 0
    for name, value in params:
        lowered = name.lower()
        if lowered == "limit":
            limit = _integer(name, value, 1, MAX_LIMIT)
        elif lowered == "offset":
            offset = _integer(name, value, 0, None)
        elif lowered in CONTROL_PARAMETERS:
            continue  # includefield: every attribute mednode has is returned anyway
        else:
            keyword = _keyword(name)
            if keyword is None:
                raise QidoRequestError(f"{name!r} is neither a DICOM attribute (keyword or tag) nor a QIDO-RS "
                                       f"parameter ({', '.join(sorted(CONTROL_PARAMETERS))})")
            if not value:  # an empty value is universal matching: return the attribute
                continue
            if keyword not in MATCHABLE[level]:
                ignored.append(keyword)
                continue
            if keyword in IDENTITY_KEYS and not identity:
                raise IdentityQueryError(f"matching on {keyword} needs a login")
            filters[keyword] = _checked(keyword, value)
    if study_uid is not None:
        filters["StudyInstanceUID"] = study_uid
    if series_uid is not None:
        filters["SeriesInstanceUID"] = series_uid
    return QidoQuery(level, filters, limit, offset, tuple(dict.fromkeys(ignored)))


def _integer(name: str, value: str, low: int, high: int | None) -> int:
    try:
        number = int(value)
    except ValueError:
        raise QidoRequestError(f"{name}: an integer is expected, got {value!r}") from None
    if number < low or (high is not None and number > high):
        raise QidoRequestError(f"{name}: must be {low}..{high}" if high else f"{name}: must be at least {low}")
    return number


def _checked(keyword: str, value: str) -> str:
    if keyword == "StudyDate":
        first, dash, last = value.partition("-")
        if not all(_DATE.match(d) for d in (first, last) if d) or (not first and not last) \
                or (not dash and not first):
            raise QidoRequestError(f"StudyDate: YYYYMMDD or a range YYYYMMDD-YYYYMMDD, got {value!r}")
    elif keyword in ("SeriesNumber", "InstanceNumber"):
        _integer(keyword, value, -(2**31), 2**31 - 1)
    return value


# -- matching ---------------------------------------------------------------------------------------
def _uids(value: str) -> list[str]:
    return [v.strip() for v in re.split(r"[,\\]", value) if v.strip()]


def _text(column: Any, value: str, *, fold: bool = False) -> ColumnElement[bool]:
    if fold:
        column, value = func.lower(column), value.lower()
    if "*" in value or "?" in value:
        escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = escaped.replace("*", "%").replace("?", "_")
        return column.like(pattern, escape="\\")
    return column == value  # type: ignore[no-any-return]


def _date(column: Any, value: str) -> ColumnElement[bool]:
    first, dash, last = value.partition("-")
    if not dash:
        return column == value  # type: ignore[no-any-return]
    conditions = [column >= first] if first else []
    conditions += [column <= last] if last else []
    return and_(*conditions)


def matches_text(value: str | None, pattern: str, *, fold: bool = False) -> bool:
    """The in-memory twin of the SQL text matching, for attributes read from result files."""
    if value is None:
        return False
    if fold:
        value, pattern = value.lower(), pattern.lower()
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, flags=re.DOTALL) is not None


def result_modality(sop_class_uid: str) -> str:
    """The Modality of an object mednode wrote, from its SOP Class: SEG, KO or SR."""
    if sop_class_uid == _SEG:
        return "SEG"
    if sop_class_uid == _KOS:
        return "KO"
    return "SR" if sop_class_uid.startswith(_SR_PREFIX) else "OT"


def _result_modality_condition(modalities: list[str]) -> ColumnElement[bool]:
    conditions: list[ColumnElement[bool]] = []
    if "SEG" in modalities:
        conditions.append(Result.sop_class_uid == _SEG)
    if "KO" in modalities:
        conditions.append(Result.sop_class_uid == _KOS)
    if "SR" in modalities:
        conditions.append(and_(Result.sop_class_uid.like(_SR_PREFIX + "%"), Result.sop_class_uid != _KOS))
    return or_(*conditions) if conditions else Result.id.is_(None)


def _study_conditions(filters: dict[str, str]) -> list[ColumnElement[bool]]:
    """Conditions on Study (and Patient, outer-joined) for the study-level keys."""
    c: list[ColumnElement[bool]] = []
    if "StudyInstanceUID" in filters:
        c.append(Study.study_instance_uid.in_(_uids(filters["StudyInstanceUID"])))
    if "StudyDate" in filters:
        c.append(_date(Study.study_date, filters["StudyDate"]))
    if "AccessionNumber" in filters:
        c.append(_text(Study.accession_number, filters["AccessionNumber"]))
    if "StudyDescription" in filters:
        c.append(_text(Study.study_description, filters["StudyDescription"], fold=True))
    if "PatientID" in filters:
        c.append(_text(Patient.patient_id, filters["PatientID"]))
    if "PatientName" in filters:
        c.append(_text(Patient.patient_name, filters["PatientName"], fold=True))
    if "ModalitiesInStudy" in filters:
        modalities = _uids(filters["ModalitiesInStudy"])
        c.append(or_(
            Study.id.in_(select(Series.study_pk).where(Series.modality.in_(modalities))),
            Study.id.in_(select(Job.study_pk).join(Result, Result.job_pk == Job.id)
                         .where(_result_modality_condition(modalities))),
        ))
    return c


def _series_conditions(filters: dict[str, str]) -> list[ColumnElement[bool]]:
    c: list[ColumnElement[bool]] = []
    if "SeriesInstanceUID" in filters:
        c.append(Series.series_instance_uid.in_(_uids(filters["SeriesInstanceUID"])))
    if "Modality" in filters:
        c.append(Series.modality.in_(_uids(filters["Modality"])))
    if "SeriesNumber" in filters:
        c.append(Series.series_number == int(filters["SeriesNumber"]))
    if "SeriesDescription" in filters:
        c.append(_text(Series.series_description, filters["SeriesDescription"], fold=True))
    if "BodyPartExamined" in filters:
        c.append(_text(Series.body_part_examined, filters["BodyPartExamined"], fold=True))
    return c


def _instance_conditions(filters: dict[str, str]) -> list[ColumnElement[bool]]:
    c: list[ColumnElement[bool]] = []
    if "SOPInstanceUID" in filters:
        c.append(Instance.sop_instance_uid.in_(_uids(filters["SOPInstanceUID"])))
    if "SOPClassUID" in filters:
        c.append(Instance.sop_class_uid.in_(_uids(filters["SOPClassUID"])))
    if "InstanceNumber" in filters:
        c.append(Instance.instance_number == int(filters["InstanceNumber"]))
    return c


# -- answers ----------------------------------------------------------------------------------------
#: reads the header of a result file mednode wrote (by its store path), pixel data left out
HeaderReader = Callable[[str], Dataset]


def _set(ds: Dataset, keyword: str, value: Any) -> None:
    setattr(ds, keyword, value if value is not None else "")


def _study_attributes(ds: Dataset, study: Study, identity: bool) -> None:
    ds.SpecificCharacterSet = "ISO_IR 192"  # DICOM JSON is UTF-8
    _set(ds, "StudyInstanceUID", study.study_instance_uid)
    _set(ds, "StudyDate", study.study_date)
    _set(ds, "StudyDescription", study.study_description)
    if identity:
        patient = study.patient
        _set(ds, "AccessionNumber", study.accession_number)
        _set(ds, "PatientName", patient.patient_name if patient else None)
        _set(ds, "PatientID", patient.patient_id if patient else None)
        _set(ds, "PatientBirthDate", patient.patient_birth_date if patient else None)
        _set(ds, "PatientSex", patient.patient_sex if patient else None)


def _study_query(filters: dict[str, str]) -> Select[Any]:
    return select(Study).outerjoin(Patient, Study.patient_pk == Patient.id).where(*_study_conditions(filters))


def _results_of(session: Session, filters: dict[str, str], *, series: bool) -> list[Result]:
    """Results mednode wrote that match the study-, series- and instance-level UID keys, and that
    the index does not also hold as received instances; Modality from the SOP Class."""
    query = (select(Result).join(Job, Result.job_pk == Job.id).join(Study, Job.study_pk == Study.id)
             .outerjoin(Patient, Study.patient_pk == Patient.id)
             .where(*_study_conditions(filters),
                    ~Result.sop_instance_uid.in_(select(Instance.sop_instance_uid)))
             .order_by(Result.id))
    if series:  # a series the index holds is listed with it (counted there)
        query = query.where(~Result.series_instance_uid.in_(select(Series.series_instance_uid)))
    if "SeriesInstanceUID" in filters:
        query = query.where(Result.series_instance_uid.in_(_uids(filters["SeriesInstanceUID"])))
    if "SOPInstanceUID" in filters:
        query = query.where(Result.sop_instance_uid.in_(_uids(filters["SOPInstanceUID"])))
    if "SOPClassUID" in filters:
        query = query.where(Result.sop_class_uid.in_(_uids(filters["SOPClassUID"])))
    if "Modality" in filters:
        query = query.where(_result_modality_condition(_uids(filters["Modality"])))
    return list(session.scalars(query))


def _header_matches(header: Dataset, filters: dict[str, str]) -> bool:
    for keyword in ("SeriesNumber", "InstanceNumber"):
        if keyword in filters and str(header.get(keyword, "")).strip() != str(int(filters[keyword])):
            return False
    for keyword in ("SeriesDescription", "BodyPartExamined"):
        if keyword in filters and not matches_text(str(header.get(keyword, "") or "") or None,
                                                   filters[keyword], fold=True):
            return False
    return True


def _page(session: Session, query: Select[Any], offset: int, limit: int,
          extra: Callable[[], list[Any]]) -> list[Any]:
    """Rows of ``query`` from ``offset``, then ``extra()`` rows after them, ``limit`` in all."""
    total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery())) or 0
    rows = list(session.scalars(query.offset(offset).limit(limit))) if offset < total else []
    if len(rows) < limit:
        rows += extra()[max(0, offset - total):max(0, offset - total) + limit - len(rows)]
    return rows


def search(session: Session, query: QidoQuery, read_header: HeaderReader, *, identity: bool) -> list[Dataset]:
    """Answer ``query`` from the index: one data set per study, series or instance."""
    f = query.filters
    if query.level == "study":
        studies = list(session.scalars(_study_query(f).order_by(Study.id).offset(query.offset).limit(query.limit)))
        counts = _study_counts(session, [study.id for study in studies])
        return [_study_answer(study, identity, counts[study.id]) for study in studies]
    if query.level == "series":
        acquired = (select(Series).join(Study, Series.study_pk == Study.id)
                    .outerjoin(Patient, Study.patient_pk == Patient.id)
                    .where(*_study_conditions(f), *_series_conditions(f)).order_by(Series.id))

        def result_series() -> list[Any]:
            if any(k in f for k in ("SOPInstanceUID", "SOPClassUID", "InstanceNumber")):
                return []
            grouped: dict[str, list[Result]] = {}
            for result in _results_of(session, f, series=True):
                grouped.setdefault(result.series_instance_uid, []).append(result)
            out = []
            for results in grouped.values():
                header = read_header(results[0].path)
                if _header_matches(header, f):
                    out.append((results, header))
            return out

        rows = _page(session, acquired, query.offset, query.limit, result_series)
        sizes = _series_sizes(session, [r.id for r in rows if isinstance(r, Series)])
        return [_series_answer(r, identity, sizes.get(r.id, 0)) if isinstance(r, Series)
                else _result_series_answer(r[0], r[1], identity) for r in rows]
    acquired_instances = (select(Instance).join(Series, Instance.series_pk == Series.id)
                          .join(Study, Series.study_pk == Study.id)
                          .outerjoin(Patient, Study.patient_pk == Patient.id)
                          .where(*_study_conditions(f), *_series_conditions(f), *_instance_conditions(f))
                          .order_by(Instance.id))

    def result_instances() -> list[Any]:
        out = []
        for result in _results_of(session, f, series=False):
            header = read_header(result.path)
            if _header_matches(header, f):
                out.append((result, header))
        return out

    rows = _page(session, acquired_instances, query.offset, query.limit, result_instances)
    return [_instance_answer(r, identity) if isinstance(r, Instance) else _result_instance_answer(r[0], r[1], identity)
            for r in rows]


@dataclass
class _StudyCounts:
    modalities: set[str] = field(default_factory=set)
    series_uids: set[str] = field(default_factory=set)
    instances: int = 0


def _study_counts(session: Session, study_ids: list[int]) -> dict[int, _StudyCounts]:
    """Modalities, series and instance counts of each study, results mednode wrote included
    (three aggregate queries for a page, not one row per instance)."""
    counts = {study_id: _StudyCounts() for study_id in study_ids}
    if not study_ids:
        return counts
    for study_id, uid, modality in session.execute(
            select(Series.study_pk, Series.series_instance_uid, Series.modality).where(Series.study_pk.in_(study_ids))):
        counts[study_id].series_uids.add(uid)
        if modality:
            counts[study_id].modalities.add(modality)
    for study_id, number in session.execute(
            select(Series.study_pk, func.count(Instance.id)).join(Instance, Instance.series_pk == Series.id)
            .where(Series.study_pk.in_(study_ids)).group_by(Series.study_pk)):
        counts[study_id].instances += int(number)
    for study_id, series_uid, sop_class in session.execute(
            select(Job.study_pk, Result.series_instance_uid, Result.sop_class_uid).join(Result, Result.job_pk == Job.id)
            .where(Job.study_pk.in_(study_ids), ~Result.sop_instance_uid.in_(select(Instance.sop_instance_uid)))):
        counts[study_id].series_uids.add(series_uid)
        counts[study_id].modalities.add(result_modality(sop_class))
        counts[study_id].instances += 1
    return counts


def _series_sizes(session: Session, series_ids: list[int]) -> dict[int, int]:
    if not series_ids:
        return {}
    rows = session.execute(select(Instance.series_pk, func.count(Instance.id))
                           .where(Instance.series_pk.in_(series_ids)).group_by(Instance.series_pk))
    return {series_id: int(number) for series_id, number in rows}


def _study_answer(study: Study, identity: bool, counts: _StudyCounts) -> Dataset:
    ds = Dataset()
    _study_attributes(ds, study, identity)
    ds.ModalitiesInStudy = sorted(counts.modalities)
    ds.NumberOfStudyRelatedSeries = len(counts.series_uids)
    ds.NumberOfStudyRelatedInstances = counts.instances
    ds.InstanceAvailability = "ONLINE"
    return ds


def _series_answer(series: Series, identity: bool, size: int | None = None) -> Dataset:
    ds = Dataset()
    _study_attributes(ds, series.study, identity)
    _set(ds, "SeriesInstanceUID", series.series_instance_uid)
    _set(ds, "Modality", series.modality)
    _set(ds, "SeriesNumber", series.series_number)
    _set(ds, "SeriesDescription", series.series_description)
    _set(ds, "BodyPartExamined", series.body_part_examined)
    if size is not None:
        ds.NumberOfSeriesRelatedInstances = size
    ds.InstanceAvailability = "ONLINE"
    return ds


def _result_series_answer(results: list[Result], header: Dataset, identity: bool) -> Dataset:
    ds = Dataset()
    _study_attributes(ds, results[0].job.study, identity)
    _set(ds, "SeriesInstanceUID", results[0].series_instance_uid)
    _set(ds, "Modality", result_modality(results[0].sop_class_uid))
    _set(ds, "SeriesNumber", header.get("SeriesNumber"))
    _set(ds, "SeriesDescription", header.get("SeriesDescription"))
    ds.NumberOfSeriesRelatedInstances = len(results)
    ds.InstanceAvailability = "ONLINE"
    return ds


def _instance_answer(instance: Instance, identity: bool) -> Dataset:
    ds = _series_answer(instance.series, identity)
    _set(ds, "SOPClassUID", instance.sop_class_uid)
    _set(ds, "SOPInstanceUID", instance.sop_instance_uid)
    _set(ds, "InstanceNumber", instance.instance_number)
    return ds


def _result_instance_answer(result: Result, header: Dataset, identity: bool) -> Dataset:
    ds = _result_series_answer([result], header, identity)
    del ds.NumberOfSeriesRelatedInstances
    _set(ds, "SOPClassUID", result.sop_class_uid)
    _set(ds, "SOPInstanceUID", result.sop_instance_uid)
    _set(ds, "InstanceNumber", header.get("InstanceNumber"))
    return ds


def to_json(datasets: list[Dataset]) -> list[dict[str, Any]]:
    """DICOM JSON (PS3.18 F.2), attributes in tag order."""
    return [ds.to_json_dict() for ds in datasets]

