"""The Alembic migrations build exactly the schema the models declare, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from storage.db import has_schema, make_engine, upgrade
from storage.models import Base


def _diff(engine: Engine) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, Base.metadata))


def _check_schema(engine: Engine) -> None:
    assert not has_schema(engine)
    upgrade(engine)
    assert has_schema(engine)
    tables = set(inspect(engine).get_table_names())
    assert set(Base.metadata.tables) <= tables
    assert "alembic_version" in tables
    diff = _diff(engine)
    assert diff == [], f"the models and the migrations differ; write a migration for: {diff}"
    upgrade(engine)  # a second upgrade at start is a no-op
    assert _diff(engine) == []


def test_migrations_match_models_on_sqlite(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'mednode.db'}")
    try:
        _check_schema(engine)
    finally:
        engine.dispose()


def test_the_diff_check_notices_a_missing_migration(tmp_path: Path) -> None:
    """The comparison is not vacuous: a column the migrations lack is reported."""
    engine = make_engine(f"sqlite:///{tmp_path / 'mednode.db'}")
    try:
        upgrade(engine)
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text("ALTER TABLE study ADD COLUMN stray TEXT"))
        assert any("stray" in repr(d) for d in _diff(engine))
    finally:
        engine.dispose()


def test_migrations_match_models_on_postgresql(postgres_engine: Engine) -> None:
    _check_schema(postgres_engine)


def _upgrade_from_0001_with_rows(engine: Engine) -> None:
    """An index of the first schema with a study in it moves to 0002: its series count as
    acquired, nothing is late or held, and the new columns are there."""
    from alembic import command

    from storage.db import _alembic_config

    cfg = _alembic_config(engine)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "0001")
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(
            "INSERT INTO study (id, study_instance_uid, state, version, first_received_at, last_received_at) "
            "VALUES (1, '1.2.3', 'routed', 1, '2026-01-01 00:00:00+00:00', '2026-01-01 00:00:00+00:00')"))
        connection.execute(sqlalchemy.text(
            "INSERT INTO series (id, series_instance_uid, study_pk) VALUES (1, '1.2.3.1', 1)"))
    upgrade(engine)
    with engine.connect() as connection:
        row = connection.execute(sqlalchemy.text(
            "SELECT origin, late_at, held_reason FROM series WHERE id = 1")).one()
        study = connection.execute(sqlalchemy.text(
            "SELECT receiving_since, completion_reason FROM study WHERE id = 1")).one()
    assert tuple(row) == ("acquired", None, None)
    assert tuple(study) == (None, None)
    assert _diff(engine) == []
    assert "ix_result_series_instance_uid" in {i["name"] for i in inspect(engine).get_indexes("result")}


def test_0002_keeps_existing_rows_on_sqlite(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'mednode.db'}")
    try:
        _upgrade_from_0001_with_rows(engine)
    finally:
        engine.dispose()


def test_0002_keeps_existing_rows_on_postgresql(postgres_engine: Engine) -> None:
    _upgrade_from_0001_with_rows(postgres_engine)
