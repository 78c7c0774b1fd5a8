"""Storage on real DuckDB, SQLite and PostgreSQL: schema, migrations, idempotent writes."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Engine

from storage.cache import StoredCache
from storage.clusters import add_tag, annotate_cluster, load_tags
from storage.engine import StorageError, database_file, make_engine, open_database, resolve_url
from storage.logs import ExchangeFilter, iter_exchanges, store_batch, table_counts, utcnow
from storage.schema import metadata, tags


def _exchange(i: int, *, model: str = "m1", retried: bool | None = None) -> dict:
    return {
        "id": f"{i:032x}",
        "conversation_id": f"{i // 2:032x}",
        "turn_index": 1 + 2 * (i % 2),
        "context": "[]",
        "prompt": f"question {i}",
        "response": f"answer {i}",
        "model": model,
        "instruction": None,
        "created_at": None,
        "source": "test.jsonl",
        "external_id": f"ext-{i}",
        "retried": retried,
        "edited": None,
        "deleted": None,
        "rating": None,
        "thumbs": None,
        "user_turns_after": 0 if i % 2 else 1,
        "ended_conversation": bool(i % 2),
        "seconds_to_next_user_message": None,
        "metadata": None,
        "ingested_at": utcnow(),
    }


def _conversation(i: int) -> dict:
    return {
        "id": f"{i:032x}",
        "external_id": None,
        "source": "test.jsonl",
        "created_at": None,
        "n_messages": 4,
        "thumbs": None,
        "rating": None,
        "feedback_text": None,
        "metadata": None,
        "ingested_at": utcnow(),
    }


def _columns_in_database(engine: sa.Engine) -> dict[str, set[str]]:
    """Tables and columns as the database reports them (duckdb_engine cannot reflect on
    SQLAlchemy 2.1, so DuckDB and PostgreSQL are read through information_schema)."""
    if engine.dialect.name == "sqlite":
        inspector = sa.inspect(engine)
        tables = inspector.get_table_names()
        return {t: {c["name"] for c in inspector.get_columns(t)} for t in tables}
    query = sa.text(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema IN ('main', 'public')"
    )
    found: dict[str, set[str]] = {}
    with engine.connect() as conn:
        for table, column in conn.execute(query):
            found.setdefault(table, set()).add(column)
    return found


def test_migrations_build_exactly_the_schema(db_url: str) -> None:
    engine = open_database(db_url)
    found = _columns_in_database(engine)
    found.pop("alembic_version")
    expected = {name: {c.name for c in table.columns} for name, table in metadata.tables.items()}
    assert found == expected
    if engine.dialect.name != "duckdb":  # types and keys too, where reflection works
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    engine.dispose()


def test_opening_twice_is_a_no_op_and_keeps_rows(db_url: str) -> None:
    engine = open_database(db_url)
    store_batch(engine, conversation_rows=[_conversation(0)], exchange_rows=[_exchange(0)])
    engine.dispose()
    engine = open_database(db_url)
    assert table_counts(engine)["exchanges"] == 1
    engine.dispose()


def test_database_from_a_newer_version_is_refused(db_url: str) -> None:
    engine = open_database(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_future'"))
    engine.dispose()
    with pytest.raises(StorageError, match="newer version"):
        open_database(db_url)


def test_batches_skip_what_is_stored_and_keep_nulls(db_url: str) -> None:
    engine = open_database(db_url)
    rows = [_exchange(i) for i in range(6)]
    first = store_batch(
        engine,
        conversation_rows=[_conversation(i) for i in range(3)],
        exchange_rows=rows,
    )
    assert (first.stored, first.duplicates) == (6, 0)
    # Same rows again plus one new one and one repeated inside the batch.
    again = store_batch(
        engine,
        conversation_rows=[_conversation(0)],
        exchange_rows=[*rows, _exchange(6), _exchange(6)],
    )
    assert (again.stored, again.duplicates) == (1, 7)
    stored = [row for batch in iter_exchanges(engine) for row in batch]
    assert len(stored) == 7
    assert all(row["retried"] is None and row["rating"] is None for row in stored)
    assert {row["ended_conversation"] for row in stored} == {True, False}
    engine.dispose()


def test_a_batch_holding_a_stored_row_is_stored_whole_but_that_row(db_url: str) -> None:
    """DuckDB stores a batch as all new first and, at a stored row, rolls that back and stores
    the batch again skipping stored ids: nothing of the first try is kept, so nothing twice."""
    engine = open_database(db_url)
    store_batch(engine, conversation_rows=[_conversation(0)], exchange_rows=[_exchange(0)])
    # A new conversation is inserted first, then new exchanges around a stored one.
    counts = store_batch(
        engine,
        conversation_rows=[_conversation(5)],
        exchange_rows=[_exchange(10), _exchange(0), _exchange(11)],
    )
    assert (counts.stored, counts.duplicates) == (2, 1)
    assert table_counts(engine) == {"conversations": 2, "exchanges": 3, "battles": 0}
    engine.dispose()


def test_battles_load_in_one_order_on_every_engine(db_url: str) -> None:
    """Reward training reads battles in the order loaded: in the join's own order the same
    data trained other rewards (and another data fingerprint) on PostgreSQL than on DuckDB."""
    from storage.logs import load_battles

    engine = open_database(db_url)
    rows = [_exchange(i) for i in range(8)]
    store_batch(engine, conversation_rows=[_conversation(i) for i in range(4)], exchange_rows=rows)
    for i in (3, 0, 2, 1):  # stored out of id order, one batch each
        battle = {
            "id": f"{i:032x}",
            "exchange_a": rows[2 * i]["id"],
            "exchange_b": rows[2 * i + 1]["id"],
            "winner": "a",
            "judge": None,
            "judge_preference": None,
            "source": "b.jsonl",
            "external_id": None,
            "metadata": None,
            "ingested_at": utcnow(),
        }
        store_batch(engine, conversation_rows=[], exchange_rows=[], battle_rows=[battle])
    assert [b["id"] for b in load_battles(engine)] == [f"{i:032x}" for i in range(4)]
    engine.dispose()


@contextmanager
def _another_writer(
    db_url: str, before: str, write: Callable[[Engine], object]
) -> Iterator[Engine]:
    """An engine on `db_url` whose first statement starting with `before` runs after another
    process (a second engine) has done `write`: the race between a look-up and an insert."""
    engine = open_database(db_url)
    other = open_database(db_url)
    pending = [write]

    def other_writer_first(_conn, _cursor, statement: str, *_args: object) -> None:
        if statement.startswith(before) and pending:
            pending.pop()(other)

    sa.event.listen(engine, "before_cursor_execute", other_writer_first)
    try:
        yield engine
    finally:
        other.dispose()
        engine.dispose()


def test_rows_another_writer_stores_meanwhile_are_skipped(db_url: str) -> None:
    """Two ingests into PostgreSQL (or two processes on a SQLite file) that share a battle's
    answer: the other one stored it between this one's look-up and its insert, which then
    failed on the primary key with a traceback."""
    if db_url.startswith("duckdb"):
        pytest.skip("one writing process at a time: DuckDB skips stored ids inside the insert")
    rows = [_exchange(i) for i in range(4)]

    def shared(other: Engine) -> None:  # what the other one stores
        store_batch(other, conversation_rows=[_conversation(0)], exchange_rows=rows[:2])

    with _another_writer(db_url, "INSERT INTO conversations", shared) as engine:
        counts = store_batch(
            engine, conversation_rows=[_conversation(0), _conversation(1)], exchange_rows=rows
        )
        assert (counts.stored, counts.duplicates) == (2, 2)
        assert table_counts(engine) == {"conversations": 2, "exchanges": 4, "battles": 0}


def test_a_tag_another_writer_adds_meanwhile_is_not_an_error(db_url: str) -> None:
    """Two people tagging the same cluster at once (PostgreSQL, or two processes on a SQLite
    file): the other one's tag landed between this one's look-up and its insert, which then
    failed on the primary key."""
    if db_url.startswith("duckdb"):
        pytest.skip("one writing process at a time")

    def tag(other: Engine) -> None:
        add_tag(other, "cluster", "t1", "billing")

    with _another_writer(db_url, "INSERT INTO tags", tag) as engine:
        add_tag(engine, "cluster", "t1", "billing")
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(tags)).scalar_one() == 1


def test_a_cluster_another_writer_names_meanwhile_is_renamed(db_url: str) -> None:
    """Two people naming a cluster at once: the other one's name landed between this one's
    look-up and its insert, which failed on the key; now the later name wins and the other
    one's note is kept."""
    if db_url.startswith("duckdb"):
        pytest.skip("one writing process at a time")

    def name(other: Engine) -> None:
        annotate_cluster(other, "t1", name="Refunds", note="seen by ops")

    with _another_writer(db_url, "INSERT INTO cluster_annotations", name) as engine:
        kept = annotate_cluster(engine, "t1", name="Billing")
        assert kept == {"name": "Billing", "note": "seen by ops"}


