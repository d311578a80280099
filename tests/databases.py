"""A fresh PostgreSQL database per test, on the machine's server at 127.0.0.1:5432 (trust auth)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest
import sqlalchemy

from tests.peers import in_ci
from tests.peers.services import POSTGRES_ADMIN_URL, postgres_database

__all__ = ["POSTGRES_ADMIN_URL", "fresh_postgres_database"]


@contextmanager
def fresh_postgres_database(prefix: str) -> Iterator[str]:
    """Create an empty database named ``<prefix>_<random>``, yield its URL, drop it afterwards.

    An unreachable server fails the test under ``CI=true`` and skips it elsewhere.
    """
    with ExitStack() as stack:
        try:
            url = stack.enter_context(postgres_database(prefix))
        except sqlalchemy.exc.OperationalError as exc:
            message = f"PostgreSQL at 127.0.0.1:5432 is not reachable: {exc}"
            if in_ci():
                pytest.fail(message)
            pytest.skip(message)
        yield url
