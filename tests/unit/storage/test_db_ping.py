"""Pooled connections to a database server: pinged before reuse only after idling, and a
connection the server dropped meanwhile is replaced instead of failing a statement."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, text

from storage import db as db_module


def _count_pings(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    pings: list[object] = []
    ping = engine.dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:
        pings.append(dbapi_connection)
        return ping(dbapi_connection)

    monkeypatch.setattr(engine.dialect, "do_ping", counted)
    return pings


def test_a_connection_in_use_a_moment_ago_is_not_pinged(
    postgres_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    pings = _count_pings(postgres_engine, monkeypatch)
    for _ in range(5):
        with postgres_engine.connect() as connection:
            assert connection.execute(text("SELECT 1")).scalar_one() == 1
    assert pings == []
    monkeypatch.setattr(db_module, "IDLE_PING_S", 0.0)  # as if it had idled
    with postgres_engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    assert len(pings) == 1


def test_a_connection_dropped_while_idle_is_replaced(
    postgres_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a connection with no transaction open goes back to the pool as it is; the server then ends it
    with postgres_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        backend = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with postgres_engine.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend})
            other.commit()
    monkeypatch.setattr(db_module, "IDLE_PING_S", 0.0)
    for _ in range(2):  # whichever of the two the pool hands out first
        with postgres_engine.connect() as connection:
            assert connection.execute(text("SELECT pg_backend_pid()")).scalar_one() != backend