def test_an_instruction_another_writer_saves_meanwhile_takes_the_next_version(
    db_url: str,
) -> None:
    """Two saves of one cluster's instruction at once (two people on the Replay page, or a
    `replay --cluster --instruction` beside them): both read the same highest version and
    both stored the next one, so "the latest version" was whichever came back first."""
    from storage.reports import load_instructions, save_instruction

    def save(other: Engine) -> None:
        save_instruction(other, "t1", "Answer briefly.")

    with _another_writer(db_url, "INSERT INTO instructions", save) as engine:
        saved = save_instruction(engine, "t1", "Answer step by step.")
        assert saved["version"] == 2
        versions = [(v["version"], v["text"]) for v in load_instructions(engine, "t1")]
        assert versions == [(2, "Answer step by step."), (1, "Answer briefly.")]


def test_an_upgrade_renumbers_repeated_instruction_versions_and_keeps_every_one(
    db_url: str,
) -> None:
    """A database written before versions were unique may hold two rows of one version: the
    upgrade keeps both, the later one as the cluster's next version, no other moves, and
    every index stays (DuckDB's upgrade copies the table to renumber it)."""
    from storage.migrate import upgrade
    from storage.reports import load_instructions
    from storage.schema import instructions

    def version(row_id: str, cluster_id: str, number: int, second: int) -> dict:
        created = utcnow().replace(year=2026, month=1, day=1, hour=0, minute=0, second=second)
        return {
            "id": row_id,
            "cluster_id": cluster_id,
            "version": number,
            "text": row_id,
            "created_at": created,
        }

    old = make_engine(resolve_url(db_url))
    upgrade(old, "0005")
    with old.begin() as conn:
        conn.execute(
            sa.insert(instructions),
            [
                version("a1", "t1", 1, 0),
                version("a2-later", "t1", 2, 2),
                version("a2", "t1", 2, 1),
                version("a3", "t1", 3, 3),
                version("b1", "t2", 1, 0),
            ],
        )
        conn.exec_driver_sql("CREATE INDEX my_instructions ON instructions (created_at)")
    old.dispose()
    engine = open_database(db_url)
    found = {v["id"]: (v["cluster_id"], v["version"]) for v in load_instructions(engine)}
    assert found == {
        "a1": ("t1", 1),
        "a2": ("t1", 2),
        "a3": ("t1", 3),
        "a2-later": ("t1", 4),
        "b1": ("t2", 1),
    }
    kept = {i["name"] for i in _indexes(engine, "instructions")}
    assert {"my_instructions", "ix_instructions_cluster_id"} <= kept  # DuckDB rebuilt the table
    engine.dispose()


