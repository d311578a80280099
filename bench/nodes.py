"""The node as the benchmarks run it: its environment and its process.

Every benchmark that starts ``mednode serve`` (or ``mednode worker``) builds the same
``MEDNODE_*`` environment on loopback ports and must keep the developer's own ``MEDNODE_*``
settings out of it; :func:`node_env` and :func:`node_process` are that one place.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from tests.peers import ManagedProcess, free_port


def node_env(data_dir: Path, *, dicom_port: int, web_port: int | None = None, database_url: str | None = None,
             **settings: object) -> dict[str, str]:
    """The ``MEDNODE_*`` environment of a node on loopback: ``settings`` (``quiet_period_s=2``,
    ``embedded_worker=False`` …) become ``MEDNODE_QUIET_PERIOD_S=2`` …; booleans are written
    ``true``/``false``. Without ``database_url`` the node uses its default (SQLite in ``data_dir``)."""
    env = {
        "MEDNODE_DICOM_HOST": "127.0.0.1",
        "MEDNODE_DICOM_PORT": str(dicom_port),
        "MEDNODE_WEB_HOST": "127.0.0.1",
        "MEDNODE_WEB_PORT": str(web_port or free_port()),
        "MEDNODE_DATA_DIR": str(data_dir),
        "MEDNODE_LOG_LEVEL": "WARNING",
    }
    if database_url is not None:
        env["MEDNODE_DATABASE_URL"] = database_url
    for key, value in settings.items():
        if value is not None:
            env[f"MEDNODE_{key.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def node_process(argv: list[str], *, env: Mapping[str, str], log_dir: Path, name: str = "mednode",
                 cwd: Path | None = None) -> ManagedProcess:
    """A node process (not started) with ``env`` and none of the caller's other ``MEDNODE_*``
    variables: the developer's own settings must not leak into a benchmark."""
    process = ManagedProcess(argv, log_dir=log_dir, name=name, env=dict(env), cwd=cwd)
    for key in [k for k in process.env if k.startswith("MEDNODE_") and k not in env]:
        del process.env[key]
    return process


def mednode_argv(command: str, *args: str) -> list[str]:
    """``python -m node.cli COMMAND ARGS`` with this interpreter (the checkout on PYTHONPATH wins)."""
    return [sys.executable, "-m", "node.cli", command, *args]
