"""Replay runs, their items and their judges' verdicts: the only SQL replay and judge run.

A run is created with all its items pending in one transaction. Each finished item is written
in the same transaction as the exchange it produced (`record_outcomes`), so after a crash an
item is either done with its answer stored, or not done and without one: running it again
sends exactly the items that are not done, and never stores an answer twice.

One process drives a run at a time: it holds a lease on the run (`Lease`), taken in one UPDATE
(`create_run`, `claim_run`) and renewed in every transaction that stores its answers, and by a
heartbeat while it waits on the endpoint. A process killed without letting go stops renewing,
so its lease lapses and another one may take the run; one that was taken over finds its lease
gone at its next renewal (`LeaseLost`) and stores nothing more. A judge of a run is held the
same way, on its own row of `judge_runs` (a `Lease` that names the judge): two processes
judging the same run with the same judge would each send every pair without a verdict.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from storage.contexts import context_columns, read_with_contexts
from storage.logs import Row, insert_rows, store_rows, utcnow
from storage.schema import battles, exchanges, judge_runs, replay_items, replay_runs

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


@dataclass(frozen=True, slots=True)
class Lease:
    """One process's hold on a run: `owner` is a token of its own, and the hold lapses
    `seconds` after its last renewal (a killed process never renews, so it never blocks the
    run for longer). With `judge`, the hold is on judging the run with that judge (its row
    of `judge_runs`), not on replaying it: a judge may work while the run is resumed."""

    run_id: str
    owner: str
    seconds: float
    judge: str | None = None

    def until(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.seconds)

    def row(self) -> tuple[sa.Table, tuple[sa.ColumnElement[bool], ...]]:
        """The table whose row this lease holds, and the conditions that pick the row."""
        if self.judge is None:
            return replay_runs, (replay_runs.c.id == self.run_id,)
        return judge_runs, (judge_runs.c.run_id == self.run_id, judge_runs.c.judge == self.judge)


class LeaseLost(RuntimeError):
    """Another process took the run over: this one must neither store nor send any more."""


def create_run(
    engine: Engine,
    *,
    lease: Lease,
    model: str,
    base_url: str,
    instruction: str | None,
    params: Mapping[str, Any],
    exchange_ids: Sequence[str],
) -> None:
    """Store a run, held by `lease`, and its items (all pending) atomically: a run never
    exists half-listed."""
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            sa.insert(replay_runs).values(
                id=lease.run_id,
                created_at=now,
                model=model,
                base_url=base_url,
                instruction=instruction,
                params=json.dumps(dict(params), sort_keys=True, default=str),
                status="running",
                owner=lease.owner,
                owner_since=now,
                lease_until=lease.until(now),
            )
        )
        insert_rows(
            conn,
            replay_items,
            [
                {"run_id": lease.run_id, "exchange_id": i, "status": PENDING, "attempts": 0}
                for i in exchange_ids
            ],
        )


def claim_run(engine: Engine, lease: Lease, *, take_over: bool = False) -> Row | None:
    """Take a stored run (or judge run) for `lease`'s owner: None when taken, else the run
    as another process holds it (its lease not lapsed), for the refusal to name. One UPDATE
    decides, so of two processes claiming at once exactly one gets the run. `take_over` takes
    it from a holder whose lease has not lapsed yet (a process the user knows is dead)."""
    while True:  # a holder that let go between the UPDATE and the look-up: try again
        if _take(engine, lease, take_over=take_over):
            return None
        holder = _held_row(engine, lease)
        if holder is None:
            raise LookupError(f"no replay run {lease.run_id!r}")
        if holder["owner"] is not None:
            return holder


def claim_judge_run(engine: Engine, lease: Lease, *, take_over: bool = False) -> Row | None:
    """`claim_run` for judging a run with `lease.judge`, whose row is made, unheld, the first
    time that judge judges the run: as with `claim_run`, None when taken, else the holder."""
    assert lease.judge is not None, "a judge run's lease names its judge"
    if get_judge_run(engine, lease.run_id, lease.judge) is None:
        row = {"run_id": lease.run_id, "judge": lease.judge}
        try:
            with engine.begin() as conn:
                conn.execute(
                    sa.insert(judge_runs).values(**row, created_at=utcnow(), status="incomplete")
                )
        except sa.exc.IntegrityError:
            pass  # another process made it meanwhile: the claim below decides between them
    return claim_run(engine, lease, take_over=take_over)


def _take(engine: Engine, lease: Lease, *, take_over: bool) -> bool:
    now = utcnow()
    table, keys = lease.row()
    query = sa.update(table).where(*keys)
    if not take_over:
        query = query.where(sa.or_(table.c.owner.is_(None), table.c.lease_until < now))
    values = {"owner": lease.owner, "owner_since": now, "lease_until": lease.until(now)}
    with engine.begin() as conn:
        taken = conn.execute(query.values(status="running", **values).returning(table.c.owner))
        return taken.first() is not None


def renew_lease(engine: Engine, lease: Lease) -> None:
    """Extend the lease (the heartbeat); LeaseLost when another process took the run."""
    with engine.begin() as conn:
        _renew(conn, lease)


async def keep_lease(engine: Engine, lease: Lease, turns: asyncio.Lock) -> None:
    """Renew `lease` every quarter of its length until cancelled: the heartbeat of a process
    waiting on an endpoint. It takes `turns` with the process's writes, which renew the lease
    too: DuckDB refuses two transactions updating the same row at once."""
    while True:
        await asyncio.sleep(lease.seconds / 4)
        async with turns:
            await asyncio.to_thread(renew_lease, engine, lease)


def release_run(engine: Engine, lease: Lease, status: str) -> None:
    """Record how the run ended and let go of it; LeaseLost (and nothing written) when
    another process took it meanwhile: its status is that process's to set."""
    table, keys = lease.row()
    values = {"status": status, "owner": None, "owner_since": None, "lease_until": None}
    with engine.begin() as conn:
        released = conn.execute(
            sa.update(table)
            .where(*keys, table.c.owner == lease.owner)
            .values(**values)
            .returning(table.c.owner)
        ).first()
    if released is None:
        raise LeaseLost(lease.run_id)


