"""Reclaiming stored artefacts and score rows that nothing reads any more (`convoscope prune`).

Every `score` stores new artefacts (a reward model, often with its members; a win predictor; a
routing table) and a new set of score rows per reward model (`reward:<model id>`, one row per
exchange), and nothing else ever removes them: a database scored weekly grows without bound,
by up to ~100 MB a week with fine-tuned models. A prune keeps, and never deletes:

- the newest `keep` artefacts of each kind (the newest is what `route`, `route --export`,
  `reward --file` and `score reward apply` without `--model-id` read; the others are the
  recent versions a user may still pick with `--model-id`);
- the reward model whose scores are the latest (`latest_scorer`): what `clusters`, exports, the
  UI and `replay report` read, which is an older model after `score reward apply --model-id`;
- the reward model each field's latest clustering's reports name (`reward_scorer`), so the
  stale-report check still names scores that exist;
- every artefact a kept artefact's config names by id (an ensemble's members), transitively:
  an ensemble scores by running its members.

What goes: the other artefacts and their score rows, and `reward:` score rows whose model is
no longer stored. Reports of superseded clusterings are read by no command or page, so the
scorers they name are not kept for them.

Clustering runs grow faster still (one assignment row per exchange per run). Every reader of
a run reads the latest of its field (`storage.clusters.latest_run`): `clusters`, exports,
`assign`, `replay`, `score`, the UI, and the matching that carries ids, names, notes and tags
to a re-clustering, which reads only the previous run. So a prune keeps the newest `keep` runs
of each field (the others are there to look back at) and removes the rest with their
clusters, assignments (and map coordinates) and reports. The names, notes, tags and
instructions people gave are keyed by cluster id, not run, and stay. A removed run's cluster
ids that no kept run holds are recorded as retired, so a fresh cluster never takes one (it
would inherit what was said about an unrelated topic). A routing table names the run its
per-cluster choices were made for, but carries those clusters itself: its run is only read to
tell that the table is stale, which a removed run is by definition (`route --export` says so).

The deletes are one transaction, so a failure keeps everything, and a second prune finds
nothing more to remove. An `assign` or `score` that read a run before a newer `cluster`
superseded it and this prune removed it stores nothing for it and says so
(`storage.clusters.RunRemoved`); one whose write is in flight when the prune comes is waited
for, and its rows go with the run (`prune_stored`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from storage.clusters import latest_runs
from storage.engine import checkpoint, make_room
from storage.logs import insert_new_rows, utcnow
from storage.reports import report_scorers
from storage.schema import (
    assignments,
    cluster_reports,
    cluster_runs,
    clusters,
    retired_cluster_ids,
    scores,
    trained_models,
)
from storage.scores import latest_scorer

REWARD_PREFIX = "reward:"
# Stored ids are 32 hex digits (uuid4().hex): how a config names another artefact.
_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True, slots=True)
class StoredArtefact:
    """One row of `trained_models`, without its payload (a fine-tuned model's is ~100 MB)."""

    id: str
    kind: str
    created_at: datetime
    bytes: int  # the payload: the artefact's files, zipped as stored
    names: frozenset[str]  # the 32-hex-digit ids its config mentions


@dataclass(frozen=True, slots=True)
class StoredRun:
    """One clustering run; `rows` counts its assignment rows where a prune removes it (the
    kept runs' are not counted: that would read every row of the largest table for nothing)."""

    id: str
    on_field: str
    created_at: datetime
    clusters: int  # its topics
    rows: int = 0


@dataclass(frozen=True, slots=True)
class PrunePlan:
    """What a prune keeps and removes; `score_rows` counts the rows of each scorer removed,
    `retire` the cluster ids that only the removed runs hold."""

    keep: tuple[StoredArtefact, ...]
    remove: tuple[StoredArtefact, ...]
    score_rows: dict[str, int]
    scorers_in_use: tuple[str, ...]
    keep_runs: tuple[StoredRun, ...] = ()
    remove_runs: tuple[StoredRun, ...] = ()
    retire: tuple[str, ...] = ()

    @property
    def bytes(self) -> int:
        return sum(artefact.bytes for artefact in self.remove)

    @property
    def run_rows(self) -> int:
        return sum(run.rows for run in self.remove_runs)

    @property
    def empty(self) -> bool:
        """Nothing to delete: a second prune, or a database with nothing superseded."""
        return not (self.remove or self.score_rows or self.remove_runs)


_Item = TypeVar("_Item", StoredArtefact, StoredRun)


def plan_prune(engine: Engine, *, keep: int) -> PrunePlan:
    """What `prune_stored` would delete when keeping the newest `keep` of each kind, the
    newest `keep` clustering runs of each field, and everything in use (the module's
    docstring lists what that is)."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (the newest of each kind is in use), got {keep}")
    artefacts = stored_artefacts(engine)
    in_use = scorers_in_use(engine)
    kept = _newest_of_each(artefacts, keep, lambda a: a.kind)
    kept |= {s.removeprefix(REWARD_PREFIX) for s in in_use if s.startswith(REWARD_PREFIX)}
    kept = _with_what_they_name(kept, artefacts)
    removed = tuple(a for a in artefacts if a.id not in kept)
    stored_ids = {a.id for a in artefacts}
    counts = scorer_row_counts(engine)
    going = {f"{REWARD_PREFIX}{a.id}" for a in removed}
    orphans = {
        s for s in counts if s.removeprefix(REWARD_PREFIX) not in stored_ids and s not in in_use
    }
    keep_runs, remove_runs = _plan_runs(engine, keep)
    return PrunePlan(
        keep=tuple(a for a in artefacts if a.id in kept),
        remove=removed,
        score_rows={s: counts[s] for s in sorted(going | orphans) if s in counts},
        scorers_in_use=tuple(sorted(in_use)),
        keep_runs=keep_runs,
        remove_runs=remove_runs,
        retire=_ids_to_retire(engine, remove_runs, keep_runs),
    )


def _plan_runs(engine: Engine, keep: int) -> tuple[tuple[StoredRun, ...], tuple[StoredRun, ...]]:
    """The clustering runs kept (the newest `keep` of each field, and whatever `latest_run`
    picks even where two runs share a time) and those removed, with their row counts."""
    runs = stored_runs(engine)
    kept = _newest_of_each(runs, keep, lambda r: r.on_field)
    kept |= {run["id"] for run in latest_runs(engine)}
    going = [run.id for run in runs if run.id not in kept]
    rows = assignment_counts(engine, going)
    return (
        tuple(run for run in runs if run.id in kept),
        tuple(replace(run, rows=rows.get(run.id, 0)) for run in runs if run.id not in kept),
    )


def _newest_of_each(items: Sequence[_Item], keep: int, group: Callable[[_Item], str]) -> set[str]:
    """Ids of the newest `keep` items of each group (`items` come newest first)."""
    seen: dict[str, int] = {}
    kept = set()
    for item in items:
        seen[group(item)] = seen.get(group(item), 0) + 1
        if seen[group(item)] <= keep:
            kept.add(item.id)
    return kept


def _with_what_they_name(kept: set[str], artefacts: Sequence[StoredArtefact]) -> set[str]:
    """`kept` and every stored artefact a kept one's config names, transitively (an ensemble
    names its members; a member deleted under it would leave it unable to score)."""
    names = {a.id: a.names for a in artefacts}
    closed = {i for i in kept if i in names}
    frontier = set(closed)
    while frontier:
        named = set().union(*(names[i] for i in frontier)) & names.keys()
        frontier = named - closed
        closed |= frontier
    return closed


def stored_artefacts(engine: Engine) -> list[StoredArtefact]:
    """Every stored artefact, newest first, with its payload's size but not the payload."""
    size = _byte_length(engine, trained_models.c.payload)
    query = sa.select(
        trained_models.c.id,
        trained_models.c.kind,
        trained_models.c.created_at,
        sa.func.coalesce(size, 0).label("bytes"),
        trained_models.c.config,
    ).order_by(trained_models.c.created_at.desc(), trained_models.c.id)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        StoredArtefact(
            id=row.id,
            kind=row.kind,
            created_at=row.created_at,
            bytes=int(row.bytes),
            names=frozenset(_ID.findall(row.config or "")) - {row.id},
        )
        for row in rows
    ]


