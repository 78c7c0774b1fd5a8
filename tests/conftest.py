"""Shared fixtures: real database files, the shared data folder, small real slices."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data_file(name: str) -> Path:
    """The path of `name` in ../shared/data; skips when absent, fails under CI."""
    path = SHARED_DATA / name
    if not path.exists():
        message = f"shared data file {path} is absent (it lives beside the repo, never in it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def shared_file() -> Callable[[str], Path]:
    """`shared_file("clinc150.json")`: path in ../shared/data; skips when absent, fails under CI."""
    return shared_data_file


def _postgres_url() -> str | None:
    url = os.environ.get("CONVOSCOPE_TEST_PG_URL")
    if not url and os.environ.get("CI") == "true":
        pytest.fail("CI=true but CONVOSCOPE_TEST_PG_URL is not set: .ci/run must start PostgreSQL")
    return url


@pytest.fixture(params=["duckdb", "sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each supported kind (PostgreSQL when a server is given)."""
    kind = request.param
    if kind == "duckdb":
        yield f"duckdb:///{tmp_path / 'test.duckdb'}"
    elif kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.sqlite'}"
    else:
        base = _postgres_url()
        if not base:
            pytest.skip("no PostgreSQL server: set CONVOSCOPE_TEST_PG_URL (CI starts one)")
        yield from _fresh_postgres_database(base)


def _fresh_postgres_database(base: str) -> Iterator[str]:
    """Create a uniquely named database on the server so tests never see each other's rows."""
    import uuid

    import sqlalchemy as sa

    name = f"convoscope_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(base).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def duckdb_url(tmp_path: Path) -> str:
    """A fresh DuckDB file: the default store, used where one database kind is enough."""
    return f"duckdb:///{tmp_path / 'test.duckdb'}"
