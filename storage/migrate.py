"""Schema migrations through Alembic, run programmatically so users never call alembic.

A database stamped with a revision this version does not know was written by a newer
convoscope: we stop with a clear message instead of reading tables we do not understand.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.ddl.impl import DefaultImpl
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from storage.engine import StorageError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class DuckDBImpl(DefaultImpl):
    """Alembic has no DuckDB support of its own; its generic DDL works, transactionally."""

    __dialect__ = "duckdb"
    transactional_ddl = True


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest schema revision this version of convoscope knows."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None, "no migrations found"
    return head


def current_revision(connection: Connection) -> str | None:
    """The revision a database is stamped with (None for an empty database)."""
    return MigrationContext.configure(connection).get_current_revision()


def _refuse_newer(revision: str | None, url: str) -> None:
    if revision is None:
        return
    script = ScriptDirectory.from_config(_config())
    if revision not in {rev.revision for rev in script.walk_revisions()}:
        raise StorageError(
            f"database {url} has schema revision {revision}, which this convoscope "
            f"(schema {head_revision()}) does not know: it was written by a newer version. "
            "Upgrade convoscope to open it (in its checkout: git pull, then "
            "pip install -r requirements.txt)."
        )


def _refuse_clashing_tables(connection: Connection, url: str) -> None:
    """An unstamped database that already has a table of ours belongs to something else:
    creating the rest beside it would mix two applications' tables (and SQLite cannot roll
    the DDL back when a CREATE TABLE then fails), so nothing is written."""
    from storage.schema import metadata

    clashing = sorted(set(sa.inspect(connection).get_table_names()) & set(metadata.tables))
    if clashing:
        raise StorageError(
            f"database {url} is not a convoscope database but already has table(s) named "
            f"{', '.join(clashing)}; nothing was written. Use another database (or file) for "
            "convoscope, e.g. --db convoscope.duckdb"
        )


def is_older(engine: Engine) -> bool:
    """True when the database holds an older convoscope schema (not an empty database, and
    not a newer one, which is refused)."""
    with engine.connect() as connection:
        revision = current_revision(connection)
    _refuse_newer(revision, engine.url.render_as_string(hide_password=True))
    return revision is not None and revision != head_revision()


def check_version(engine: Engine) -> None:
    """Refuse a database from a newer version; used by read-only openers that cannot migrate."""
    url = engine.url.render_as_string(hide_password=True)
    with engine.connect() as connection:
        revision = current_revision(connection)
        if revision is None:
            _refuse_clashing_tables(connection, url)  # another application's database
    _refuse_newer(revision, url)
    if revision != head_revision():
        raise StorageError(
            f"database {engine.url.render_as_string(hide_password=True)} is not initialised: "
            "it holds no convoscope data yet (`convoscope ingest LOGS` stores some)"
        )


def upgrade(engine: Engine, target: str = "head") -> None:
    """Bring the database to the newest schema (or `target`); a no-op when it is there."""
    wanted = head_revision() if target == "head" else target
    with (
        engine.connect() as connection,
        _sqlite_ddl_in_transaction(connection),
        connection.begin(),
    ):
        revision = current_revision(connection)
        if connection.dialect.name == "sqlite" and revision != wanted:
            connection.exec_driver_sql("BEGIN IMMEDIATE")  # waits while another one migrates
            revision = current_revision(connection)
        url = engine.url.render_as_string(hide_password=True)
        _refuse_newer(revision, url)
        if revision is None:
            _refuse_clashing_tables(connection, url)
        if revision != wanted:
            command.upgrade(_config(connection), target)


@contextmanager
def _sqlite_ddl_in_transaction(connection: Connection) -> Iterator[None]:
    """Let `upgrade` begin SQLite's transaction itself. Python's sqlite3 commits each ALTER or
    CREATE on its own, so a migration cut short (killed, Ctrl-C, a later step failing) kept
    its columns without the revision that records them, and every later open failed on
    "duplicate column name". `BEGIN IMMEDIATE`, only when there is something to migrate,
    makes the steps and the revision one transaction, and a second process opening the
    file meanwhile waits for it and then finds it migrated."""
    if connection.dialect.name != "sqlite":
        yield
        return
    driver = connection.connection.driver_connection
    before = driver.isolation_level  # type: ignore[union-attr]
    driver.isolation_level = None  # type: ignore[union-attr]
    try:
        yield
    finally:
        driver.isolation_level = before  # type: ignore[union-attr]