def test_a_cached_answer_another_writer_stores_meanwhile_is_not_an_error(db_url: str) -> None:
    """Two `cluster --llm-names` runs asking the same question at once (PostgreSQL)."""
    if not db_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: one DuckDB writer; the delete before it locks a SQLite file")

    def answer(other: Engine) -> None:
        StoredCache(other)["q"] = "Refunds"

    with _another_writer(db_url, "INSERT INTO llm_cache", answer) as engine:
        StoredCache(engine)["q"] = "Refunds"
        assert dict(StoredCache(engine)) == {"q": "Refunds"}


def test_filters_select_by_model(db_url: str) -> None:
    engine = open_database(db_url)
    store_batch(
        engine,
        conversation_rows=[_conversation(0)],
        exchange_rows=[_exchange(0, model="a"), _exchange(1, model="b", retried=True)],
    )
    rows = [r for b in iter_exchanges(engine, where=ExchangeFilter(models=("b",))) for r in b]
    assert [(r["model"], r["retried"]) for r in rows] == [("b", True)]
    engine.dispose()


def test_read_only_open_of_an_empty_database_explains(tmp_path) -> None:
    path = tmp_path / "empty.duckdb"
    import duckdb

    duckdb.connect(str(path)).close()  # a database file with nothing in it
    with pytest.raises(StorageError, match="not initialised"):
        open_database(str(path), read_only=True)


