"""Alembic environment: Declic always passes its own connection in."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

from declic_gateway.store import tables  # noqa: F401  (registers the tables on SQLModel.metadata)

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
