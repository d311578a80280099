"""Sending result objects to a DICOMweb archive by STOW-RS (PS3.18 10.5), and checking it.

The counterpart of :mod:`node.delivery` for :class:`~node.config.DicomWebDestination`, with the
same vocabulary: every file gets a :class:`~node.delivery.SendStatus` whose ``outcome`` says
whether a retry can help, and a failure of the whole request raises
:class:`~node.delivery.TransientDeliveryError` or :class:`~node.delivery.PermanentDeliveryError`.

How an answer is read (:func:`request_outcome`, :func:`instance_status`):

- no answer (connection refused or reset, a timeout), HTTP 5xx, 408 and 429: transient;
- any other 4xx for the whole request (400, 401, 403, 404, 413, 415…): the archive refused it
  for good, with the HTTP status in the reason (401/403 name the credentials);
- 200, 202 or 409 with a STOW-RS response: each instance by its own entry — in the Referenced SOP
  Sequence it is stored (with a Warning Reason, a warning); in the Failed SOP Sequence its
  Failure Reason is a C-STORE status, classified as one (0xA7xx out of resources: transient;
  0xA900, 0xC000, 0x0110…: permanent, the code and its meaning in the reason).

dicomweb-client's own HTTP retries are turned off: the delivery queue's backoff and give-up time
apply, as for C-STORE.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any

import requests
from pydicom import Dataset, dcmread

from node.config import DicomWebDestination, DicomWebSettings
from node.delivery import (
    EchoResult,
    Outcome,
    PermanentDeliveryError,
    SendStatus,
    TransientDeliveryError,
)

log = logging.getLogger(__name__)

#: HTTP statuses of a whole request worth trying again later (besides every 5xx)
TRANSIENT_HTTP = frozenset({HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS})
#: Objects per STOW-RS request when several are sent at once (``mednode send``)
BATCH_SIZE = 50


def request_outcome(http_status: int) -> Outcome:
    """What an HTTP status of a whole STOW-RS request means (PS3.18 10.5.3).

    200, 202 and 409 carry a per-instance answer (:func:`instance_status` decides); 5xx, 408
    and 429 are transient; every other status is a permanent refusal of the request.
    """
    if http_status in (200, 202, 409):
        return Outcome.SUCCESS
    if http_status >= 500 or http_status in TRANSIENT_HTTP:
        return Outcome.TRANSIENT
    return Outcome.PERMANENT


def http_refusal(http_status: int, reason: str | None = None) -> str:
    """``HTTP 401 Unauthorized`` with what to check, for a delivery's reason."""
    try:
        words = reason or HTTPStatus(http_status).phrase
    except ValueError:
        words = reason or "error"
    text = f"HTTP {http_status} {words}"
    if http_status in (401, 403):
        text += " (check the destination's dicomweb auth, token or username/password)"
    elif http_status == 404:
        text += " (check the destination's dicomweb url: the service root, before /studies)"
    return text


def instance_status(response: Dataset | None, path: Path, sop_instance_uid: str, http_status: int) -> SendStatus:
    """One instance's answer in a STOW-RS response data set (PS3.18 Table 10.5.3-1).

    An instance in the Failed SOP Sequence gets its Failure Reason as a C-STORE status
    (:func:`node.delivery.classify_status`); one in the Referenced SOP Sequence is stored (a
    warning when it has a Warning Reason). An instance named in neither: stored when the
    request answered 200 (some archives answer 200 with an empty body), else a processing
    failure.
    """
    response = response if response is not None else Dataset()
    for item in response.get("FailedSOPSequence", []) or []:
        if str(item.get("ReferencedSOPInstanceUID", "")) == sop_instance_uid:
            reason = item.get("FailureReason")
            code = int(reason) if reason is not None else 0x0110
            return SendStatus(path, sop_instance_uid, code, f"HTTP {http_status}, STOW-RS Failure Reason")
    for item in response.get("ReferencedSOPSequence", []) or []:
        if str(item.get("ReferencedSOPInstanceUID", "")) == sop_instance_uid:
            warning = item.get("WarningReason")
            if warning is not None:
                return SendStatus(path, sop_instance_uid, int(warning), "STOW-RS Warning Reason")
            return SendStatus(path, sop_instance_uid, 0x0000)
    if http_status == 200:
        return SendStatus(path, sop_instance_uid, 0x0000)
    return SendStatus(path, sop_instance_uid, None,
                      f"HTTP {http_status}: the archive's answer does not name this instance",
                      Outcome.PERMANENT)


