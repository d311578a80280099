"""``/api/v1/destinations``: configured peers and C-ECHO on demand."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from starlette.concurrency import run_in_threadpool

from node.web import actions, system
from node.web.auth import AdminDep
from node.web.deps import ContextDep, SettingsDep
from node.web.schemas import DestinationOut, EchoOut

router = APIRouter(prefix="/destinations", tags=["destinations"])


@router.get("", response_model=list[DestinationOut])
def list_destinations(settings: SettingsDep) -> list[DestinationOut]:
    return system.destinations_out(settings)


@router.post("/{name}/echo", response_model=EchoOut)
async def echo(ctx: ContextDep, settings: SettingsDep, name: str, principal: AdminDep) -> EchoOut:
    """C-ECHO the destination now; the answer has its status and round-trip latency."""
    out = await run_in_threadpool(system.echo_destination, settings, name)
    if out is None:
        raise HTTPException(404, f"no destination named {name!r}")
    actions.audit(ctx.sessions, principal.user or "?", "echo", None,
                  f"{name}: {'ok' if out.ok else 'failed'} {out.latency_ms} ms")
    return out