def _renew(conn: Connection, lease: Lease) -> None:
    """Extend the lease inside `conn`'s transaction. On PostgreSQL the row stays locked
    until it commits, so a take-over waits for this transaction's answers and then sees them
    done; with the lease gone, LeaseLost rolls the transaction back."""
    table, keys = lease.row()
    renewed = conn.execute(
        sa.update(table)
        .where(*keys, table.c.owner == lease.owner)
        .values(lease_until=lease.until(utcnow()))
        .returning(table.c.owner)
    ).first()
    if renewed is None:
        raise LeaseLost(lease.run_id)


def _held_row(engine: Engine, lease: Lease) -> Row | None:
    """The row `lease` would hold, as stored now (None: no such run)."""
    if lease.judge is None:
        return get_run(engine, lease.run_id)
    return get_judge_run(engine, lease.run_id, lease.judge)


def get_judge_run(engine: Engine, run_id: str, judge: str) -> Row | None:
    """How judging `run_id` with `judge` stands (None: that judge never judged it since
    schema 0008), its status "incomplete" when the process judging it stopped unreleased."""
    query = sa.select(judge_runs).where(judge_runs.c.run_id == run_id, judge_runs.c.judge == judge)
    with engine.connect() as conn:
        found = conn.execute(query).mappings().first()
    return None if found is None else _live(dict(found), utcnow())


