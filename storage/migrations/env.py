"""Alembic environment: migrations always run on a connection handed over by storage.migrate."""

from __future__ import annotations

from alembic import context

import storage.migrate  # noqa: F401  (registers the DuckDB implementation)
from storage.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through storage.migrate.upgrade(engine), not the CLI")

context.configure(connection=connection, target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
