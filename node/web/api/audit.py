"""``/api/v1/audit``: the audit trail (received, sent, viewed, manual actions), for administrators.

Reading it needs a login (session cookie, API token or HTTP Basic) but no CSRF token: it changes
nothing. Events name studies by UID and actors by user name or AE title, never a patient.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, status
from pydantic import BaseModel, ConfigDict

from node import audit
from node.web.auth import Principal, PrincipalDep
from node.web.deps import SessionDep

router = APIRouter(prefix="/audit", tags=["audit"])


def require_admin_read(principal: PrincipalDep) -> Principal:
    """Dependency of admin-only reads: 401 without a login (no CSRF check: a GET changes nothing)."""
    if not principal.is_admin:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "the audit trail needs a login: POST /login (browser) or send Authorization: Bearer <token>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return principal


AdminReadDep = Annotated[Principal, Depends(require_admin_read)]


class AuditEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    actor: str
    action: str
    study_instance_uid: str | None
    detail: str | None


class AuditListOut(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[AuditEventOut]


def audit_filter(
    action: Annotated[str | None, Query(max_length=50)] = None,
    actor: Annotated[str | None, Query(max_length=100)] = None,
    study_uid: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[datetime | None, Query(description="ISO 8601, inclusive")] = None,
    until: Annotated[datetime | None, Query(description="ISO 8601, exclusive")] = None,
) -> audit.AuditFilter:
    return audit.AuditFilter(action=action or None, actor=actor or None, study_uid=study_uid or None,
                             since=since, until=until)


@router.get("", response_model=AuditListOut)
def list_audit_events(
    session: SessionDep,
    principal: AdminReadDep,
    flt: Annotated[audit.AuditFilter, Depends(audit_filter)],
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0),
) -> AuditListOut:
    """Audit events, newest first."""
    rows, total = audit.list_events(session, flt, limit=limit, offset=offset)
    return AuditListOut(total=total, limit=limit, offset=offset,
                        items=[AuditEventOut.model_validate(r) for r in rows])
