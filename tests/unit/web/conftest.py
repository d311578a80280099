"""A real node in-process for the web tests: index on SQLite or PostgreSQL, Celery on ``memory://``,
a CT study ingested through the node's own ingestor, completed, routed and run by the pipeline."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient

from node import context, pipeline
from node.celery_app import configure_celery
from node.completion import complete_due_studies
from node.config import Settings
from node.context import NodeContext
from node.ingest import Ingestor
from node.web.app import create_app
from storage.db import upgrade
from tests.databases import fresh_postgres_database

CANARY_NAME = "Canary^Webfield7Q"
CANARY_ID = "WEB-CANARY-4471"
CANARY_ACCESSION = "ACC-CANARY-88"
ADMIN = ("admin", "s3cret-pass")
TOKEN = "test-token-123"
QUIET_PERIOD_S = 0.3


def WebSettings(**values: object) -> Settings:
    """Settings with the web credentials the tests log in with."""
    defaults: dict[str, object] = {
        "web_admin_user": ADMIN[0],
        "web_admin_password": ADMIN[1],
        "web_secret_key": "unit-test-secret-key-0123456789",
        "web_api_tokens": [TOKEN],
    }
    return Settings(**{**defaults, **values})


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The index database: SQLite in ``tmp_path``, or a fresh PostgreSQL database (dropped after)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'index.db'}"
        return
    with fresh_postgres_database("mednode_web") as url:
        yield url


@dataclass
class WebNode:
    settings: Settings
    ctx: NodeContext
    client: TestClient

    def ingest(self, files: list[Path], **changes: str) -> str:
        """Ingest ``files`` (with header ``changes``) through the node's ingestor; return the study UID."""
        ingestor = Ingestor(self.ctx.store, self.ctx.sessions)
        study_uid = ""
        for path in files:
            ds = pydicom.dcmread(path)
            for keyword, value in changes.items():
                setattr(ds, keyword, value)
            buffer = BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            result = ingestor.ingest(buffer.getvalue(), calling_ae_title="ORTHANC", called_ae_title="MEDNODE")
            study_uid = result.header.study_instance_uid
        return study_uid

    def complete(self) -> list[int]:
        """Complete every receiving study now; return the ids of the jobs routing created."""
        time.sleep(QUIET_PERIOD_S + 0.05)
        created = complete_due_studies(self.ctx.sessions, self.settings)
        return [job_id for job_id, _ in created]

    def run(self, job_id: int) -> None:
        pipeline.run_job(self.ctx, job_id)

    def login(self) -> None:
        """Log the test client in through the login form (session cookie + CSRF)."""
        page = self.client.get("/login")
        token = csrf_of(page.text)
        answer = self.client.post("/login", data={"username": ADMIN[0], "password": ADMIN[1],
                                                  "csrf_token": token, "next": "/queue"},
                                  follow_redirects=False)
        assert answer.status_code == 303, answer.text

    def csrf(self, path: str = "/queue") -> str:
        return csrf_of(self.client.get(path).text)


def csrf_of(html: str) -> str:
    marker = 'name="csrf_token" value="'
    start = html.index(marker) + len(marker)
    return html[start:html.index('"', start)]


@pytest.fixture
def web_node_factory(tmp_path: Path, database_url: str) -> Iterator[Callable[..., WebNode]]:
    made: list[WebNode] = []

    def make(**overrides: object) -> WebNode:
        values: dict[str, object] = {
            "data_dir": tmp_path / "var",
            "database_url": database_url,
            "broker_url": "memory://",
            "quiet_period_s": QUIET_PERIOD_S,
        }
        values.update(overrides)
        settings = WebSettings(**values)  # type: ignore[arg-type]
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        context.configure(settings)
        ctx = context.current()
        upgrade(ctx.engine)
        configure_celery(settings)
        client = TestClient(create_app(settings))
        node = WebNode(settings, ctx, client)
        made.append(node)
        return node

    yield make
    for node in made:
        node.client.close()
        node.ctx.close()


@pytest.fixture
def ct_files(shared_dicom: Path) -> list[Path]:
    return sorted((shared_dicom / "ct" / "dcmqi_ct3slice").glob("*.dcm"))


@pytest.fixture
def web_node(web_node_factory: Callable[..., WebNode], ct_files: list[Path]) -> WebNode:
    node = web_node_factory()
    node._ct_files = ct_files  # type: ignore[attr-defined]
    return node


@pytest.fixture
def processed(web_node: WebNode, ct_files: list[Path]) -> tuple[WebNode, str, int]:
    """A CT study with canary patient fields, completed, routed and run: (node, study UID, job id)."""
    study_uid = web_node.ingest(ct_files, PatientName=CANARY_NAME, PatientID=CANARY_ID,
                                AccessionNumber=CANARY_ACCESSION)
    [job_id] = web_node.complete()
    web_node.run(job_id)
    return web_node, study_uid, job_id
