"""The FastAPI application: dashboard pages, ``/api/v1``, health, readiness and metrics.

Pages are server-rendered Jinja2 templates with a little CSS and one small script that refreshes
parts of a page by itself; there is no front-end build. The JSON API under ``/api/v1`` does
everything the pages do (OpenAPI at ``/api/v1/openapi.json``, docs at ``/api/docs``). Response
schemas carry UIDs, states and counts; patient-derived fields only for a caller allowed to see
them (:mod:`node.web.access`), and every such view is audited.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from sqlalchemy import text

from node import context
from node.config import Settings
from node.ingest import Ingestor
from node.jobs import InvalidTransitionError, JobNotFoundError
from node.web import actions, api, dicomweb, pages
from node.web.access import patient_data_gated
from node.web.auth import AuthConfig
from node.web.collector import IndexCollector
from node.web.deps import SessionDep
from node.web.ratelimit import LoginLimiter

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent


def _metrics_registries() -> list[CollectorRegistry]:
    """The process's own metrics (or all processes' when ``PROMETHEUS_MULTIPROC_DIR`` is set)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return [registry]
    return [REGISTRY]


def _error(request: Request, status_code: int, detail: Any, headers: dict[str, str] | None = None) -> Response:
    if request.url.path.startswith("/api/") or "text/html" not in request.headers.get("accept", ""):
        return JSONResponse({"detail": detail}, status_code=status_code, headers=headers)
    return pages.error_page(request, status_code, str(detail), headers)


def create_app(settings: Settings, ingestor: Ingestor | None = None) -> FastAPI:
    """Build the web application of a node.

    ``ingestor`` stores what STOW-RS receives: the listener's own under ``mednode serve`` (one
    index lock for both); without it, one is made on the first STOW-RS request.

    Raises
    ------
    node.web.auth.WebConfigError
        When bound to a non-loopback address without a real ``web_secret_key``.
    """
    context.configure_if_needed(settings)
    app = FastAPI(
        title="mednode",
        version="0.1.0",
        description="DICOM processing node: queue, studies, results, rules, destinations, workers.",
        docs_url="/api/docs",
        redoc_url=None,
        openapi_url="/api/v1/openapi.json",
    )
    app.state.settings = settings
    app.state.ingestor = ingestor
    app.state.auth = AuthConfig.from_settings(settings)
    app.state.patient_data_gated = patient_data_gated(settings.web_host, app.state.auth)
    app.state.login_limiter = LoginLimiter(
        settings.web_login_max_failures, settings.web_login_window_s, settings.web_login_lockout_s,
        settings.web_login_max_lockout_s)
    app.state.trusted_proxies = tuple(settings.web_trusted_proxies)
    if app.state.auth.secret_is_ephemeral:
        log.info("web_secret_key is not set: sessions last until this process restarts")
    index_registry = CollectorRegistry(auto_describe=False)
    index_registry.register(IndexCollector(lambda: context.current().sessions()))

    # -- errors: JSON for the API, a page for browsers ----------------------------------------
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _error(request, exc.status_code, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": jsonable_errors(exc)}, status_code=422)
        return _error(request, 422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                               for e in exc.errors()))

    @app.exception_handler(JobNotFoundError)
    @app.exception_handler(actions.StudyNotFoundError)
    async def not_found(request: Request, exc: LookupError) -> Response:
        return _error(request, 404, str(exc))

    @app.exception_handler(InvalidTransitionError)
    @app.exception_handler(actions.ActionRefusedError)
    async def conflict(request: Request, exc: ValueError) -> Response:
        return _error(request, 409, str(exc))

    @app.exception_handler(ValueError)
    async def invalid(request: Request, exc: ValueError) -> Response:
        return _error(request, 422, str(exc))

    # -- health and metrics ---------------------------------------------------------------------
    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz(session: SessionDep) -> dict[str, Any]:
        checks: dict[str, str] = {}
        try:
            session.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:  # noqa: BLE001 (boundary: report, don't raise)
            checks["database"] = f"error: {type(exc).__name__}"
        store = context.current().store
        try:
            probe = store.root / ".ready-probe"
            probe.write_bytes(b"ok")
            probe.unlink()
            checks["storage"] = f"ok ({shutil.disk_usage(store.root).free // 2**20} MiB free)"
        except OSError as exc:
            checks["storage"] = f"error: {exc.strerror}"
        try:
            from node.celery_app import app as celery_app

            with celery_app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
            checks["broker"] = "ok"
        except Exception as exc:  # noqa: BLE001 (boundary)
            checks["broker"] = f"error: {type(exc).__name__}"
        if not all(v.startswith("ok") for v in checks.values()):
            raise HTTPException(status_code=503, detail=checks)
        return {"status": "ready", "checks": checks}

    @app.get("/metrics", tags=["health"])
    def metrics() -> Response:
        body = b"".join(generate_latest(r) for r in [*_metrics_registries(), index_registry])
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.include_router(api.router)
    app.include_router(dicomweb.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=WEB_DIR / "static"), name="static")
    return app


def jsonable_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
