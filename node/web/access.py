"""Who may see patient-derived content, and the audit row each look at it leaves.

Patient-derived content is everything taken from, or drawn on, a patient's data: patient name,
ID, birth date, sex, accession number; study and series dates, descriptions and body parts; job
failure reasons (they can quote an attribute value); the questions asked and the tasks of
on-demand jobs; result summaries (report and answer text, findings, labels, volumes); key-image
PNGs and their labels; rule dry runs (their reasons quote attribute values); result DICOM files.
What is left for anyone: counts, states, UIDs, modalities, AE titles, rule names, times the node
itself recorded.

The gate (:attr:`Access.patient_data`):

- **Reachable from other hosts** (``web_host`` not loopback): only a logged-in caller (session,
  API token, HTTP Basic) sees patient-derived content.
- **Loopback with a login configured** (``web_admin_user`` or ``web_api_tokens``): the same gate.
  A dashboard on loopback is often published by a reverse proxy on the same host, where every
  request comes from 127.0.0.1; an administrator who set up a login expects it to protect the
  data wherever the node listens.
- **Loopback without any login**: nobody could log in, so the single-user workstation keeps
  today's view (descriptions, dates, results, key images) — but still not the patient's
  identity (name, ID, birth date, accession) nor DICOM downloads, which need a login anywhere.
  Those views are audited under the actor ``anonymous``.

Every response that carries patient-derived content writes an audit row (:mod:`node.audit`),
grouped so that a page refreshing itself or loading several key images writes one row per look.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from node import audit
from node.context import NodeContext
from node.web.auth import AuthConfig, Principal, PrincipalDep, _is_loopback

#: The actor of patient-data views on an open loopback dashboard (no login configured).
ANONYMOUS_ACTOR = "anonymous"


def patient_data_gated(web_host: str, auth: AuthConfig) -> bool:
    """Whether patient-derived content needs a login on this node (see the module docstring)."""
    return not _is_loopback(web_host) or auth.login_enabled or bool(auth.api_tokens)


@dataclass(frozen=True)
class Access:
    """What the caller of one request may see, and how to name them in the audit trail."""

    principal: Principal
    #: dates, descriptions, result text, key images (see the module docstring)
    patient_data: bool
    #: channel of the request, for the audit detail: ``dashboard`` (a browser session) or
    #: ``api (token)``, ``api (basic)``
    channel: str

    @property
    def identity(self) -> bool:
        """Patient name, ID, birth date, sex, accession number, DICOM files: a login, always."""
        return self.principal.is_admin

    @property
    def actor(self) -> str:
        return self.principal.user or ANONYMOUS_ACTOR

    def audit_view(self, ctx: NodeContext, study_uid: str | None, what: str, uids: Iterable[str] = (),
                   *, action: str = audit.VIEWED) -> None:
        """One grouped audit row: ``<channel>: <what> [<uids>]`` (identifiers only, never values)."""
        listed = ", ".join(uids)
        detail = f"{self.channel}: {what}" + (f" [{listed}]" if listed else "")
        audit.record_view(ctx.sessions, self.actor, study_uid, detail, action=action)

    def audit_download(self, ctx: NodeContext, study_uid: str | None, what: str) -> None:
        """One audit row per download: never grouped."""
        audit.record(ctx.sessions, self.actor, audit.DOWNLOADED, study_uid, f"{self.channel}: {what}")


def current_access(request: Request, principal: PrincipalDep) -> Access:
    gated: bool = request.app.state.patient_data_gated
    api = request.url.path.startswith("/api/")
    if principal.via == "session":  # a browser, whether the page or its key images
        channel = "dashboard"
    elif principal.via == "anonymous":
        channel = "api" if api else "dashboard"
    else:
        channel = f"{'api' if api else 'dashboard'} ({principal.via})"
    return Access(principal, principal.is_admin or not gated, channel)


AccessDep = Annotated[Access, Depends(current_access)]


def require_patient_data(access: AccessDep) -> Access:
    """Dependency of endpoints that only serve patient-derived content (key images, dry runs): 401."""
    if not access.patient_data:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "this is patient-derived content: log in first (POST /login in a browser, or send "
            "Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return access


def require_identity(access: AccessDep) -> Access:
    """Dependency of downloads that carry the patient's identity (DICOM files): 401 without a login.

    No CSRF check: a GET changes nothing.
    """
    if not access.identity:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "this file carries the patient's identity: log in first (POST /login in a browser, or "
            "send Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return access


PatientDataDep = Annotated[Access, Depends(require_patient_data)]
IdentityDep = Annotated[Access, Depends(require_identity)]