def test_a_read_only_open_brings_an_older_database_up_to_date(db_url: str) -> None:
    """`export` and the UI open read-only: an older schema is migrated first, as any other
    command does, rather than refused with no read-only way out."""
    from storage.migrate import current_revision, head_revision, upgrade

    old = make_engine(resolve_url(db_url))
    upgrade(old, "0003")
    store_batch(old, conversation_rows=[_conversation(0)], exchange_rows=[_exchange(0)])
    old.dispose()
    engine = open_database(db_url, read_only=True)
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
    assert table_counts(engine)["exchanges"] == 1
    engine.dispose()


def test_urls_resolve_from_paths_and_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CONVOSCOPE_DB", raising=False)
    assert resolve_url(None) == f"duckdb:///{tmp_path / 'convoscope.duckdb'}"
    assert resolve_url("logs.sqlite") == f"sqlite:///{tmp_path / 'logs.sqlite'}"
    assert resolve_url(":memory:") == "duckdb:///:memory:"  # not a file of that name
    monkeypatch.setenv("CONVOSCOPE_DB", "postgresql://u@127.0.0.1/db")
    assert resolve_url(None) == "postgresql+psycopg://u@127.0.0.1/db"


@pytest.mark.parametrize("name", ["what?.duckdb", "x?mode=ro.sqlite", "p%20q.duckdb", "a#b é.db"])
def test_a_file_path_opens_the_file_it_names(tmp_path, name: str) -> None:
    """A path is not a URL: `what?.duckdb` created a file named `what` (the rest read as
    URL options) and `p%20q.duckdb` one named `p q.duckdb`."""
    open_database(str(tmp_path / name)).dispose()
    files = [p.name for p in tmp_path.iterdir() if not p.name.endswith(("-wal", "-shm"))]
    assert files == [name]
    assert database_file(resolve_url(str(tmp_path / name))) == tmp_path / name


def test_upgrading_an_old_database_keeps_its_rows(db_url: str) -> None:
    from storage.engine import make_engine, resolve_url
    from storage.migrate import current_revision, head_revision, upgrade

    old = make_engine(resolve_url(db_url))
    upgrade(old, "0001")  # a database as the first release left it
    store_batch(old, conversation_rows=[_conversation(0)], exchange_rows=[_exchange(0)])
    old.dispose()
    engine = open_database(db_url)
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
    assert table_counts(engine)["exchanges"] == 1
    engine.dispose()


def test_an_interrupted_upgrade_leaves_the_database_as_it_was(db_url: str) -> None:
    """Ctrl-C (or a kill) right after a migration's ALTER TABLE: SQLite had committed the
    column without the revision, and every later open failed on "duplicate column name"."""
    from storage.migrate import current_revision, head_revision, upgrade

    old = make_engine(resolve_url(db_url))
    upgrade(old, "0002")
    store_batch(old, conversation_rows=[_conversation(0)], exchange_rows=[_exchange(0)])

    def interrupt(_conn, _cursor, statement: str, *_args: object) -> None:
        if "context_parent" in statement:
            raise KeyboardInterrupt

    sa.event.listen(old, "after_cursor_execute", interrupt)
    with pytest.raises(KeyboardInterrupt):
        upgrade(old)
    old.dispose()
    engine = open_database(db_url)
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
    assert table_counts(engine)["exchanges"] == 1
    engine.dispose()


