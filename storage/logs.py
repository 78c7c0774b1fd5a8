"""Writing and reading logged conversations, exchanges and battles.

Every write is one transaction per batch that skips rows already stored (by content-hash id):
a process killed mid-ingest leaves whole batches only, and running the same ingest again
stores exactly what is missing. DuckDB gets its rows through Arrow, because its row-at-a-time
`executemany` is two orders of magnitude slower; SQLite and PostgreSQL use plain executemany.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from storage.schema import battles, conversations, exchanges, ingest_runs

Row = dict[str, Any]

# How many ids go into one `IN (...)` probe: under SQLite's bound-parameter limit.
_PROBE_CHUNK = 5000


@dataclass(frozen=True, slots=True)
class BatchCounts:
    """What one batch added: new exchanges and battles stored, and those already there."""

    stored: int
    duplicates: int
    battles_stored: int


def utcnow() -> datetime:
    """Naive UTC timestamps: the three engines store them the same way."""
    return datetime.now(UTC).replace(tzinfo=None)


def _existing_ids(conn: Connection, table: sa.Table, ids: Sequence[str]) -> set[str]:
    if conn.dialect.name == "duckdb":  # a join against an Arrow view beats a huge IN list
        with _duckdb_view(conn, pa.table({"id": pa.array(ids, pa.string())})) as view:
            duck = conn.connection.driver_connection
            query = f'SELECT t.id FROM "{table.name}" t JOIN {view} v ON t.id = v.id'
            return {row[0] for row in duck.execute(query).fetchall()}
    found: set[str] = set()
    id_column = table.c.id
    for start in range(0, len(ids), _PROBE_CHUNK):
        chunk = list(ids[start : start + _PROBE_CHUNK])
        found.update(conn.execute(sa.select(id_column).where(id_column.in_(chunk))).scalars())
    return found


def insert_rows(conn: Connection, table: sa.Table, rows: list[Row]) -> None:
    """Insert rows whose keys are column names, by the fastest path the backend has."""
    if not rows:
        return
    if conn.dialect.name == "duckdb":
        columns = [c.name for c in table.columns if c.name in rows[0]]
        with _duckdb_view(conn, pa.Table.from_pylist(rows).select(columns)) as view:
            names = ", ".join(f'"{name}"' for name in columns)
            conn.connection.driver_connection.execute(
                f'INSERT INTO "{table.name}" ({names}) SELECT {names} FROM {view}'
            )
    else:
        conn.execute(sa.insert(table), rows)


@contextmanager
def _duckdb_view(conn: Connection, arrow: pa.Table) -> Iterator[str]:
    """Expose an Arrow table to DuckDB under a fresh name for the duration of a statement."""
    duck = conn.connection.driver_connection
    view = f"_convoscope_batch_{uuid.uuid4().hex}"
    duck.register(view, arrow)
    try:
        yield view
    finally:
        duck.unregister(view)


def _new_rows(conn: Connection, table: sa.Table, rows: Iterable[Row]) -> list[Row]:
    """Rows whose id is neither stored already nor repeated earlier in the same batch."""
    unique: dict[str, Row] = {}
    for row in rows:
        unique.setdefault(row["id"], row)
    existing = _existing_ids(conn, table, list(unique))
    return [row for row_id, row in unique.items() if row_id not in existing]


def store_batch(
    engine: Engine,
    *,
    conversation_rows: Sequence[Row],
    exchange_rows: Sequence[Row],
    battle_rows: Sequence[Row] = (),
) -> BatchCounts:
    """Store one batch atomically, skipping anything already stored."""
    with engine.begin() as conn:
        return store_rows(
            conn,
            conversation_rows=conversation_rows,
            exchange_rows=exchange_rows,
            battle_rows=battle_rows,
        )


def store_rows(
    conn: Connection,
    *,
    conversation_rows: Sequence[Row],
    exchange_rows: Sequence[Row],
    battle_rows: Sequence[Row] = (),
) -> BatchCounts:
    """`store_batch` inside a transaction the caller holds (to commit more with it)."""
    new_conversations = _new_rows(conn, conversations, conversation_rows)
    new_exchanges = _new_rows(conn, exchanges, exchange_rows)
    new_battles = _new_rows(conn, battles, battle_rows)
    insert_rows(conn, conversations, new_conversations)
    insert_rows(conn, exchanges, new_exchanges)
    insert_rows(conn, battles, new_battles)
    return BatchCounts(
        stored=len(new_exchanges),
        duplicates=len(exchange_rows) - len(new_exchanges),
        battles_stored=len(new_battles),
    )


def start_ingest_run(engine: Engine, *, path: str, format: str) -> str:
    """Record that an ingest of `path` began; finished_at stays NULL if it is killed."""
    run_id = uuid.uuid4().hex
    with engine.begin() as conn:
        conn.execute(
            sa.insert(ingest_runs).values(
                id=run_id,
                path=path,
                format=format,
                started_at=utcnow(),
                read=0,
                stored=0,
                duplicates=0,
                rejected=0,
                truncated=False,
            )
        )
    return run_id


def finish_ingest_run(engine: Engine, run_id: str, **counts: int | bool) -> None:
    """Close an ingest run with its counts (read, stored, duplicates, rejected, truncated)."""
    with engine.begin() as conn:
        conn.execute(
            sa.update(ingest_runs)
            .where(ingest_runs.c.id == run_id)
            .values(finished_at=utcnow(), **counts)
        )


def table_counts(engine: Engine) -> dict[str, int]:
    """Row counts of the log tables, for summaries and the demo."""
    with engine.connect() as conn:
        return {
            table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in (conversations, exchanges, battles)
        }


@dataclass(frozen=True, slots=True)
class ExchangeFilter:
    """Which exchanges a read returns; empty tuples mean no restriction."""

    models: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None

    def apply(self, query: sa.Select) -> sa.Select:
        if self.models:
            query = query.where(exchanges.c.model.in_(self.models))
        if self.sources:
            query = query.where(exchanges.c.source.in_(self.sources))
        if self.since is not None:
            query = query.where(exchanges.c.created_at >= self.since)
        if self.until is not None:
            query = query.where(exchanges.c.created_at < self.until)
        return query


def iter_exchanges(
    engine: Engine,
    *,
    where: ExchangeFilter | None = None,
    columns: Sequence[str] | None = None,
    batch_size: int = 5000,
) -> Iterator[list[Row]]:
    """Stream exchanges in batches of dicts, in a stable order (conversation, turn)."""
    selected = [exchanges.c[name] for name in columns] if columns else list(exchanges.c)
    query = sa.select(*selected).order_by(exchanges.c.conversation_id, exchanges.c.turn_index)
    query = (where or ExchangeFilter()).apply(query)
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=batch_size).execute(query)
        for partition in result.mappings().partitions(batch_size):
            yield [dict(row) for row in partition]


def load_battles(engine: Engine) -> list[Row]:
    """Every battle with the models and prompts of its two exchanges."""
    a, b = exchanges.alias("a"), exchanges.alias("b")
    query = sa.select(
        battles.c.id,
        battles.c.exchange_a,
        battles.c.exchange_b,
        battles.c.winner,
        battles.c.judge_preference,
        a.c.model.label("model_a"),
        b.c.model.label("model_b"),
    ).select_from(
        battles.join(a, a.c.id == battles.c.exchange_a).join(b, b.c.id == battles.c.exchange_b)
    )
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]