def _byte_length(engine: Engine, column: sa.Column) -> sa.ColumnElement[int]:
    """A binary column's size in bytes: SQLite's length() counts a blob's bytes, but its
    octet_length() is newer than many installed SQLites, and DuckDB has no length(BLOB)."""
    if engine.dialect.name == "sqlite":
        return sa.func.length(column)
    return sa.func.octet_length(column)


def scorers_in_use(engine: Engine) -> set[str]:
    """The scorers a command or page reads: the latest reward scores, and those the reports of
    each field's latest clustering were ranked by."""
    latest = latest_scorer(engine, REWARD_PREFIX)
    named = report_scorers(engine, [run["id"] for run in latest_runs(engine)])
    return named | ({latest} if latest else set())


def scorer_row_counts(engine: Engine) -> dict[str, int]:
    """Rows stored per reward scorer (`reward:<model id>`)."""
    query = (
        sa.select(scores.c.scorer, sa.func.count())
        .where(scores.c.scorer.startswith(REWARD_PREFIX, autoescape=True))
        .group_by(scores.c.scorer)
    )
    with engine.connect() as conn:
        return {scorer: int(n) for scorer, n in conn.execute(query)}


def stored_runs(engine: Engine) -> list[StoredRun]:
    """Every clustering run, newest first (as `latest_run` orders them)."""
    query = sa.select(
        cluster_runs.c.id,
        cluster_runs.c.on_field,
        cluster_runs.c.created_at,
        cluster_runs.c.n_clusters,
    ).order_by(cluster_runs.c.created_at.desc(), cluster_runs.c.id)
    with engine.connect() as conn:
        return [
            StoredRun(id=r.id, on_field=r.on_field, created_at=r.created_at, clusters=r.n_clusters)
            for r in conn.execute(query)
        ]


