"""Writing and reading logged conversations, exchanges and battles.

Every write is one transaction per batch that skips rows already stored (by content-hash id):
a process killed mid-ingest leaves whole batches only, and running the same ingest again
stores exactly what is missing. DuckDB gets its rows through Arrow, because its row-at-a-time
`executemany` is two orders of magnitude slower, and skips stored ids inside the insert;
SQLite and PostgreSQL probe for stored ids, then insert the rest skipping any that another
writer stored meanwhile (ON CONFLICT DO NOTHING). Contexts are stored
as references (storage/contexts.py) and resolved by the readers here.
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
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from storage.contexts import context_columns, stream_with_contexts
from storage.engine import make_room
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
        _duckdb_insert(conn, table, _to_arrow(table, rows))
    else:
        conn.execute(sa.insert(table), rows)


def _to_arrow(table: sa.Table, rows: list[Row]) -> pa.Table:
    """The rows as an Arrow table of `table`'s columns that the rows have.

    Converted row by row in C: a list per column, built in Python first, took half again as
    long. The conversion holds the GIL for the whole batch without yielding it."""
    columns = [c for c in table.columns if c.name in rows[0]]
    schema = pa.schema([(c.name, _arrow_type(c.type)) for c in columns])
    return pa.Table.from_pylist(rows, schema=schema)


def _duckdb_insert(
    conn: Connection, table: sa.Table, arrow: pa.Table, *, on_conflict: str = ""
) -> int:
    """Insert through an Arrow view; `on_conflict=" ON CONFLICT DO NOTHING"` leaves out rows
    whose key is stored. Returns how many rows were inserted (or updated)."""
    make_room(conn)
    with _duckdb_view(conn, arrow) as view:
        names = ", ".join(f'"{name}"' for name in arrow.column_names)
        result = conn.connection.driver_connection.execute(
            f'INSERT INTO "{table.name}" ({names}) SELECT {names} FROM {view}{on_conflict}'
        )
        return int(result.fetchone()[0])


_ARROW_TYPES: tuple[tuple[type[sa.types.TypeEngine[Any]], pa.DataType], ...] = (
    (sa.Boolean, pa.bool_()),
    (sa.Integer, pa.int64()),
    (sa.Float, pa.float64()),
    (sa.DateTime, pa.timestamp("us")),
    (sa.LargeBinary, pa.binary()),
    (sa.String, pa.string()),  # Text is a String
)


def _arrow_type(column_type: sa.types.TypeEngine[Any]) -> pa.DataType:
    """The Arrow type for a column: declared, because inferring it costs more than the copy."""
    for sql_type, arrow_type in _ARROW_TYPES:
        if isinstance(column_type, sql_type):
            return arrow_type
    raise TypeError(f"no Arrow type for {column_type!r}")


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


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """One batch's rows, made ready to store by `prepare_batch`: each table's rows without
    repeated ids and, for DuckDB, already converted to Arrow.

    The ingest prepares a batch on the thread that reads and stores it on a writer thread,
    which then holds the GIL for little more than starting the database's insert. When the
    writer converted the rows itself, the reader waited on it after every hash of a long text
    (hashlib lets the GIL go for those): hashing ShareGPT's ids took 0.8-1.1 s, now 0.4 s
    (0.2 s with no writer), and the whole ingest 7 % less.
    """

    read: int  # exchange rows given, repeats included
    conversations: list[Row] | pa.Table
    exchanges: list[Row] | pa.Table
    battles: list[Row] | pa.Table


def prepare_batch(
    engine: Engine,
    *,
    conversation_rows: Sequence[Row],
    exchange_rows: Sequence[Row],
    battle_rows: Sequence[Row] = (),
) -> PreparedBatch:
    """The rows of one batch, ready for `store_prepared` on any thread."""
    duckdb = engine.dialect.name == "duckdb"

    def ready(table: sa.Table, rows: Iterable[Row]) -> list[Row] | pa.Table:
        unique: dict[str, Row] = {}
        for row in rows:
            unique.setdefault(row["id"], row)
        kept = list(unique.values())
        return _to_arrow(table, kept) if duckdb and kept else kept

    return PreparedBatch(
        read=len(exchange_rows),
        conversations=ready(conversations, conversation_rows),
        exchanges=ready(exchanges, exchange_rows),
        battles=ready(battles, battle_rows),
    )


def _store_new(
    conn: Connection, table: sa.Table, rows: list[Row] | pa.Table, *, all_new: bool = False
) -> int:
    """Insert the prepared rows whose id is not stored already; returns how many that was.
    DuckDB skips stored ids inside the insert (ON CONFLICT), which saves a join of every
    batch against the whole table, or, told the rows are `all_new`, inserts them plainly and
    fails on a stored one; the others probe first."""
    if isinstance(rows, pa.Table):
        conflict = "" if all_new else " ON CONFLICT DO NOTHING"
        return _duckdb_insert(conn, table, rows, on_conflict=conflict)
    if not rows:
        return 0
    existing = _existing_ids(conn, table, [row["id"] for row in rows])
    return insert_new_rows(conn, table, [row for row in rows if row["id"] not in existing])


def insert_new_rows(conn: Connection, table: sa.Table, rows: list[Row]) -> int:
    """Insert rows, leaving out any whose key another process stored since the caller looked
    (PostgreSQL's concurrent writers, a second SQLite process); returns how many went in.
    Two ingests sharing a battle's answer failed on the primary key with a traceback.

    On PostgreSQL rows go in key order: a row another transaction has inserted but not yet
    committed makes this insert wait for it, and two writers taking shared keys in opposite
    orders would each wait for the other."""
    if not rows or conn.dialect.name not in ("postgresql", "sqlite"):
        insert_rows(conn, table, rows)
        return len(rows)
    keys = [column.name for column in table.primary_key]
    if conn.dialect.name == "postgresql":
        rows = sorted(rows, key=lambda row: tuple(row[key] for key in keys))
    module = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = module.insert(table).on_conflict_do_nothing().returning(*table.primary_key)
    return len(conn.execute(statement, rows).all())


def upsert_rows(
    conn: Connection, table: sa.Table, rows: list[Row], *, update: Sequence[str]
) -> None:
    """Insert rows; where a row's key is stored already, set that row's `update` columns to
    the new values instead.

    Replacing a million stored scores by deleting them, then inserting the new ones, in one
    transaction ran DuckDB out of memory under its cap (in the inserts after the deletes); an
    upsert updates them in place: 1M in 2.5 s, the process at 0.6 GB."""
    if not rows:
        return
    keys = [column.name for column in table.primary_key]
    if conn.dialect.name == "duckdb":
        sets = ", ".join(f'"{name}" = excluded."{name}"' for name in update)
        key = ", ".join(f'"{name}"' for name in keys)
        conflict = f" ON CONFLICT ({key}) DO UPDATE SET {sets}"
        _duckdb_insert(conn, table, _to_arrow(table, rows), on_conflict=conflict)
        return
    module = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = module.insert(table)
    changes = {name: statement.excluded[name] for name in update}
    conn.execute(statement.on_conflict_do_update(index_elements=keys, set_=changes), rows)


def store_batch(
    engine: Engine,
    *,
    conversation_rows: Sequence[Row],
    exchange_rows: Sequence[Row],
    battle_rows: Sequence[Row] = (),
) -> BatchCounts:
    """Store one batch atomically, skipping anything already stored (`store_prepared`)."""
    batch = prepare_batch(
        engine,
        conversation_rows=conversation_rows,
        exchange_rows=exchange_rows,
        battle_rows=battle_rows,
    )
    return store_prepared(engine, batch)


def store_prepared(engine: Engine, batch: PreparedBatch) -> BatchCounts:
    """Store one prepared batch atomically, skipping anything already stored.

    DuckDB first stores the batch as all new, with plain inserts: skipping stored ids inside
    the insert (ON CONFLICT) cost half again as much CPU (ShareGPT's exchanges: 0.57 → 0.9 s)
    and left a larger file. When a row is stored already (a re-run, a battle's answer seen in
    an earlier batch), that insert fails (at once, mostly: a stored exchange's conversation is
    stored too, and conversations go first), the transaction is rolled back whole, and the
    batch is stored again skipping what is stored.
    """
    if engine.dialect.name == "duckdb":
        import duckdb  # loaded with the engine; a SQLite or PostgreSQL run is spared its 30 MB

        try:
            with engine.begin() as conn:
                return _store_prepared(conn, batch, all_new=True)
        except duckdb.ConstraintException:  # another constraint fails again below, raised
            pass  # something is stored already: nothing of this try was kept
    with engine.begin() as conn:
        return _store_prepared(conn, batch)


def store_rows(
    conn: Connection,
    *,
    conversation_rows: Sequence[Row],
    exchange_rows: Sequence[Row],
    battle_rows: Sequence[Row] = (),
) -> BatchCounts:
    """`store_batch` inside a transaction the caller holds (to commit more with it)."""
    batch = prepare_batch(
        conn.engine,
        conversation_rows=conversation_rows,
        exchange_rows=exchange_rows,
        battle_rows=battle_rows,
    )
    return _store_prepared(conn, batch)


def _store_prepared(
    conn: Connection, batch: PreparedBatch, *, all_new: bool = False
) -> BatchCounts:
    _store_new(conn, conversations, batch.conversations, all_new=all_new)
    stored = _store_new(conn, exchanges, batch.exchanges, all_new=all_new)
    return BatchCounts(
        stored=stored,
        duplicates=batch.read - stored,
        battles_stored=_store_new(conn, battles, batch.battles, all_new=all_new),
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


# The exchange columns a reward model learns from (scoring.labels), beside judged battles.
FEEDBACK_COLUMNS = (
    "retried",
    "edited",
    "user_turns_after",
    "ended_conversation",
    "rating",
    "thumbs",
)


def holds_feedback(engine: Engine) -> bool:
    """Whether anything stored can teach a reward model: an answer with a known signal, a
    rated or thumbed conversation, or a battle. A log of saved inputs (prompts logged without
    answers) and the replayed answers to them hold none, and `score` cannot train there."""
    answered = sa.select(exchanges.c.id).where(
        exchanges.c.response != "",
        sa.or_(*(exchanges.c[name].is_not(None) for name in FEEDBACK_COLUMNS)),
    )
    rated = sa.select(conversations.c.id).where(
        sa.or_(conversations.c.rating.is_not(None), conversations.c.thumbs.is_not(None))
    )
    judged = sa.select(battles.c.id)
    with engine.connect() as conn:
        return any(conn.execute(query.limit(1)).first() for query in (answered, rated, judged))


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
    """Stream exchanges in batches of dicts, in a stable order (conversation, turn, id), each
    context whole.

    The order is the input order of seeded draws (`cluster`'s sample and fit, `score`'s
    held-out conversations, `replay --sample`) and of exports. (conversation, turn) is not
    unique: an export row whose answer was edited, ingested without its `id` column, is a
    second exchange at the same turn, and each engine may return the two in its own order;
    the id settles it (at no measurable cost: 100K exchanges streamed in the same time with
    and without it on all three engines)."""
    selected = [exchanges.c[name] for name in columns] if columns else list(exchanges.c)
    selected, added = context_columns(selected)
    query = sa.select(*selected).order_by(
        exchanges.c.conversation_id, exchanges.c.turn_index, exchanges.c.id
    )
    query = (where or ExchangeFilter()).apply(query)
    yield from stream_with_contexts(engine, query, added, batch_size)


# What an exported exchange carries from its conversation: the log's own id for the whole
# conversation (ShareGPT's `id`, Chai's conversation id) and its free-text feedback (Chai's
# `feedback`), which no exchange column holds and a user joins or reads back by.
CONVERSATION_EXPORT_COLUMNS: tuple[str, ...] = ("conversation_external_id", "feedback_text")


def add_conversation_fields(
    engine: Engine, batch: list[Row], *, with_metadata: bool = False
) -> None:
    """Set `CONVERSATION_EXPORT_COLUMNS` on each row of a batch, from its `conversation_id`,
    and `conversation_metadata` (JSON text: a log's other conversation-level keys, such as
    Chai's user and bot ids) when `with_metadata`."""
    ids = sorted({row["conversation_id"] for row in batch})
    wanted = [conversations.c.external_id, conversations.c.feedback_text]
    if with_metadata:
        wanted.append(conversations.c.metadata)
    found: dict[str, tuple[str | None, ...]] = {}
    with engine.connect() as conn:
        for start in range(0, len(ids), _PROBE_CHUNK):
            chunk = ids[start : start + _PROBE_CHUNK]
            query = sa.select(conversations.c.id, *wanted).where(conversations.c.id.in_(chunk))
            found.update((cid, tuple(values)) for cid, *values in conn.execute(query))
    missing = (None,) * len(wanted)
    for row in batch:
        values = found.get(row["conversation_id"], missing)
        row["conversation_external_id"], row["feedback_text"] = values[0], values[1]
        if with_metadata:
            row["conversation_metadata"] = values[2]


def load_battles(engine: Engine) -> list[Row]:
    """Every battle with the models and prompts of its two exchanges, by id: training reads
    them in this order, and in the join's own order PostgreSQL's differed from DuckDB's, so
    the same data trained other rewards under another data fingerprint."""
    a, b = exchanges.alias("a"), exchanges.alias("b")
    query = (
        sa.select(
            battles.c.id,
            battles.c.exchange_a,
            battles.c.exchange_b,
            battles.c.winner,
            battles.c.judge_preference,
            a.c.model.label("model_a"),
            b.c.model.label("model_b"),
        )
        .select_from(
            battles.join(a, a.c.id == battles.c.exchange_a).join(b, b.c.id == battles.c.exchange_b)
        )
        .order_by(battles.c.id)
    )
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


@dataclass(frozen=True, slots=True)
class BattleFilter:
    """Which battles a read returns: a battle passes `models` when either answer's model is
    listed, `sources` by the file (or judge run) it was stored from; empty means all."""

    models: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()


def iter_battles(
    engine: Engine, *, where: BattleFilter | None = None, batch_size: int = 5000
) -> Iterator[list[Row]]:
    """Stream the stored battles in batches, each row with both answers: `id, exchange_a,
    exchange_b, winner, judge, judge_preference, source, external_id, metadata`, then
    `prompt_a, response_a, model_a` and `prompt_b, response_b, model_b` (None where an answer
    is not stored).

    Ordered by (exchange_a, exchange_b, winner, judge, id), so the copies of one verdict (the
    same answers, winner and judge, told apart by `repeat_id`) come together. Only those
    short columns are sorted; the texts and metadata are read per batch by id, so the sort
    holds no long text (DuckDB sorts in memory, see storage.contexts.SORT_PIECE_BYTES).
    """
    keys = (battles.c.exchange_a, battles.c.exchange_b, battles.c.winner, battles.c.judge)
    query = _battles_where(sa.select(battles.c.id, *keys), where).order_by(*keys, battles.c.id)
    with engine.connect() as conn, engine.connect() as lookup:
        result = conn.execution_options(stream_results=True, yield_per=batch_size).execute(query)
        for part in result.mappings().partitions(batch_size):
            yield _with_answers(lookup, [dict(row) for row in part])


def count_battles(engine: Engine, *, where: BattleFilter | None = None) -> int:
    """How many stored battles `where` selects (what `iter_battles` would yield)."""
    selected = _battles_where(sa.select(battles.c.id), where).subquery()
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(selected)).scalar_one())


def _battles_where(query: sa.Select, where: BattleFilter | None) -> sa.Select:
    """`query` over the battles table restricted to what `where` selects."""
    where = where or BattleFilter()
    if where.models:
        a, b = exchanges.alias("a"), exchanges.alias("b")
        models = list(where.models)
        query = query.select_from(
            battles.join(a, a.c.id == battles.c.exchange_a).join(b, b.c.id == battles.c.exchange_b)
        ).where(sa.or_(a.c.model.in_(models), b.c.model.in_(models)))
    if where.sources:
        query = query.where(battles.c.source.in_(list(where.sources)))
    return query


def _with_answers(conn: Connection, rows: list[Row]) -> list[Row]:
    """Battle rows (id, answer ids, winner, judge) completed with the rest of the battle and
    the prompt, response and model of each answer."""
    details: dict[str, Row] = {}
    ids = [row["id"] for row in rows]
    rest = (
        battles.c.id,
        battles.c.judge_preference,
        battles.c.source,
        battles.c.external_id,
        battles.c.metadata,
    )
    for start in range(0, len(ids), _PROBE_CHUNK):
        chunk = ids[start : start + _PROBE_CHUNK]
        query = sa.select(*rest).where(battles.c.id.in_(chunk))
        details.update((r["id"], dict(r)) for r in conn.execute(query).mappings())
    answers: dict[str, Row] = {}
    answer_ids = sorted({row[side] for row in rows for side in ("exchange_a", "exchange_b")})
    for start in range(0, len(answer_ids), _PROBE_CHUNK):
        chunk = answer_ids[start : start + _PROBE_CHUNK]
        query = sa.select(
            exchanges.c.id, exchanges.c.prompt, exchanges.c.response, exchanges.c.model
        ).where(exchanges.c.id.in_(chunk))
        answers.update((r["id"], dict(r)) for r in conn.execute(query).mappings())
    missing = {"prompt": None, "response": None, "model": None}
    completed = []
    for row in rows:
        answer_a = answers.get(row["exchange_a"], missing)
        answer_b = answers.get(row["exchange_b"], missing)
        completed.append(
            {
                **row,
                **{k: v for k, v in details[row["id"]].items() if k != "id"},
                **{f"{k}_a": answer_a[k] for k in missing},
                **{f"{k}_b": answer_b[k] for k in missing},
            }
        )
    return completed


def battle_options(engine: Engine) -> dict[str, Any]:
    """How many battles are stored, their answers' models and their sources, for hints."""
    a, b = exchanges.alias("a"), exchanges.alias("b")
    models = sa.union(
        sa.select(a.c.model.label("model")).select_from(
            battles.join(a, a.c.id == battles.c.exchange_a)
        ),
        sa.select(b.c.model.label("model")).select_from(
            battles.join(b, b.c.id == battles.c.exchange_b)
        ),
    ).subquery()
    with engine.connect() as conn:
        # Each result is read whole before the next query: DuckDB drops an unread one.
        count = conn.execute(sa.select(sa.func.count()).select_from(battles)).scalar_one()
        names = conn.execute(sa.select(models.c.model).where(models.c.model.is_not(None)))
        model_names = sorted(names.scalars())
        sources = sorted(conn.execute(sa.select(battles.c.source).distinct()).scalars())
    return {"battles": count, "models": model_names, "sources": sources}