def test_floats_keep_every_digit_and_an_upgrade_keeps_the_old_ones(db_url: str) -> None:
    """DuckDB's FLOAT is 32 bits: 61.123456789 s read back as 61.12345886230469. The schema
    asks for double precision (migration 0004); a value stored before keeps its 32 bits."""
    from storage.migrate import upgrade
    from storage.scores import load_scores, store_scores

    seconds = 61.123456789
    old = make_engine(resolve_url(db_url))
    upgrade(old, "0003")  # a database as the last release with 32-bit floats left it
    before = {**_exchange(0), "seconds_to_next_user_message": seconds, "rating": 4.25}
    store_batch(old, conversation_rows=[_conversation(0)], exchange_rows=[before])
    with old.begin() as conn:  # an index of the user's own: kept across the migration
        conn.exec_driver_sql('CREATE INDEX "my ""scores"" index" ON scores (scorer)')
    old.dispose()
    engine = open_database(db_url)
    after = {**_exchange(1), "seconds_to_next_user_message": seconds}
    store_batch(engine, conversation_rows=[], exchange_rows=[after])
    store_scores(engine, "reward:test", {after["id"]: 0.123456789012})
    rows = {r["id"]: r for batch in iter_exchanges(engine) for r in batch}
    assert rows[after["id"]]["seconds_to_next_user_message"] == seconds
    assert rows[before["id"]]["seconds_to_next_user_message"] == pytest.approx(seconds, rel=1e-6)
    assert rows[before["id"]]["rating"] == 4.25
    assert load_scores(engine, "reward:test") == {after["id"]: 0.123456789012}
    assert 'my "scores" index' in {i["name"] for i in _indexes(engine, "scores")}
    engine.dispose()


def test_storing_a_scorer_again_replaces_the_given_values_and_keeps_the_others(
    db_url: str,
) -> None:
    from storage.scores import latest_scorer, load_scores, store_scores

    engine = open_database(db_url)
    assert store_scores(engine, "reward:a", {"e1": 0.1, "e2": 0.2}) == 2
    store_scores(engine, "reward:b", {"e1": 9.0})
    store_scores(engine, "reward:a", {"e2": 0.5, "e3": 0.3})
    assert load_scores(engine, "reward:a") == {"e1": 0.1, "e2": 0.5, "e3": 0.3}
    assert load_scores(engine, "reward:b") == {"e1": 9.0}
    assert latest_scorer(engine, "reward:") == "reward:a"  # written last: the one read
    engine.dispose()


def test_scores_too_many_for_duckdbs_cap_to_commit_are_stored(tmp_path, monkeypatch) -> None:
    """A commit adds the transaction's primary-key entries to the table's index while holding
    its own, beyond the cap's reach: 1M reward scores failed their commit under 256 MB, as
    700K do under 16 MB here unless the cap makes room for both (storage.engine.make_room)."""
    from storage.scores import load_scores, store_scores

    monkeypatch.setenv("CONVOSCOPE_DUCKDB_MEMORY", "16MB")
    engine = open_database(f"duckdb:///{tmp_path / 'scores.duckdb'}")
    # Hash ids, as exchanges have: spread over the index, they take the room they do in use.
    values = {hashlib.sha256(b"%d" % i).hexdigest(): i / 8 for i in range(700_000)}
    scorer = f"reward:{'0' * 32}"  # as long as a model's: the keys' length sets the index's size
    assert store_scores(engine, scorer, values) == len(values)
    assert load_scores(engine, scorer) == values
    engine.dispose()


def test_an_index_that_blocks_the_migration_is_named_and_nothing_changes(tmp_path) -> None:
    """DuckDB cannot retype a column a (user's) index covers within the migration's
    transaction: the error names the index and what to do, and the database stays as it was."""
    from storage.migrate import current_revision, upgrade

    url = f"duckdb:///{tmp_path / 'blocked.duckdb'}"
    old = make_engine(url)
    upgrade(old, "0003")
    with old.begin() as conn:
        conn.exec_driver_sql("CREATE INDEX by_value ON scores (value)")
    old.dispose()
    with pytest.raises(StorageError, match=r"scores\.value .*'by_value'.*Drop that index"):
        open_database(url)
    old = make_engine(url)
    with old.connect() as conn:
        assert current_revision(conn) == "0003"
    old.dispose()


def _indexes(engine: sa.Engine, table: str) -> list[dict[str, str]]:
    """A table's indexes by name (duckdb_engine cannot reflect them on SQLAlchemy 2.1)."""
    if engine.dialect.name != "duckdb":
        return sa.inspect(engine).get_indexes(table)  # type: ignore[return-value]
    with engine.connect() as conn:
        query = "SELECT index_name FROM duckdb_indexes() WHERE table_name = ?"
        return [{"name": n} for (n,) in conn.exec_driver_sql(query, (table,))]


