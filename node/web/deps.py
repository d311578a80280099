"""Typed dependencies shared by the routers: the database session, the node's settings and context."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from node import context
from node.config import Settings
from node.context import NodeContext


def get_context() -> NodeContext:
    return context.current()


def get_session() -> Iterator[Session]:
    """A database session of this process for one request."""
    with context.current().sessions() as session:
        yield session


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ContextDep = Annotated[NodeContext, Depends(get_context)]
