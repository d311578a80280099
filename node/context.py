"""What one mednode process needs to work: settings, index database, instance store.

Each process (``mednode serve``, each Celery worker child) builds its own context once, after any
fork, so database connections are never shared across processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from storage.db import make_engine, make_session_factory
from storage.store import InstanceStore


@dataclass
class NodeContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: InstanceStore
    pid: int = field(default_factory=os.getpid)

    @classmethod
    def create(cls, settings: Settings) -> NodeContext:
        engine = make_engine(settings.database)
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_session_factory(engine),
            store=InstanceStore(
                settings.store_dir, min_free_bytes=settings.min_free_disk_mb * 1024 * 1024
            ),
        )

    def close(self) -> None:
        self.engine.dispose()


_current: NodeContext | None = None
_settings: Settings | None = None


def configure(settings: Settings) -> None:
    """Declare the settings of this process; the context is built lazily on first use."""
    global _settings, _current
    _settings = settings
    _current = None


def current() -> NodeContext:
    """The context of this process (rebuilt in a forked child)."""
    global _current
    if _settings is None:
        raise RuntimeError("node.context.configure(settings) was not called in this process")
    if _current is None or _current.pid != os.getpid():
        _current = NodeContext.create(_settings)
    return _current


def configure_if_needed(settings: Settings) -> None:
    """Configure the process context unless it already is (the web app inside ``serve``)."""
    if _settings is None:
        configure(settings)
