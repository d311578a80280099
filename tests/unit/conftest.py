"""Fixtures shared by the unit tests of several packages."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from storage.db import make_engine
from tests.databases import fresh_postgres_database


@pytest.fixture
def postgres_engine() -> Iterator[Engine]:
    """A fresh, empty PostgreSQL database on 127.0.0.1:5432 (not migrated), dropped afterwards."""
    with fresh_postgres_database("mednode_unit") as url:
        engine = make_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()