def judge_statuses(engine: Engine, run_id: str) -> dict[str, str]:
    """judge → how judging the run with it stands (running, done, incomplete: a judge run
    whose process was killed is incomplete once its lease lapses, not running), by name."""
    query = sa.select(judge_runs).where(judge_runs.c.run_id == run_id).order_by(judge_runs.c.judge)
    with engine.connect() as conn:
        now = utcnow()
        rows = [_live(dict(row), now) for row in conn.execute(query).mappings()]
    return {row["judge"]: row["status"] for row in rows}


def get_run(engine: Engine, run_id: str) -> Row | None:
    """The run's row (params decoded), or None when there is no such run."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(replay_runs).where(replay_runs.c.id == run_id)).mappings()
        found = row.first()
    return None if found is None else _decoded(found, utcnow())


def list_runs(engine: Engine) -> list[Row]:
    """Every run, newest first (runs created at one time by id), with its item counts per
    status."""
    with engine.connect() as conn:
        runs = conn.execute(
            sa.select(replay_runs).order_by(replay_runs.c.created_at.desc(), replay_runs.c.id)
        ).mappings()
        now = utcnow()
        rows = [_decoded(run, now) for run in runs]
    for row in rows:
        row["counts"] = item_counts(engine, row["id"])
    return rows


def _decoded(found: Mapping[str, Any], now: datetime) -> Row:
    """A run's row with its params decoded and its live status (`_live`)."""
    run = dict(found)
    run["params"] = json.loads(run["params"]) if run["params"] else {}
    return _live(run, now)


def _live(run: Row, now: datetime) -> Row:
    """A "running" run (or judge run) whose process stopped without letting go (killed: its
    lease lapsed, or from before leases) is "incomplete", as an interrupted run is:
    "running" says a live process drives it."""
    lapsed = run["lease_until"] is None or run["lease_until"] < now
    if run["status"] == "running" and lapsed:
        run["status"] = "incomplete"
    return run


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
    lease: Lease,
    conversation_rows: Sequence[Row] = (),
    exchange_rows: Sequence[Row] = (),
) -> None:
    """Store the answers and mark their items, all in one transaction that also renews the
    lease (see module docstring): LeaseLost, and nothing stored, when the run was taken over."""
    if not outcomes:
        return
    run_id = lease.run_id
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
        _renew(conn, lease)
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


def runs_sharing_inputs(engine: Engine, run_id: str) -> dict[str, int]:
    """Other run id → how many of `run_id`'s saved inputs it holds too (any status): the runs
    whose answers can be set against this run's, input by input (`replay report --against`)."""
    mine, theirs = replay_items.alias("mine"), replay_items.alias("theirs")
    query = (
        sa.select(theirs.c.run_id, sa.func.count())
        .select_from(mine.join(theirs, mine.c.exchange_id == theirs.c.exchange_id))
        .where(mine.c.run_id == run_id, theirs.c.run_id != run_id)
        .group_by(theirs.c.run_id)
    )
    with engine.connect() as conn:
        return {other: int(n) for other, n in conn.execute(query)}


def store_verdicts(engine: Engine, verdicts: Sequence[Row], *, lease: Lease) -> None:
    """Store a judge's verdicts (battle rows) in one transaction that also renews its lease:
    LeaseLost, and nothing stored, when the judge run was taken over."""
    with engine.begin() as conn:
        _renew(conn, lease)
        store_rows(conn, conversation_rows=(), exchange_rows=(), battle_rows=verdicts)


def load_verdicts(engine: Engine, source: str) -> list[Row]:
    """Judged battles stored under `source` (a replay's LLM-judge verdicts), oldest first
    (as stored, then by id): a pair judged again by one judge has two verdicts, and the
    replay page, which shows each judge's verdict on a pair, keeps the one judged last. In
    the table's own order it was whichever the engine's scan gave last."""
    query = (
        sa.select(battles.c.exchange_a, battles.c.exchange_b, battles.c.winner, battles.c.judge)
        .where(battles.c.source == source)
        .order_by(battles.c.ingested_at, battles.c.id)
    )
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]