def assignment_counts(engine: Engine, run_ids: Sequence[str]) -> dict[str, int]:
    """Assignment rows of each of `run_ids` (`assign` adds rows after the fit, so a run's
    `n_rows` can be fewer), counted through the key's leading column, not all rows."""
    counted: dict[str, int] = {}
    with engine.connect() as conn:
        for start in range(0, len(run_ids), _CHUNK):
            query = (
                sa.select(assignments.c.run_id, sa.func.count())
                .where(assignments.c.run_id.in_(run_ids[start : start + _CHUNK]))
                .group_by(assignments.c.run_id)
            )
            counted.update((run_id, int(n)) for run_id, n in conn.execute(query))
    return counted


def _ids_to_retire(
    engine: Engine, removed: Sequence[StoredRun], kept: Sequence[StoredRun]
) -> tuple[str, ...]:
    """The cluster ids of the removed runs that no kept run holds and none retired before:
    once their runs go, `cluster_ids_used` finds them only in `retired_cluster_ids`."""
    if not removed:
        return ()
    with engine.connect() as conn:
        going = _cluster_ids_of(conn, [run.id for run in removed])
        staying = _cluster_ids_of(conn, [run.id for run in kept])
        retired = set(conn.execute(sa.select(retired_cluster_ids.c.cluster_id)).scalars())
    return tuple(sorted(going - staying - retired))


