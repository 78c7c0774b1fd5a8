"""Counts for `convoscope status`: what the database holds and how far each step has got.

Every figure is one aggregate query (a count, a max, a group-by of a short column) and none
reads an exchange's text or context, so the status of a million-exchange database comes back
in seconds (DuckDB: 1.2 s of queries, SQLite: 4 s, most of it the anti-joins below).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from storage.logs import Row
from storage.migrate import current_revision
from storage.schema import (
    assignments,
    cluster_reports,
    clusters,
    exchanges,
    ingest_runs,
    scores,
    vectors,
)


def schema_revision(engine: Engine) -> str | None:
    """The schema revision the database is stamped with."""
    with engine.connect() as conn:
        return current_revision(conn)


def ingest_summary(engine: Engine) -> Row:
    """How many ingests ran, when the latest began, how many models the exchanges name, and
    how many exchanges have a logged time and over what span (what `trend` can follow)."""
    runs = sa.select(sa.func.count(), sa.func.max(ingest_runs.c.started_at))
    logged = exchanges.c.created_at
    models = sa.select(
        sa.func.count(sa.distinct(exchanges.c.model)),
        sa.func.count(logged),
        sa.func.min(logged),
        sa.func.max(logged),
    )
    with engine.connect() as conn:
        n_runs, latest = conn.execute(runs).one()
        n_models, dated, first, last = conn.execute(models).one()
    return {
        "ingest_runs": int(n_runs),
        "latest_ingest": latest,
        "models": int(n_models),
        "dated": int(dated),
        "first_logged": first,
        "last_logged": last,
    }


def vector_counts(engine: Engine) -> dict[str, int]:
    """Stored vectors per embedder name."""
    query = sa.select(vectors.c.model, sa.func.count()).group_by(vectors.c.model)
    with engine.connect() as conn:
        return {model: int(n) for model, n in conn.execute(query.order_by(vectors.c.model))}


def run_counts(engine: Engine, run_id: str) -> Row:
    """A clustering run's topics and groups, its assignment rows (`placed` in a topic,
    `unassigned`: stored with no topic, outliers and new rows too far from every topic), its
    reports, and `not_placed`: stored exchanges with no assignment row at all.

    `not_placed` is what `convoscope assign` would place: it reads every stored exchange and
    places those the run has no row for, storing a row even for the ones it leaves without a
    topic. So it counts missing rows, not rows with a NULL topic, and is 0 after `assign`."""
    levels = (
        sa.select(clusters.c.level, sa.func.count())
        .where(clusters.c.run_id == run_id)
        .group_by(clusters.c.level)
    )
    rows = sa.select(sa.func.count(), sa.func.count(assignments.c.cluster_id)).where(
        assignments.c.run_id == run_id
    )
    reports = sa.select(sa.func.count()).where(cluster_reports.c.run_id == run_id)
    with engine.connect() as conn:
        by_level = {level: int(n) for level, n in conn.execute(levels)}
        n_rows, placed = conn.execute(rows).one()
        n_reports = conn.execute(reports).scalar_one()
    return {
        "topics": by_level.get(0, 0),
        "groups": by_level.get(1, 0),
        "placed": int(placed),
        "unassigned": int(n_rows) - int(placed),
        "not_placed": not_placed(engine, run_id),
        "reports": int(n_reports),
    }


def not_placed(engine: Engine, run_id: str) -> int:
    """Stored exchanges a clustering run has no assignment row for (ingested or replayed
    after it): what `convoscope assign` would place (`run_counts`)."""
    has_row = sa.exists().where(
        assignments.c.run_id == run_id, assignments.c.exchange_id == exchanges.c.id
    )
    query = sa.select(sa.func.count()).select_from(exchanges).where(~has_row)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def unscored(engine: Engine, scorer: str) -> int:
    """Stored exchanges with no value from `scorer` (ingested or replayed since it scored)."""
    has_score = sa.exists().where(scores.c.scorer == scorer, scores.c.exchange_id == exchanges.c.id)
    query = sa.select(sa.func.count()).select_from(exchanges).where(~has_score)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())
