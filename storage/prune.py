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
scorers they name are not kept for them. The deletes are one transaction, so a failure keeps
everything, and a second prune finds nothing more to remove.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from storage.clusters import latest_runs
from storage.engine import checkpoint
from storage.reports import report_scorers
from storage.schema import scores, trained_models
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
class PrunePlan:
    """What a prune keeps and removes; `score_rows` counts the rows of each scorer removed."""

    keep: tuple[StoredArtefact, ...]
    remove: tuple[StoredArtefact, ...]
    score_rows: dict[str, int]
    scorers_in_use: tuple[str, ...]

    @property
    def bytes(self) -> int:
        return sum(artefact.bytes for artefact in self.remove)


def plan_prune(engine: Engine, *, keep: int) -> PrunePlan:
    """What `prune_stored` would delete when keeping the newest `keep` of each kind and
    everything in use (the module's docstring lists what that is)."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (the newest of each kind is in use), got {keep}")
    artefacts = stored_artefacts(engine)
    in_use = scorers_in_use(engine)
    kept = _newest_of_each_kind(artefacts, keep)
    kept |= {s.removeprefix(REWARD_PREFIX) for s in in_use if s.startswith(REWARD_PREFIX)}
    kept = _with_what_they_name(kept, artefacts)
    removed = tuple(a for a in artefacts if a.id not in kept)
    stored_ids = {a.id for a in artefacts}
    counts = scorer_row_counts(engine)
    going = {f"{REWARD_PREFIX}{a.id}" for a in removed}
    orphans = {
        s for s in counts if s.removeprefix(REWARD_PREFIX) not in stored_ids and s not in in_use
    }
    return PrunePlan(
        keep=tuple(a for a in artefacts if a.id in kept),
        remove=removed,
        score_rows={s: counts[s] for s in sorted(going | orphans) if s in counts},
        scorers_in_use=tuple(sorted(in_use)),
    )


def _newest_of_each_kind(artefacts: Sequence[StoredArtefact], keep: int) -> set[str]:
    """Ids of the newest `keep` artefacts of each kind (`artefacts` come newest first)."""
    seen: dict[str, int] = {}
    kept = set()
    for artefact in artefacts:
        seen[artefact.kind] = seen.get(artefact.kind, 0) + 1
        if seen[artefact.kind] <= keep:
            kept.add(artefact.id)
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


def prune_stored(engine: Engine, plan: PrunePlan) -> None:
    """Delete the plan's artefacts and score rows, in one transaction: a failure part-way
    (a full disk, a lost server) keeps every row."""
    with engine.begin() as conn:
        _delete_in(conn, scores, scores.c.scorer, plan.score_rows)
        _delete_in(conn, trained_models, trained_models.c.id, [a.id for a in plan.remove])


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
