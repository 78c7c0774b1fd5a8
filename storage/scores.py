"""Per-exchange scores (reward model outputs and the like), keyed by (exchange, scorer).

A scorer name says what produced the value, e.g. `reward:<model id>`; re-scoring with the
same scorer replaces its values, so `apply` can be re-run safely.
"""

from __future__ import annotations

from collections.abc import Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from storage.engine import make_room
from storage.logs import insert_rows, upsert_rows, utcnow
from storage.schema import scores

_INSERT_CHUNK = 50_000


def store_scores(engine: Engine, scorer: str, values: Mapping[str, float]) -> int:
    """Store (or replace) one scorer's values for the given exchanges, atomically."""
    with engine.begin() as conn:
        write_scores(conn, scorer, values)
        make_room(conn, committing=True)
    return len(values)


def write_scores(conn: Connection, scorer: str, values: Mapping[str, float]) -> None:
    """`store_scores` inside the caller's transaction (a model and the scores it gave, as
    one: `storage.models.save_model`)."""
    now = utcnow()
    ids = list(values)
    # A new scorer (every `score`) has nothing to replace: its rows are inserted as they are.
    replacing = _has_values(conn, scorer)
    # A chunk of rows at a time: a dict per row for all of them held 100 MB at 100K.
    for start in range(0, len(ids), _INSERT_CHUNK):
        rows = [
            {"exchange_id": i, "scorer": scorer, "value": float(values[i]), "created_at": now}
            for i in ids[start : start + _INSERT_CHUNK]
        ]
        if replacing:  # `score reward apply` of a stored model: its values, updated in place
            upsert_rows(conn, scores, rows, update=("value", "created_at"))
        else:
            insert_rows(conn, scores, rows)


def _has_values(conn: Connection, scorer: str) -> bool:
    query = sa.select(scores.c.scorer).where(scores.c.scorer == scorer).limit(1)
    return conn.execute(query).first() is not None


def latest_scorer(engine: Engine, prefix: str) -> str | None:
    """The most recently written scorer whose name starts with `prefix`; of scorers written
    at one time, the first by name (by time alone the pick was the engine's)."""
    query = (
        sa.select(scores.c.scorer)
        .where(scores.c.scorer.startswith(prefix, autoescape=True))
        .group_by(scores.c.scorer)
        .order_by(sa.func.max(scores.c.created_at).desc(), scores.c.scorer)
        .limit(1)
    )
    with engine.connect() as conn:
        return conn.execute(query).scalar_one_or_none()


def load_scores(engine: Engine, scorer: str) -> dict[str, float]:
    """exchange id → value for one scorer."""
    query = sa.select(scores.c.exchange_id, scores.c.value).where(scores.c.scorer == scorer)
    with engine.connect() as conn:
        return {exchange_id: value for exchange_id, value in conn.execute(query)}


def latest_scores(engine: Engine, *, prefix: str) -> dict[str, float]:
    """The values of the newest scorer starting with `prefix` (empty when there is none)."""
    scorer = latest_scorer(engine, prefix)
    return load_scores(engine, scorer) if scorer else {}
