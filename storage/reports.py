"""Per-cluster scoring reports and versioned per-cluster instructions.

A report is what scoring concluded about one cluster of one run (JSON payload plus its
weakness, which is a column so "weakest first" is a plain ORDER BY). Topics (level 0) and
their parent groups (level 1) are reported in the same table: cluster ids are unique within a
run and the level lives in `clusters`, so a group's report needed no schema change. Writing a
run's reports replaces that run's earlier ones (topics and groups together) in one
transaction, so re-scoring is safe. A run `prune` removed while `score` ran gets no reports
(`storage.clusters.hold_run`): they would be orphans no reader sees and no prune removes.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from storage.clusters import hold_run
from storage.engine import make_room
from storage.logs import Row, insert_rows, utcnow
from storage.models import NewModel, write_models
from storage.schema import cluster_reports, clusters, instructions
from storage.scores import latest_scorer, write_scores

# The payload key naming the scorer (`reward:<model id>`) a report's reward figures come from.
SCORER_KEY = "reward_scorer"


def save_scored(
    engine: Engine,
    run_id: str | None,
    reports: Mapping[str, Mapping[str, Any]],
    *,
    models: Sequence[NewModel] = (),
    scores: Mapping[str, Mapping[str, float]] | None = None,
) -> None:
    """What one `score` made, stored as one: the reports of clustering run `run_id`, which
    replace its earlier ones (none without a run), its `models` in order, the last the
    newest (the reward models with their scores, then the win predictor and its routing
    table), and the `scores` a stored model gave again (scorer → exchange id → value: `score
    reward apply`). Raises RunRemoved, storing nothing, when `prune` removed the run meanwhile.

    Stored step by step, a `score` stopped between the rewards and the reports left the
    cluster table ranked by the previous model beside the new model's rewards, and one stopped
    before the predictor left `route` on an older predictor than the reports' routing."""
    with engine.begin() as conn:
        write_models(conn, models)
        for scorer, values in (scores or {}).items():
            write_scores(conn, scorer, values)
        if run_id is not None:
            write_cluster_reports(conn, run_id, reports)
        make_room(conn, committing=True)


def write_cluster_reports(
    conn: Connection, run_id: str, reports: Mapping[str, Mapping[str, Any]]
) -> None:
    """The reports of `save_scored`, inside the caller's transaction."""
    now = utcnow()
    rows = [
        {
            "run_id": run_id,
            "cluster_id": cluster_id,
            "created_at": now,
            "weakness": payload.get("weakness"),
            "payload": json.dumps(payload, default=float),
        }
        for cluster_id, payload in reports.items()
    ]
    hold_run(conn, run_id, stored="cluster reports", again="score")
    conn.execute(sa.delete(cluster_reports).where(cluster_reports.c.run_id == run_id))
    insert_rows(conn, cluster_reports, rows)


def load_cluster_reports(
    engine: Engine, run_id: str, *, level: int | None = 0
) -> dict[str, dict[str, Any]]:
    """cluster id → report payload, weakest first, of the run's topics (`level=0`, what
    every caller before group reports expected), its groups (`level=1`) or both (None)."""
    query = (
        sa.select(cluster_reports.c.cluster_id, cluster_reports.c.payload)
        .where(cluster_reports.c.run_id == run_id)
        .order_by(cluster_reports.c.weakness.desc().nulls_last(), cluster_reports.c.cluster_id)
    )
    if level is not None:
        query = query.join(
            clusters,
            sa.and_(
                clusters.c.run_id == cluster_reports.c.run_id,
                clusters.c.id == cluster_reports.c.cluster_id,
            ),
        ).where(clusters.c.level == level)
    with engine.connect() as conn:
        return {cluster_id: json.loads(payload) for cluster_id, payload in conn.execute(query)}