def test_a_database_with_a_clashing_table_is_refused_and_left_alone(db_url: str) -> None:
    other = make_engine(resolve_url(db_url))
    with other.begin() as conn:  # another application's tables, one named like ours
        conn.execute(sa.text("CREATE TABLE exchanges (id INTEGER)"))
        conn.execute(sa.text("CREATE TABLE invoices (id INTEGER)"))
    sqlite_file = Path(sa.make_url(db_url).database or "") if db_url.startswith("sqlite") else None
    before = sqlite_file.read_bytes() if sqlite_file else None
    with pytest.raises(StorageError, match=r"not a convoscope database.*exchanges"):
        open_database(db_url)
    assert set(sa.inspect(other).get_table_names()) == {"exchanges", "invoices"}
    other.dispose()
    if sqlite_file is not None:  # not even the journal mode changed
        assert sqlite_file.read_bytes() == before


def test_a_database_with_unrelated_tables_only_is_used(db_url: str) -> None:
    other = make_engine(resolve_url(db_url))
    with other.begin() as conn:
        conn.execute(sa.text("CREATE TABLE invoices (id INTEGER)"))
    other.dispose()
    engine = open_database(db_url)
    assert {"invoices", "exchanges", "alembic_version"} <= set(sa.inspect(engine).get_table_names())
    engine.dispose()


def test_an_existing_file_opens_with_the_engine_its_header_names(tmp_path) -> None:
    import duckdb

    duckdb_file = tmp_path / "duck.db"  # DuckDB's own files are often named .db
    duckdb.connect(str(duckdb_file)).close()
    assert resolve_url(str(duckdb_file)) == f"duckdb:///{duckdb_file}"
    open_database(str(duckdb_file)).dispose()
    sqlite_file = tmp_path / "lite.duckdb"
    open_database(f"sqlite:///{sqlite_file}").dispose()
    assert resolve_url(str(sqlite_file)) == f"sqlite:///{sqlite_file}"
    assert resolve_url(str(tmp_path / "new.db")) == f"sqlite:///{tmp_path / 'new.db'}"
    text_file = tmp_path / "notes.db"
    text_file.write_text("not a database at all, just some notes\n" * 10)
    with pytest.raises(StorageError, match="not a sqlite database"):
        open_database(str(text_file))
    assert text_file.read_text().startswith("not a database")
    with pytest.raises(StorageError, match="neither a file path nor a database URL"):
        open_database("://x")  # SQLAlchemy's ArgumentError reached the user as a traceback
    log = tmp_path / "chats.jsonl"  # DuckDB opened it as an empty in-memory database
    log.write_text('{"messages": []}\n')
    for db in (str(log), f"duckdb:///{log}"):
        with pytest.raises(StorageError, match=r"chats\.jsonl exists and is not a DuckDB database"):
            open_database(db)
    assert log.read_text() == '{"messages": []}\n'


def test_file_databases_get_their_folder_or_a_clear_error(tmp_path) -> None:
    engine = open_database(f"sqlite:///{tmp_path / 'new' / 'dir' / 'logs.sqlite'}")
    engine.dispose()
    assert (tmp_path / "new" / "dir" / "logs.sqlite").is_file()
    blocker = tmp_path / "chat.jsonl"
    blocker.write_text("{}\n")
    for db in [str(blocker / "x.duckdb"), f"sqlite:///{blocker / 'x.sqlite'}"]:
        with pytest.raises(StorageError, match=re.escape(f"{blocker}: is a file, not a folder")):
            open_database(db)
    assert blocker.read_text() == "{}\n"


def test_read_only_open_never_creates_a_database(tmp_path) -> None:
    for name in ["missing.duckdb", "missing.sqlite"]:
        with pytest.raises(StorageError, match="no database at"):
            open_database(str(tmp_path / name), read_only=True)
        assert not (tmp_path / name).exists()


