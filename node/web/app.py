"""The FastAPI application: health, readiness, metrics and the status API.

Response schemas carry UIDs, states and counts — never patient attributes.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.orm import Session

from node import context, jobs
from node.config import Settings


def get_session() -> Iterator[Session]:
    """A database session of this process for one request."""
    with context.current().sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def create_app(settings: Settings) -> FastAPI:
    context.configure_if_needed(settings)
    app = FastAPI(title="mednode", version="0.1.0", docs_url="/api/docs", openapi_url="/api/v1/openapi.json")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(session: SessionDep) -> dict[str, Any]:
        checks: dict[str, str] = {}
        try:
            session.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:  # boundary: report, don't raise
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
        except Exception as exc:  # boundary
            checks["broker"] = f"error: {type(exc).__name__}"
        ready = all(v.startswith("ok") for v in checks.values())
        if not ready:
            raise HTTPException(status_code=503, detail=checks)
        return {"status": "ready", "checks": checks}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/v1/status")
    def status(session: SessionDep) -> dict[str, Any]:
        return jobs.status_counts(session)

    return app