def stale_reports(engine: Engine, run_id: str) -> str | None:
    """Why the run's reports no longer match the stored rewards, or None when they do.

    `score` and `score reward apply` store their rewards and reports as one (`save_scored`),
    but each re-ranks one field's clustering (`--on`): after `score --on response`, the
    prompt topics' table would rank clusters by the old model while every reward shown
    beside it is the new one's. Reports name the scorer they came from (`SCORER_KEY`);
    reports from before that mark, or a run not yet scored, are not judged.
    """
    query = sa.select(cluster_reports.c.payload).where(cluster_reports.c.run_id == run_id).limit(1)
    with engine.connect() as conn:
        payload = conn.execute(query).scalar_one_or_none()
    used = None if payload is None else json.loads(payload).get(SCORER_KEY)
    newest = latest_scorer(engine, "reward:")
    if used is None or newest is None or used == newest:
        return None
    return (
        f"the cluster reports were computed from {used}, but the newest reward scores are "
        f"{newest} (a `score` or `score reward apply` of another field's topics?): run "
        "`convoscope score` again so the weakness ranking, CIs and reasons follow the newest "
        "rewards"
    )


def report_scorers(engine: Engine, run_ids: Sequence[str]) -> set[str]:
    """The scorers (`SCORER_KEY`) the reports of these runs were ranked by. A run's reports
    are written together with one scorer, so one report per run tells; reports from before
    the mark name none."""
    named = set()
    with engine.connect() as conn:
        for run_id in run_ids:
            query = (
                sa.select(cluster_reports.c.payload)
                .where(cluster_reports.c.run_id == run_id)
                .limit(1)
            )
            payload = conn.execute(query).scalar_one_or_none()
            scorer = None if payload is None else json.loads(payload).get(SCORER_KEY)
            if scorer:
                named.add(scorer)
    return named


# Saves of one cluster's instruction that another writer may beat to a version number, in a row.
_VERSION_TRIES = 20


def save_instruction(
    engine: Engine, cluster_id: str, text: str, *, replay_run_id: str | None = None
) -> Row:
    """Store a new version of a cluster's instruction; returns it with its version number.

    The next number is read, then inserted: another process saving the same cluster's
    instruction in between takes that number first, and the unique (cluster, version) index
    fails this insert, so the look-up runs again and this save takes the number after it.
    """
    for _ in range(_VERSION_TRIES - 1):
        try:
            return _insert_next_version(engine, cluster_id, text, replay_run_id)
        except sa.exc.IntegrityError:
            continue
    return _insert_next_version(engine, cluster_id, text, replay_run_id)


def _insert_next_version(
    engine: Engine, cluster_id: str, text: str, replay_run_id: str | None
) -> Row:
    with engine.begin() as conn:
        latest = conn.execute(
            sa.select(sa.func.max(instructions.c.version)).where(
                instructions.c.cluster_id == cluster_id
            )
        ).scalar_one_or_none()
        row = {
            "id": uuid.uuid4().hex,
            "cluster_id": cluster_id,
            "version": (latest or 0) + 1,
            "text": text,
            "created_at": utcnow(),
            "replay_run_id": replay_run_id,
            "mean_reward": None,
            "original_mean_reward": None,
        }
        conn.execute(sa.insert(instructions).values(**row))
    return row


def set_instruction_reward(
    engine: Engine, instruction_id: str, mean_reward: float, original_mean_reward: float
) -> None:
    """A version's mean reward and that of the original answers to the same inputs."""
    with engine.begin() as conn:
        conn.execute(
            sa.update(instructions)
            .where(instructions.c.id == instruction_id)
            .values(mean_reward=mean_reward, original_mean_reward=original_mean_reward)
        )


def load_instructions(engine: Engine, cluster_id: str | None = None) -> list[Row]:
    """Instruction versions (of one cluster, or all), newest first."""
    query = sa.select(instructions).order_by(
        instructions.c.cluster_id, instructions.c.version.desc()
    )
    if cluster_id is not None:
        query = query.where(instructions.c.cluster_id == cluster_id)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]