@pytest.mark.parametrize("where", ["file", "memory"])
def test_duckdb_connections_share_the_database_and_stream_side_by_side(
    where: str, tmp_path
) -> None:
    """A reader looks things up on a second connection while the first streams: a DuckDB
    connection runs one result at a time, so one shared connection would end the stream."""
    from storage.schema import exchanges

    engine = open_database(":memory:" if where == "memory" else str(tmp_path / "x.duckdb"))
    rows = [_exchange(i) for i in range(6)]
    store_batch(engine, conversation_rows=[_conversation(i) for i in range(3)], exchange_rows=rows)
    seen: list[str] = []
    with engine.connect() as streaming, engine.connect() as other:
        query = sa.select(exchanges.c.id).order_by(exchanges.c.id)
        result = streaming.execution_options(stream_results=True, yield_per=2).execute(query)
        for part in result.partitions(2):
            seen += [row.id for row in part]
            count = sa.select(sa.func.count()).select_from(exchanges)
            assert other.execute(count).scalar_one() == 6
    assert seen == sorted(r["id"] for r in rows)
    engine.dispose()


def _run_row(*, n_rows: int, n_clusters: int) -> dict[str, object]:
    """A stored clustering run's row ("run1", on prompts), for tests of what hangs off it."""
    return {
        "id": "run1",
        "created_at": utcnow(),
        "on_field": "prompt",
        "embedder": "m",
        "params": "{}",
        "n_rows": n_rows,
        "n_clusters": n_clusters,
        "unassigned_share": 0.0,
        "events": None,
    }


def test_topic_and_group_reports_share_a_run_and_are_read_by_level(db_url: str) -> None:
    """Group reports live beside topic reports (no schema change): every reader asks for the
    level it shows, and a re-score replaces both together."""
    from storage.clusters import save_cluster_run
    from storage.reports import load_cluster_reports, save_scored

    engine = open_database(db_url)
    run = _run_row(n_rows=3, n_clusters=2)
    base = {"auto_name": "x", "keywords": "[]", "size": 1, "share": 0.5, "run_id": "run1"}
    save_cluster_run(
        engine,
        run,
        [
            {**base, "id": "t1", "parent_id": "g1", "level": 0},
            {**base, "id": "t2", "parent_id": "g1", "level": 0},
            {**base, "id": "g1", "parent_id": None, "level": 1},
        ],
        [],
    )
    reports = {cid: {"weakness": w, "reason": cid} for cid, w in [("t1", 0.1), ("t2", 0.3)]}
    save_scored(engine, "run1", {**reports, "g1": {"weakness": 0.2, "reason": "g"}})
    assert list(load_cluster_reports(engine, "run1")) == ["t2", "t1"]  # topics by default
    assert load_cluster_reports(engine, "run1", level=1) == {"g1": {"weakness": 0.2, "reason": "g"}}
    assert list(load_cluster_reports(engine, "run1", level=None)) == ["t2", "g1", "t1"]
    save_scored(engine, "run1", {"t1": reports["t1"], "g1": {"weakness": 0.0}})
    assert list(load_cluster_reports(engine, "run1", level=None)) == ["t1", "g1"]
    engine.dispose()


def test_clusters_of_one_size_load_in_one_order_on_every_engine(db_url: str) -> None:
    """`clusters` lists unscored topics largest first in the order they load: of one size,
    DuckDB gave them in the order stored (the fit's), SQLite and PostgreSQL in id order."""
    from storage.clusters import load_clusters, save_cluster_run

    engine = open_database(db_url)
    run = _run_row(n_rows=9, n_clusters=4)
    base = {"auto_name": "x", "keywords": "[]", "share": 0.25, "run_id": "run1", "level": 0}
    stored = [("t2", 2), ("t10", 2), ("t3", 3), ("t1", 2), ("t0", 2)]  # not in id order
    save_cluster_run(engine, run, [{**base, "id": i, "size": n} for i, n in stored], [])
    assert [c["id"] for c in load_clusters(engine, "run1")] == ["t3", "t0", "t1", "t10", "t2"]
    engine.dispose()


_LONG_STATEMENT_UNDER_CTRL_C = """
import sys
import sqlalchemy as sa
from storage.engine import open_database

engine = open_database(sys.argv[1])
try:
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO tags VALUES ('cluster', 't1', 'kept?', now())"))
        print("running", flush=True)
        # 3·10^10 rows: a minute, so the SIGINT lands inside DuckDB, not between statements.
        conn.execute(sa.text("SELECT sum(range) FROM range(30000000000)"))
    print("finished")
except KeyboardInterrupt:
    print("KeyboardInterrupt")
except Exception as error:
    print(f"{type(error).__name__}: {error}")
"""


