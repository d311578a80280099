"""The JSON API under ``/api/v1``: one router per resource."""

from __future__ import annotations

from fastapi import APIRouter

from node.web.api import audit, destinations, jobs, results, rules, status, studies, workers

router = APIRouter(prefix="/api/v1")
for module in (status, jobs, studies, results, rules, destinations, workers, audit):
    router.include_router(module.router)
