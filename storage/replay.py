"""Replay runs, their items and their judges' verdicts: the only SQL replay and judge run.

A run is created with all its items pending in one transaction. Each finished item is written
in the same transaction as the exchange it produced (`record_outcomes`), so after a crash an
item is either done with its answer stored, or not done and without one: running it again
sends exactly the items that are not done, and never stores an answer twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from storage.contexts import context_columns, read_with_contexts
from storage.logs import Row, insert_rows, store_rows, utcnow
from storage.schema import battles, exchanges, replay_items, replay_runs

PENDING, DONE, FAILED = "pending", "done", "failed"

# Ids per `IN (...)` probe: under SQLite's bound-parameter limit.
_CHUNK = 5000

# What a replay needs of an original exchange to rebuild its request and link its answer.
INPUT_COLUMNS = (
    "id",
    "conversation_id",
    "turn_index",
    "context",
    "prompt",
    "response",
    "model",
    "instruction",
    "source",
    "external_id",
)


@dataclass(frozen=True, slots=True)
class ItemOutcome:
    """How one item ended in this attempt series: done (with its answer's id) or failed."""

    exchange_id: str  # the original exchange replayed
    status: str  # done | failed
    attempts: int  # total over every run of the item, not just this one
    error: str | None = None
    response_exchange_id: str | None = None
    latency_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def create_run(
    engine: Engine,
    *,
    run_id: str,
    model: str,
    base_url: str,
    instruction: str | None,
    params: Mapping[str, Any],
    exchange_ids: Sequence[str],
) -> None:
    """Store a run and its items (all pending) atomically: a run never exists half-listed."""
    with engine.begin() as conn:
        conn.execute(
            sa.insert(replay_runs).values(
                id=run_id,
                created_at=utcnow(),
                model=model,
                base_url=base_url,
                instruction=instruction,
                params=json.dumps(dict(params), sort_keys=True, default=str),
                status="running",
            )
        )
        insert_rows(
            conn,
            replay_items,
            [
                {"run_id": run_id, "exchange_id": exchange_id, "status": PENDING, "attempts": 0}
                for exchange_id in exchange_ids
            ],
        )


def get_run(engine: Engine, run_id: str) -> Row | None:
    """The run's row (params decoded), or None when there is no such run."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(replay_runs).where(replay_runs.c.id == run_id)).mappings()
        found = row.first()
    if found is None:
        return None
    run = dict(found)
    run["params"] = json.loads(run["params"]) if run["params"] else {}
    return run


def list_runs(engine: Engine) -> list[Row]:
    """Every run, newest first, with its item counts per status."""
    with engine.connect() as conn:
        runs = conn.execute(
            sa.select(replay_runs).order_by(replay_runs.c.created_at.desc())
        ).mappings()
        rows = [dict(run) for run in runs]
    for row in rows:
        row["params"] = json.loads(row["params"]) if row["params"] else {}
        row["counts"] = item_counts(engine, row["id"])
    return rows


def set_run_status(engine: Engine, run_id: str, status: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(replay_runs).where(replay_runs.c.id == run_id).values(status=status))


def item_counts(engine: Engine, run_id: str) -> dict[str, int]:
    """Items per status (pending, done, failed), zeros included."""
    query = (
        sa.select(replay_items.c.status, sa.func.count())
        .where(replay_items.c.run_id == run_id)
        .group_by(replay_items.c.status)
    )
    with engine.connect() as conn:
        counts = {status: int(n) for status, n in conn.execute(query)}
    return {PENDING: 0, DONE: 0, FAILED: 0, **counts}


def open_inputs(engine: Engine, run_id: str) -> list[Row]:
    """Items not done yet (pending or failed), each with its original exchange and attempts."""
    columns, added = context_columns([exchanges.c[name] for name in INPUT_COLUMNS])
    query = (
        sa.select(*columns, replay_items.c.attempts)
        .join(replay_items, replay_items.c.exchange_id == exchanges.c.id)
        .where(replay_items.c.run_id == run_id, replay_items.c.status != DONE)
        .order_by(exchanges.c.conversation_id, exchanges.c.turn_index, exchanges.c.id)
    )
    with engine.connect() as conn:
        return read_with_contexts(conn, query, added)


def exchanges_by_id(
    engine: Engine, ids: Sequence[str], *, columns: Sequence[str] = INPUT_COLUMNS
) -> dict[str, Row]:
    """Exchanges with these ids (those that exist), keyed by id."""
    selected, added = context_columns([exchanges.c[name] for name in columns])
    found: dict[str, Row] = {}
    with engine.connect() as conn:
        for start in range(0, len(ids), _CHUNK):
            chunk = list(ids[start : start + _CHUNK])
            query = sa.select(*selected).where(exchanges.c.id.in_(chunk))
            found.update((row["id"], row) for row in read_with_contexts(conn, query, added))
    return found


def record_outcomes(
    engine: Engine,
    outcomes: Sequence[ItemOutcome],
    *,
    run_id: str,
    conversation_rows: Sequence[Row] = (),
    exchange_rows: Sequence[Row] = (),
) -> None:
    """Store the answers and mark their items, all in one transaction (see module docstring)."""
    if not outcomes:
        return
    rows = [
        {
            "run_id": run_id,
            "exchange_id": o.exchange_id,
            "status": o.status,
            "attempts": o.attempts,
            "error": o.error,
            "response_exchange_id": o.response_exchange_id,
            "latency_s": o.latency_s,
            "prompt_tokens": o.prompt_tokens,
            "completion_tokens": o.completion_tokens,
        }
        for o in outcomes
    ]
    with engine.begin() as conn:
        if exchange_rows:
            store_rows(
                conn,
                conversation_rows=conversation_rows,
                exchange_rows=exchange_rows,
            )
        # Replacing the items' rows costs two statements per batch; an UPDATE per item costs
        # milliseconds each on DuckDB, whose executemany runs row by row.
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start : start + _CHUNK]
            conn.execute(
                sa.delete(replay_items).where(
                    replay_items.c.run_id == run_id,
                    replay_items.c.exchange_id.in_([row["exchange_id"] for row in chunk]),
                )
            )
            insert_rows(conn, replay_items, chunk)


def run_items(engine: Engine, run_id: str) -> list[Row]:
    """Every item of a run (status, attempts, error, answer id, latency, tokens)."""
    query = (
        sa.select(replay_items)
        .where(replay_items.c.run_id == run_id)
        .order_by(replay_items.c.exchange_id)
    )
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]


def load_verdicts(engine: Engine, source: str) -> list[Row]:
    """Judged battles stored under `source` (a replay's LLM-judge verdicts)."""
    query = sa.select(
        battles.c.exchange_a, battles.c.exchange_b, battles.c.winner, battles.c.judge
    ).where(battles.c.source == source)
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]
