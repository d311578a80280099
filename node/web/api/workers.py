"""``/api/v1/workers``: online Celery workers, their queues and current tasks."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from node.web import system
from node.web.deps import SettingsDep
from node.web.schemas import WorkersOut

router = APIRouter(prefix="/workers", tags=["workers"])


@router.get("", response_model=WorkersOut)
async def list_workers(settings: SettingsDep) -> WorkersOut:
    return await run_in_threadpool(system.inspect_workers, settings)
