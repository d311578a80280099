"""Suite-wide fixtures: real peers (Orthanc, dcmtk) and the shared sample DICOM.

Engineers add fixtures for their own packages in sub-conftests (``tests/unit/<pkg>/conftest.py``,
``tests/integration/conftest.py``); keep this one small.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.peers import Orthanc, in_ci, require_tool
from tests.shared_data import SHARED_DICOM

REPO_ROOT = Path(__file__).resolve().parent.parent
INTEGRATION_DIR = REPO_ROOT / "tests" / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under ``tests/integration/`` as ``integration``."""
    for item in items:
        if INTEGRATION_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """In CI, turn the skip of an ``integration`` test into a failure.

    A real-peer test that skips in CI proves nothing while looking green; CI installs every
    peer, so a skip there means a broken set-up that must be fixed, not hidden.
    """
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if (
        in_ci()
        and report.skipped
        and not hasattr(report, "wasxfail")
        and item.get_closest_marker("integration") is not None
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"integration test skipped in CI (CI is set): {reason}"


@dataclass(frozen=True)
class DcmtkTools:
    """Absolute paths of the dcmtk programs the tests use."""

    storescu: str
    storescp: str
    echoscu: str
    dcmsend: str


@pytest.fixture(scope="session")
def dcmtk() -> DcmtkTools:
    """dcmtk program paths; skips locally / fails in CI when dcmtk is not installed."""
    return DcmtkTools(
        storescu=require_tool("storescu"),
        storescp=require_tool("storescp"),
        echoscu=require_tool("echoscu"),
        dcmsend=require_tool("dcmsend"),
    )


OrthancFactory = Callable[..., Orthanc]


@pytest.fixture
def orthanc_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancFactory]:
    """Start Orthanc servers on free ports; every one is stopped by PID at teardown.

    Call it as ``orthanc_factory(modalities={"mednode": {"AET": "MEDNODE", "Host":
    "127.0.0.1", "Port": port}}, aet="ORTHANC", extra_config={...})``; ``users={name: password}``
    turns HTTP Basic authentication on; ``running=False`` returns it on its ports, not started yet
    (a PACS that is down, started later with ``.start()``).
    """
    require_tool("Orthanc")
    started: list[Orthanc] = []

    def start(
        modalities: Mapping[str, Mapping[str, Any]] | None = None,
        aet: str = "ORTHANC",
        extra_config: Mapping[str, Any] | None = None,
        users: Mapping[str, str] | None = None,
        running: bool = True,
    ) -> Orthanc:
        server = Orthanc(
            tmp_path_factory.mktemp("orthanc"),
            modalities=modalities,
            aet=aet,
            extra_config=extra_config,
            users=users,
        )
        started.append(server)
        return server.start() if running else server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def shared_dicom() -> Path:
    """Path of the shared sample DICOM (``<repo>/../shared/dicom``, see its MANIFEST.tsv)."""
    path = SHARED_DICOM
    if not (path / "MANIFEST.tsv").is_file():
        message = f"shared sample DICOM not found at {path} (expected MANIFEST.tsv there)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return path
