"""`prune` against an `assign` or `score` still writing rows for the run it removes.

A run `assign` or `score` read can be superseded by a newer `cluster` and removed by `prune`
before they write: the rows they then wrote (assignments, reports) were orphans no reader
saw and no prune removed. On SQLite and PostgreSQL those commands run in other processes;
here a second engine (its own connections, as another process has) prunes at a chosen point
of a real write, through SQLAlchemy's statement events, with the project's own functions.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from clustering.stages import kmeans_clusterer, pca_reducer
from clustering.step import ClusterStepConfig, cluster_exchanges
from clustering.topics import ClusterConfig
from ingest.embed_step import EmbedConfig
from ingest.pipeline import IngestConfig, ingest_paths
from storage.clusters import RunRemoved, add_assignments, latest_run, require_run
from storage.engine import open_database
from storage.models import model_ids, save_model
from storage.prune import plan_prune, prune_stored
from storage.reports import load_cluster_reports, save_scored
from tests.test_ingest_pipeline import convoscope_here as convoscope
from tests.test_prune import _run_rows, _synthetic_run
from tests.test_score_step import _signal_log

EXCHANGES = [f"{i:032x}" for i in range(4)]
LATE = f"{99:032x}"  # an exchange the writer assigns after the run was read


def _superseded_pair(engine: sa.Engine) -> tuple[str, str]:
    """An older prompt clustering (what an `assign` or `score` read) and a newer one (a
    `cluster` since), each with assignments and reports: `prune --keep 1` removes the older."""
    old = _synthetic_run(engine, "prompt", ["t0", "t1"], EXCHANGES)
    newer = _synthetic_run(engine, "prompt", ["t0", "t2"], EXCHANGES)
    assert latest_run(engine)["id"] == newer
    return old, newer


def _assign_late(engine: sa.Engine, run_id: str) -> None:
    add_assignments(engine, [{"run_id": run_id, "exchange_id": LATE, "cluster_id": "t0"}])


def _report(engine: sa.Engine, run_id: str) -> None:
    save_scored(engine, run_id, {"t0": {"weakness": 0.9}})


# (what a writer stores, the statement it starts its rows with, the command to run again)
WRITERS: dict[str, tuple[Callable[[sa.Engine, str], None], str, str]] = {
    "assign": (_assign_late, "INSERT INTO assignments", "convoscope assign"),
    "score": (_report, "DELETE FROM cluster_reports", "convoscope score"),
}


def test_writes_for_a_pruned_run_store_nothing_and_say_so(db_url: str) -> None:
    """An `assign` or `score` that read a run before a newer clustering superseded it and a
    prune removed it: its assignments and reports are refused with a message naming the run,
    the prune and the command to run again, and nothing is stored for the run (they were
    stored as orphans). The latest run still takes both."""
    engine = open_database(db_url)
    old, newer = _superseded_pair(engine)
    plan = plan_prune(engine, keep=1)
    assert [run.id for run in plan.remove_runs] == [old]
    prune_stored(engine, plan)

    for store, _, again in WRITERS.values():
        with pytest.raises(RunRemoved) as refused:
            store(engine, old)
        message = str(refused.value)
        assert f"clustering run {old} was removed by `convoscope prune` while this ran" in message
        assert f"run `{again}` again" in message
    with pytest.raises(RunRemoved):
        require_run(engine, old, stored="new assignments", again="assign")
    assert set(_run_rows(engine, old).values()) == {0}
    # `score`'s routing table names the run its per-cluster choices are for: refused too.
    table = {"files": {"routing_table.json": b"{}"}, "config": {"run_id": old}, "metrics": {}}
    with pytest.raises(RunRemoved, match=r"\(routing table\) was not stored"):
        save_model(engine, "routing_table", **table, run_id=old)  # type: ignore[arg-type]
    assert model_ids(engine, "routing_table") == []

    _assign_late(engine, newer)
    _report(engine, newer)
    assert _run_rows(engine, newer)["assignments"] == len(EXCHANGES) + 1
    assert load_cluster_reports(engine, newer) == {"t0": {"weakness": 0.9}}
    engine.dispose()


class _Thread(threading.Thread):
    """A thread that keeps what its target raised, for the test to assert on."""

    def __init__(self, target: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._work = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._work()
        except BaseException as error:  # handed to the test
            self.error = error


def _wait_while_running(thread: _Thread, db_url: str) -> bool:
    """Give `thread` time to finish; True when it did. Where the fix holds it blocks on the
    other transaction's lock: PostgreSQL shows that waiter (so the wait ends at once), SQLite
    does not (its busy handler retries), so a second is given there; unblocked, a prune or
    a write of a few rows takes milliseconds."""
    if not db_url.startswith("postgresql"):
        thread.join(1.0)
        return not thread.is_alive()
    observer = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    waiting = sa.text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    try:
        deadline = time.monotonic() + 10
        while thread.is_alive() and time.monotonic() < deadline:
            with observer.connect() as conn:
                if conn.execute(waiting).scalar_one():
                    return False
            thread.join(0.05)
        return not thread.is_alive()
    finally:
        observer.dispose()


def _two_processes(db_url: str) -> tuple[sa.Engine, sa.Engine]:
    if db_url.startswith("duckdb"):
        pytest.skip("a DuckDB file is opened by one process: no prune runs beside a writer")
    return open_database(db_url), open_database(db_url)


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_prune_waits_for_a_write_in_flight_and_its_rows_go_with_the_run(
    db_url: str, writer: str
) -> None:
    """The prune comes while the writer's transaction is storing rows for the run: it waits
    for that transaction, then removes the run with what it wrote. It deleted the run's
    assignments and reports first and the run's row last, so rows the writer had not yet
    committed stayed behind (PostgreSQL); the writer checked nothing (SQLite, PostgreSQL)."""
    store, first_statement, _ = WRITERS[writer]
    writing, pruning = _two_processes(db_url)
    old, newer = _superseded_pair(writing)
    plan = plan_prune(pruning, keep=1)
    prune = _Thread(lambda: prune_stored(pruning, plan))
    finished_early: list[bool] = []

    def prune_mid_write(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith(first_statement) and not finished_early:
            prune.start()
            finished_early.append(_wait_while_running(prune, db_url))

    sa.event.listen(writing, "before_cursor_execute", prune_mid_write)
    try:
        store(writing, old)  # went first: no error
    finally:
        sa.event.remove(writing, "before_cursor_execute", prune_mid_write)
    prune.join(60)
    assert prune.error is None, prune.error
    assert set(_run_rows(writing, old).values()) == {0}  # no orphans
    assert finished_early == [False]  # the prune waited for the write
    assert _run_rows(writing, newer)["assignments"] == len(EXCHANGES)
    writing.dispose()
    pruning.dispose()


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_write_after_a_prune_began_finds_the_run_gone_and_stores_nothing(
    db_url: str, writer: str
) -> None:
    """The writer comes while the prune's transaction is removing the run: it waits for the
    prune, finds the run gone and stores nothing, saying so. It wrote its rows beside the
    prune's deletes (PostgreSQL) or right after its commit (SQLite), as orphans."""
    store, _, again = WRITERS[writer]
    writing, pruning = _two_processes(db_url)
    old, newer = _superseded_pair(writing)
    plan = plan_prune(pruning, keep=1)
    write = _Thread(lambda: store(writing, old))
    finished_early: list[bool] = []

    def write_mid_prune(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("DELETE FROM cluster_runs") and not finished_early:
            write.start()
            finished_early.append(_wait_while_running(write, db_url))

    sa.event.listen(pruning, "after_cursor_execute", write_mid_prune)
    try:
        prune_stored(pruning, plan)
    finally:
        sa.event.remove(pruning, "after_cursor_execute", write_mid_prune)
    write.join(60)
    assert set(_run_rows(writing, old).values()) == {0}  # no orphans
    assert isinstance(write.error, RunRemoved), write.error
    assert f"run `{again}` again" in str(write.error)
    assert finished_early == [False]  # the write waited for the prune
    assert _run_rows(writing, newer)["assignments"] == len(EXCHANGES)
    writing.dispose()
    pruning.dispose()


def test_assign_says_when_prune_removed_its_run_while_it_embedded(tmp_path: Path) -> None:
    """`convoscope assign` reads the latest run, embeds the new exchanges (minutes on a
    large log), then assigns them. A newer clustering and a prune meanwhile removed the run:
    it failed with numpy's "need at least one array to stack"; it now says which run went,
    why, and to run `assign` again (exit 2), and stores no assignment for the run."""
    log = _signal_log(tmp_path / "chats.jsonl")
    db = f"sqlite:///{tmp_path / 'race.sqlite'}"
    engine = open_database(db)
    ingest = IngestConfig(progress=False, rejects_path=tmp_path / "rejects.jsonl")
    ingest_paths([log], engine=engine, config=ingest)
    cluster_exchanges(
        engine,
        config=ClusterStepConfig(
            embed=EmbedConfig(device="cpu", progress=False), topics=ClusterConfig(layout=False)
        ),
        reducer=pca_reducer(5),
        clusterer=kmeans_clusterer(3),
    )
    read = latest_run(engine)["id"]
    before = _run_rows(engine, read)["assignments"]
    more = tmp_path / "more.jsonl"
    more.write_text(log.read_text().replace("city number", "town number"))
    ingest_paths([more], engine=engine, config=ingest)
    pruned: list[str] = []

    def cluster_and_prune(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("INSERT INTO vectors") and not pruned:  # assign's embedding
            pruned.append(_synthetic_run(engine, "prompt", ["t9"], []))
            prune_stored(engine, plan_prune(engine, keep=1))

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", cluster_and_prune)
    try:
        assigned = convoscope("assign", "--device", "cpu", db=db, cwd=tmp_path)
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", cluster_and_prune)
    assert pruned and before > 0
    assert assigned.returncode == 2, assigned.stderr
    assert assigned.stderr.strip() == (
        f"convoscope: error: clustering run {read} was removed by `convoscope prune` while "
        "this ran (a newer `convoscope cluster` had superseded it), so what it computed for "
        "that run (new assignments) was not stored: run `convoscope assign` again, which works "
        "on the latest clustering"
    )
    assert set(_run_rows(engine, read).values()) == {0}
    engine.dispose()