def _cluster_ids_of(conn: Connection, run_ids: Sequence[str]) -> set[str]:
    """The distinct cluster ids (topics and groups) of `run_ids`: a few hundred a run."""
    found: set[str] = set()
    for start in range(0, len(run_ids), _CHUNK):
        chunk = run_ids[start : start + _CHUNK]
        query = sa.select(clusters.c.id).where(clusters.c.run_id.in_(chunk)).distinct()
        found.update(conn.execute(query).scalars())
    return found


# What hangs off a clustering run, each keyed by its `run_id`; deleted after `cluster_runs`.
_RUN_TABLES = (cluster_reports, assignments, clusters)


def prune_stored(engine: Engine, plan: PrunePlan) -> None:
    """Delete the plan's artefacts, score rows and clustering runs, and record the cluster
    ids retired with the runs, in one transaction: a failure part-way (a full disk, a lost
    server) keeps every row. Runs' rows are deleted by run id, never listed: a run holds an
    assignment row per exchange.

    The runs' own rows go first, what hangs off them after. An `assign` or `score` still
    writing rows for a run holds that run's row (`storage.clusters.hold_run`) until it
    commits: on PostgreSQL the delete of the run's row waits for it, and the deletes of its
    assignments and reports, later statements, then see and remove what it wrote. With the
    run's row deleted last, they ran first and missed the rows that writer had not yet
    committed, which stayed as orphans (or the two deadlocked, where the writer went on to
    replace reports the prune had deleted). A writer that comes after the delete finds the
    run gone and stores nothing. (SQLite: the writer and the prune each hold the one write
    lock for their whole transaction, so one of them goes entirely before the other.)"""
    run_ids = [run.id for run in plan.remove_runs]
    retired = [{"cluster_id": i, "retired_at": utcnow()} for i in plan.retire]
    with engine.begin() as conn:
        _delete_each(conn, scores, scores.c.scorer, plan.score_rows)
        _delete_in(conn, trained_models, trained_models.c.id, [a.id for a in plan.remove])
        insert_new_rows(conn, retired_cluster_ids, retired)
        _delete_in(conn, cluster_runs, cluster_runs.c.id, run_ids)
        for table in _RUN_TABLES:
            _delete_each(conn, table, table.c.run_id, run_ids)
        make_room(conn, committing=True)


def _delete_each(conn: Connection, table: sa.Table, column: sa.Column, keys: Iterable[str]) -> None:
    """Delete the rows of each key (a run's million assignments, a scorer's million scores) by
    one statement per key, making room before each: DuckDB holds the index entries a
    transaction deletes in memory its cap cannot evict (about 63 MB per million assignment
    rows), and five runs of a million rows in one statement failed under the 256 MB cap."""
    for key in keys:
        make_room(conn)
        conn.execute(sa.delete(table).where(column == key))


# Values per IN list: far below every engine's limit on bound parameters (SQLite's is 32766).
_CHUNK = 500


def _delete_in(conn: Connection, table: sa.Table, column: sa.Column, values: Iterable[str]) -> None:
    values = list(values)
    for start in range(0, len(values), _CHUNK):
        conn.execute(sa.delete(table).where(column.in_(values[start : start + _CHUNK])))


def reclaim_space(engine: Engine) -> None:
    """Give the freed pages back where the engine can do so in place.

    SQLite keeps deleted pages for reuse until VACUUM rewrites the file without them (in WAL
    mode the file shrinks once the log is checkpointed, here at once). DuckDB's CHECKPOINT
    frees the blocks of row groups left empty and truncates a free tail; rows deleted from a
    row group that keeps others stay on disk until the database is copied to a new file (the
    README's `COPY FROM DATABASE`). PostgreSQL's autovacuum makes the rows' space reusable;
    returning it to the system (`VACUUM FULL`) locks the tables and is a DBA's call."""
    if engine.dialect.name == "sqlite":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM")  # refused inside a transaction
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    checkpoint(engine)  # DuckDB's; a no-op elsewhere