def make_session(settings: DicomWebSettings) -> requests.Session:
    """A ``requests`` session carrying the destination's credentials and CA bundle."""
    session = requests.Session()
    if settings.auth == "basic":
        assert settings.username is not None and settings.password is not None
        session.auth = (settings.username, settings.password.get_secret_value())
    elif settings.auth == "bearer":
        assert settings.token is not None
        session.headers["Authorization"] = f"Bearer {settings.token.get_secret_value()}"
    if settings.ca_file is not None:
        session.verify = str(settings.ca_file)
    return session


def make_client(settings: DicomWebSettings) -> Any:
    """A ``dicomweb_client.DICOMwebClient`` for the archive, without its own HTTP retries."""
    from dicomweb_client import DICOMwebClient

    client = DICOMwebClient(settings.url, session=make_session(settings), timeout=settings.timeout_s)
    client.set_http_retry_params(retry=False)
    return client


def _post(client: Any, datasets: Sequence[Dataset], url: str) -> tuple[int, Dataset | None]:
    """POST the data sets; return the HTTP status and the STOW-RS response data set, if any.

    Raises
    ------
    TransientDeliveryError, PermanentDeliveryError
        As :func:`request_outcome` says for a status without a per-instance answer, or when no
        answer came.
    """
    try:
        return 200, client.store_instances(datasets)
    except requests.HTTPError as exc:
        response = exc.response
        status = response.status_code if response is not None else 0
        outcome = request_outcome(status)
        if outcome is Outcome.SUCCESS and response is not None:  # 409 (or 202): read the instances
            return status, _response_dataset(response)
        words = http_refusal(status, response.reason if response is not None else None)
        if outcome is Outcome.PERMANENT:
            raise PermanentDeliveryError(f"STOW-RS to {url} refused: {words}") from None
        raise TransientDeliveryError(f"STOW-RS to {url}: {words}") from None
    except requests.Timeout:
        raise TransientDeliveryError(f"STOW-RS to {url}: no answer within the timeout") from None
    except requests.ConnectionError as exc:
        raise TransientDeliveryError(
            f"STOW-RS to {url}: cannot connect ({type(exc).__name__}; archive down or unreachable?)"
        ) from None
    except requests.RequestException as exc:
        raise TransientDeliveryError(f"STOW-RS to {url}: {type(exc).__name__}") from None


def _response_dataset(response: requests.Response) -> Dataset | None:
    """The STOW-RS response of a 409/202 as a data set (DICOM JSON); None when it has none."""
    if not response.content or "json" not in response.headers.get("Content-Type", ""):
        return None
    try:
        return Dataset.from_json(response.json())
    except ValueError:
        return None


def send_files(
    destination: DicomWebDestination,
    paths: Sequence[Path],
    *,
    progress: Callable[[SendStatus], None] | None = None,
) -> list[SendStatus]:
    """STOW-RS ``paths`` to ``destination``, :data:`BATCH_SIZE` per request.

    Raises
    ------
    PermanentDeliveryError
        If the archive refused a request for good (HTTP 4xx other than 408/409/429).
    TransientDeliveryError
        If it could not be reached, timed out or answered 5xx, 408 or 429.
    """
    client = make_client(destination.dicomweb)
    statuses: list[SendStatus] = []
    for start in range(0, len(paths), BATCH_SIZE):
        batch = [Path(p) for p in paths[start:start + BATCH_SIZE]]
        datasets = [dcmread(p) for p in batch]
        http_status, response = _post(client, datasets, destination.dicomweb.url)
        for path, ds in zip(batch, datasets, strict=True):
            result = instance_status(response, path, str(ds.SOPInstanceUID), http_status)
            statuses.append(result)
            if progress is not None:
                progress(result)
    return statuses


def echo(destination: DicomWebDestination) -> EchoResult:
    """Check the archive answers with these credentials: a QIDO-RS study search for one study.

    ``status`` is the HTTP status (None when no answer came).
    """
    settings = destination.dicomweb
    session = make_session(settings)
    started = time.perf_counter()
    try:
        response = session.get(f"{settings.url}/studies", params={"limit": "1"},
                               headers={"Accept": "application/dicom+json"}, timeout=settings.timeout_s)
    except requests.RequestException as exc:
        return EchoResult(destination, False, None, time.perf_counter() - started,
                          f"cannot connect ({type(exc).__name__})")
    finally:
        session.close()
    elapsed = time.perf_counter() - started
    ok = response.status_code in (200, 204)
    return EchoResult(destination, ok, response.status_code, elapsed,
                      None if ok else http_refusal(response.status_code, response.reason))