def test_ctrl_c_during_a_duckdb_statement_is_an_interrupt_and_rolls_back(tmp_path: Path) -> None:
    """DuckDB takes a SIGINT during a statement itself and raised `RuntimeError('Query
    interrupted')`: an export or a score stopped with Ctrl-C printed a traceback and exited 1,
    where Ctrl-C says what was kept and how to finish (exit 130)."""
    db = f"duckdb:///{tmp_path / 'ctrl_c.duckdb'}"
    open_database(db).dispose()
    repo = Path(__file__).resolve().parents[1]
    child = subprocess.Popen(
        [sys.executable, "-c", _LONG_STATEMENT_UNDER_CTRL_C, db],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "running"
    time.sleep(2.0)  # into the long statement
    # Again every few seconds, as a user presses Ctrl-C again: DuckDB drops an interrupt that
    # lands while it still plans the statement (seen under load: the query then ran on).
    for _ in range(10):
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=4)
            break
        except subprocess.TimeoutExpired:
            continue
    out, err = child.communicate(timeout=60)
    assert out.strip() == "KeyboardInterrupt", err
    engine = open_database(db)
    assert load_tags(engine, "cluster") == {}  # the transaction was rolled back whole
    engine.dispose()


def test_a_model_and_its_scores_are_stored_as_one(db_url: str) -> None:
    """A reward model and the scores it gave were two transactions: a `score` killed between
    them left the newest model with no scores, which `score reward apply` and `reward --file`
    then took as the current one. A failure while writing the scores now stores neither."""
    from storage.models import model_ids, save_model
    from storage.scores import latest_scorer, load_scores

    engine = open_database(db_url)
    kept = save_model(
        engine, "reward_head", files={"m": b"1"}, config={}, metrics={}, scores={"e1": 0.5}
    )
    assert load_scores(engine, f"reward:{kept}") == {"e1": 0.5}
    with pytest.raises(ValueError, match="could not convert"):  # met after the model's insert
        save_model(
            engine,
            "reward_head",
            files={"m": b"2"},
            config={},
            metrics={},
            scores={"e1": 0.1, "e2": "not a number"},  # type: ignore[dict-item]
        )
    assert model_ids(engine, "reward_head") == [kept]
    assert latest_scorer(engine, "reward:") == f"reward:{kept}"
    engine.dispose()


def test_an_ensemble_and_its_members_are_stored_as_one(db_url: str) -> None:
    """`score` stored each member of the default head+lexical ensemble, with its scores, before
    the ensemble: killed between them, a member alone became the current reward model and
    its scores the latest. Now a failure at the ensemble stores no member either, and stored
    together the ensemble is the newest model and its scores the latest."""
    from storage.models import NewModel, latest_model, model_ids, save_model, save_models
    from storage.scores import latest_scorer

    engine = open_database(db_url)
    kept = save_model(engine, "reward_head", files={}, config={}, metrics={}, scores={"e1": 0.5})
    kinds = ["reward_head", "reward_lexical", "reward_ensemble"]

    def stored_together(ensemble_score: object) -> list[NewModel]:
        head = NewModel("reward_head", {}, {}, {}, scores={"e1": 0.1})
        lexical = NewModel("reward_lexical", {}, {}, {}, scores={"e1": 0.2})
        members = {"members": [head.id, lexical.id]}
        ensemble = NewModel("reward_ensemble", {}, members, {}, scores={"e1": ensemble_score})  # type: ignore[dict-item]
        return [head, lexical, ensemble]

    with pytest.raises(ValueError, match="could not convert"):  # met after both members
        save_models(engine, stored_together("not a number"))
    assert model_ids(engine, kinds) == [kept]
    assert latest_scorer(engine, "reward:") == f"reward:{kept}"

    head, lexical, ensemble = stored_together(0.3)
    save_models(engine, [head, lexical, ensemble])
    assert model_ids(engine, kinds) == [ensemble.id, lexical.id, head.id, kept]
    newest = latest_model(engine, kinds)
    assert newest is not None and newest["id"] == ensemble.id
    assert latest_scorer(engine, "reward:") == f"reward:{ensemble.id}"
    engine.dispose()
