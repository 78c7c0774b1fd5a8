"""Cached reads and short writes: the only way the pages reach the database.

DuckDB lets one process write a file at a time, and even a read-only connection holds a lock
that keeps a writer out. So the UI never keeps a DuckDB connection open: each read opens the
file read-only, runs its queries and closes it, and retries briefly when an ingest holds the
lock; writes (renames, tags, notes) open a short read-write connection the same way. Pages run
on every click, so results are cached (`st.cache_data`) under a version of the database that
changes whenever anything the UI shows does (`storage.views.database_version`): a re-cluster,
an ingest or a rename in another tab shows up on the next click, and nothing stale is served.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import sqlalchemy as sa
import streamlit as st
from sqlalchemy.engine import Engine

from app.ui import charts
from app.ui.render import distinct_labels, hover_text, one_line
from storage import logs, views
from storage.clusters import latest_field_of, latest_runs
from storage.engine import StorageError, dialect_name, make_engine, open_database, resolve_url
from storage.logs import BattleFilter
from storage.views import ViewFilter

if TYPE_CHECKING:
    from ingest.replay import ReplayConfig, ReplaySummary, RewardDiff, RunComparison
    from scoring.judge import JudgeConfig, JudgeResult, JudgeSummary

T = TypeVar("T")

RETRY_SECONDS = 3.0  # how long a read or write waits for an ingest to release the lock
MAP_POINTS = 100_000  # the topic map samples beyond this many points
_LOCK_WORDS = ("lock", "different configuration", "database is locked")


class DatabaseBusy(RuntimeError):
    """Another process holds the database's write lock for longer than a page can wait."""


# ------------------------------------------------------------------------------ connections


@st.cache_resource(show_spinner=False)
def _pooled_engine(url: str) -> Engine:
    """SQLite and PostgreSQL handle concurrent readers themselves: one engine per URL."""
    return make_engine(url)


def _is_lock_error(error: BaseException) -> bool:
    text = str(error).lower()
    return any(word in text for word in _LOCK_WORDS)


def _with_engine(url: str, fn: Callable[[Engine], T], *, write: bool) -> T:
    if dialect_name(url) != "duckdb":
        return fn(_pooled_engine(url))
    deadline = time.monotonic() + RETRY_SECONDS
    delay = 0.05
    while True:
        engine = make_engine(url, read_only=not write)
        try:
            return fn(engine)
        except (sa.exc.DBAPIError, StorageError, OSError, RuntimeError) as error:
            if not _is_lock_error(error):
                raise
            if time.monotonic() > deadline:
                raise DatabaseBusy(busy_message(url)) from error
        finally:
            engine.dispose()
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def busy_message(url: str) -> str:
    safe = sa.make_url(url).render_as_string(hide_password=True)
    return (
        f"The database {safe} is busy: another process (an ingest, a clustering or scoring "
        "run) is writing to it, and DuckDB lets only one process in while it writes. "
        "Everything shown here is kept; try again when it finishes."
    )


def read(url: str, fn: Callable[[Engine], T]) -> T:
    """Run `fn` on a short-lived read-only connection (retrying briefly while locked)."""
    return _with_engine(url, fn, write=False)


def write(url: str, fn: Callable[[Engine], T]) -> T:
    """Run `fn` on a short-lived read-write connection, then invalidate the version."""
    result = _with_engine(url, fn, write=True)
    database_version.clear()
    return result


@st.cache_resource(show_spinner=False)
def ensure_database(url: str) -> str:
    """Create and migrate the database once per process, so a fresh install opens on an
    empty state rather than an error; a database another process holds is left alone."""
    if dialect_name(url) == "duckdb":
        path = sa.make_url(url).database
        if path and path != ":memory:" and Path(path).exists():
            try:
                open_database(url).dispose()
            except StorageError as error:
                if not _is_lock_error(error):
                    raise
            return url
    open_database(url).dispose()
    return url


def database_url(argv: list[str]) -> str:
    """`--db URL` after `streamlit run app/ui/app.py --`, else $CONVOSCOPE_DB, else default."""
    for index, arg in enumerate(argv):
        if arg == "--db" and index + 1 < len(argv):
            return resolve_url(argv[index + 1])
        if arg.startswith("--db="):
            return resolve_url(arg.split("=", 1)[1])
    return resolve_url(os.environ.get("CONVOSCOPE_DB"))


# ---------------------------------------------------------------------------------- version


@st.cache_data(show_spinner=False, ttl=1.0)
def database_version(url: str) -> tuple[Any, ...]:
    """Re-read at most once a second: cheap enough, and fresh for the next click."""
    return read(url, views.database_version)


@dataclass(frozen=True, slots=True)
class Context:
    """What every page needs: where the database is, its version, the clustering shown (the
    latest of one `on` field, `shell.sidebar_clustering`) and the scorer."""

    url: str
    version: tuple[Any, ...]
    run_id: str | None
    scorer: str | None
    flt: ViewFilter


@st.cache_data(show_spinner=False, max_entries=16)
def clusterings(url: str, version: tuple[Any, ...]) -> dict[str, str]:
    """`on` field → the run id of its latest clustering, for each field clustered, in
    `storage.clusters.ON_FIELDS` order: the pages show one, the CLI's rule picks which."""
    return read(url, lambda e: {run["on_field"]: run["id"] for run in latest_runs(e)})


@st.cache_data(show_spinner=False, max_entries=16)
def field_of_cluster(url: str, version: tuple[Any, ...], cluster_id: str) -> str | None:
    """The `on` field whose latest clustering holds `cluster_id` (None: none does): which
    clustering a link to that cluster needs shown."""
    return read(url, lambda e: latest_field_of(e, cluster_id))


@st.cache_data(show_spinner=False, max_entries=16)
def _scorer(url: str, version: tuple[Any, ...]) -> str | None:
    return read(url, views.reward_scorer)


def context(url: str, flt: ViewFilter, on: str | None) -> Context:
    """The pages' context, showing the latest clustering of `on` (None: nothing clustered)."""
    version = database_version(url)
    run_id = clusterings(url, version).get(on) if on else None
    return Context(url=url, version=version, run_id=run_id, scorer=_scorer(url, version), flt=flt)


# ------------------------------------------------------------------------------ cached reads
# Every loader takes (url, version, ...) so a changed database is a cache miss.


@st.cache_data(show_spinner=False, max_entries=16)
def filter_options(url: str, version: tuple[Any, ...]) -> dict[str, Any]:
    return read(url, views.filter_options)


@st.cache_data(show_spinner=False, max_entries=64)
def overview(
    url: str, version: tuple[Any, ...], run_id: str | None, flt: ViewFilter, scorer: str | None
) -> dict[str, Any]:
    return read(url, lambda e: views.overview(e, run_id, flt, scorer=scorer))


@st.cache_data(show_spinner=False, max_entries=16)
def stale_reports(url: str, version: tuple[Any, ...], run_id: str) -> str | None:
    from storage.reports import stale_reports

    return read(url, lambda e: stale_reports(e, run_id))


@st.cache_data(show_spinner=False, max_entries=16)
def behind(
    url: str, version: tuple[Any, ...], run_id: str, scorer: str | None
) -> tuple[int, int | None]:
    """Stored exchanges the clustering has not placed, and those the scorer has not scored
    (None without one): new logs the tables leave out until `assign` and `score reward
    apply` run, which nothing on the page showed."""
    from storage.status import not_placed, unscored

    return read(url, lambda e: (not_placed(e, run_id), unscored(e, scorer) if scorer else None))


@st.cache_data(show_spinner=False, max_entries=64)
def cluster_table(
    url: str, version: tuple[Any, ...], run_id: str, flt: ViewFilter, scorer: str | None
) -> pd.DataFrame:
    rows = read(url, lambda e: views.cluster_table(e, run_id, flt, scorer=scorer))
    return pd.DataFrame(rows)


@st.cache_data(show_spinner=False, max_entries=64)
def group_table(
    url: str, version: tuple[Any, ...], run_id: str, flt: ViewFilter, scorer: str | None
) -> pd.DataFrame:
    rows = read(url, lambda e: views.group_table(e, run_id, flt, scorer=scorer))
    return pd.DataFrame(rows)


@st.cache_resource(show_spinner=False, max_entries=8)  # 100K rows: shared, not copied
def map_points(
    url: str,
    version: tuple[Any, ...],
    run_id: str,
    flt: ViewFilter,
    scorer: str | None,
    limit: int = MAP_POINTS,
) -> tuple[pd.DataFrame, int]:
    rows, total = read(url, lambda e: views.map_points(e, run_id, flt, scorer=scorer, limit=limit))
    names = _distinct_names(cluster_names(url, version, run_id))
    frame = pd.DataFrame(rows, columns=["id", "cluster_id", "x", "y", "model", "prompt", "reward"])
    frame["cluster"] = frame["cluster_id"].map(names).fillna(UNASSIGNED)
    frame["hover"] = [
        f"{hover_text(prompt)}<br><i>{hover_text(cluster, 60)}</i>"
        for prompt, cluster in zip(frame["prompt"], frame["cluster"], strict=True)
    ]
    return frame, total


UNASSIGNED = "unassigned"  # the map's name for the points no topic holds


def _distinct_names(names: dict[str, str]) -> dict[str, str]:
    """Cluster names the map can colour by: it draws one trace per name, so two topics a
    person named alike (or one named "unassigned") were one colour. A name shared is followed
    by the cluster's id, the name shortened so that the legend's 40 characters keep the id."""
    fuller = [f"{one_line(name, max(40 - len(cid) - 3, 1))} ({cid})" for cid, name in names.items()]
    shown = distinct_labels(list(names.values()), fuller, taken=[UNASSIGNED])
    return dict(zip(names, shown, strict=True))


@st.cache_resource(show_spinner=False, max_entries=8)
def topic_map(
    url: str,
    version: tuple[Any, ...],
    run_id: str,
    flt: ViewFilter,
    scorer: str | None,
    color_by: str,
) -> go.Figure:
    """The map figure, built once per (data, colouring); treated as read-only."""
    points, _ = map_points(url, version, run_id, flt, scorer)
    return charts.topic_map(points, color_by)


@st.cache_data(show_spinner=False, max_entries=16)
def cluster_names(url: str, version: tuple[Any, ...], run_id: str) -> dict[str, str]:
    return read(url, lambda e: views.cluster_names(e, run_id))


@st.cache_data(show_spinner=False, max_entries=64)
def cluster_detail(
    url: str, version: tuple[Any, ...], run_id: str, cluster_id: str
) -> dict[str, Any] | None:
    return read(url, lambda e: views.cluster_detail(e, run_id, cluster_id))


@st.cache_data(show_spinner=False, max_entries=64)
def cluster_exchanges(
    url: str,
    version: tuple[Any, ...],
    run_id: str,
    cluster_id: str,
    flt: ViewFilter,
    scorer: str | None,
    order: str,
    limit: int,
) -> list[dict[str, Any]]:
    return read(
        url,
        lambda e: views.cluster_exchanges(
            e, run_id, cluster_id, flt, scorer=scorer, order=order, limit=limit
        ),
    )


@st.cache_data(show_spinner=False, max_entries=64)
def cluster_trend(
    url: str,
    version: tuple[Any, ...],
    run_id: str,
    cluster_id: str,
    flt: ViewFilter,
    scorer: str | None,
    period: str | None,
) -> dict[str, Any]:
    """One topic per period of its exchanges' times (`storage.views.cluster_trend`)."""
    return read(
        url,
        lambda e: views.cluster_trend(
            e, run_id, flt, scorer=scorer, period=period, cluster_id=cluster_id
        ),
    )


@st.cache_data(show_spinner=False, max_entries=16)
def worsened(
    url: str, version: tuple[Any, ...], run_id: str, flt: ViewFilter, scorer: str
) -> tuple[str, str | None, list[dict[str, Any]]]:
    """The topics whose reward surely fell into the latest period of the logs' times (the
    period picked from their span), surest first: (period, its latest start, topics)."""
    from scoring.trend import surely_worse, topic_series

    def load(engine: Engine) -> tuple[dict[str, Any], dict[str, str]]:
        found = views.cluster_trend(engine, run_id, flt, scorer=scorer)
        return found, views.cluster_names(engine, run_id)

    found, names = read(url, load)
    topics = surely_worse(topic_series(found, names))
    return found["period"], (found["periods"] or [None])[-1], topics


@st.cache_data(show_spinner=False, max_entries=64)
def reward_values(
    url: str,
    version: tuple[Any, ...],
    run_id: str,
    cluster_id: str | None,
    flt: ViewFilter,
    scorer: str,
) -> np.ndarray:
    values = read(url, lambda e: views.reward_values(e, run_id, cluster_id, flt, scorer=scorer))
    return np.asarray(values, dtype=float)


@st.cache_data(show_spinner=False, max_entries=64)
def keyword_search(
    url: str,
    version: tuple[Any, ...],
    run_id: str | None,
    text: str,
    flt: ViewFilter,
    scorer: str | None,
    limit: int,
) -> list[dict[str, Any]]:
    return read(
        url, lambda e: views.keyword_search(e, run_id, text, flt, scorer=scorer, limit=limit)
    )


@st.cache_data(show_spinner=False, max_entries=64)
def keyword_count(
    url: str, version: tuple[Any, ...], run_id: str | None, text: str, flt: ViewFilter
) -> int:
    return read(url, lambda e: views.keyword_count(e, run_id, text, flt))


@st.cache_data(show_spinner=False, max_entries=16)
def expert_matrix(url: str, version: tuple[Any, ...], run_id: str) -> pd.DataFrame:
    return pd.DataFrame(read(url, lambda e: views.expert_matrix(e, run_id)))


@st.cache_data(show_spinner=False, max_entries=16)
def routing_rows(url: str, version: tuple[Any, ...], run_id: str) -> pd.DataFrame:
    return pd.DataFrame(read(url, lambda e: views.routing_rows(e, run_id)))


@st.cache_data(show_spinner=False, max_entries=16)
def global_leaderboard(url: str, version: tuple[Any, ...], flt: ViewFilter) -> pd.DataFrame:
    """Bradley–Terry over every judged battle the filter keeps (empty without battles)."""
    from scoring.bradley_terry import BTConfig, leaderboard

    battles = pd.DataFrame(read(url, lambda e: views.battle_models(e, flt)))
    if battles.empty:
        return pd.DataFrame()
    return leaderboard(battles, config=BTConfig(n_bootstrap=100)).to_frame()


@st.cache_data(show_spinner=False, max_entries=64)
def count_rows(
    url: str,
    version: tuple[Any, ...],
    run_id: str | None,
    flt: ViewFilter,
    cluster_ids: tuple[str, ...],
) -> int:
    return read(url, lambda e: views.count_rows(e, run_id, flt, cluster_ids=cluster_ids))


@st.cache_data(show_spinner=False, max_entries=16)
def battle_options(url: str, version: tuple[Any, ...]) -> dict[str, Any]:
    """How many battles are stored, their models and their sources."""
    return read(url, logs.battle_options)


@st.cache_data(show_spinner=False, max_entries=64)
def count_battles(url: str, version: tuple[Any, ...], where: BattleFilter) -> int:
    return read(url, lambda e: logs.count_battles(e, where=where))


# ----------------------------------------------------------------------------- semantic index


@dataclass(frozen=True)
class SemanticIndex:
    """Unit vectors of a run's exchanges, in the space its clustering used."""

    embedder: str
    ids: tuple[str, ...]
    matrix: np.ndarray


@st.cache_resource(show_spinner="Loading the embedding model…")
def embedder_for(name: str) -> Any:
    """The embedder a run was clustered with (the shipped model, a directory, or the fast
    static variant of either); loaded once per process."""
    from ingest.embed import load_embedder
    from ingest.embed_fast import split_embedder_name

    model, fast = split_embedder_name(name)
    if fast:
        return load_embedder(model, fast=True)
    return load_embedder(name, device="cpu")


@st.cache_resource(show_spinner="Building the search index…", max_entries=2)
def semantic_index(url: str, version: tuple[Any, ...], run_id: str) -> SemanticIndex | None:
    """The run's vectors, found by recomputing each exchange's embedded text hash; None when
    they are not all stored (the run's embedder differs from what was embedded)."""
    import json

    from ingest.embed_step import text_hash
    from ingest.embed_text import text_for
    from storage.vectors import load_vectors

    def build(engine: Engine) -> SemanticIndex | None:
        run = views.run_info(engine, run_id)
        if run is None:
            return None
        ids: list[str] = []
        hashes: list[str] = []
        for batch in views.run_text_rows(engine, run_id):
            for row in batch:
                context = json.loads(row["context"]) if row["context"] else []
                text = text_for(row["prompt"], row["response"], context, on=run["on_field"])
                ids.append(row["id"])
                hashes.append(text_hash(text))
        try:
            matrix = load_vectors(engine, run["embedder"], hashes)
        except LookupError:
            return None
        return SemanticIndex(embedder=run["embedder"], ids=tuple(ids), matrix=matrix)

    return read(url, build)


def semantic_search(index: SemanticIndex, query: str, k: int) -> list[tuple[str, float]]:
    """(exchange id, cosine similarity) of the `k` nearest exchanges to `query`."""
    vector = embedder_for(index.embedder).embed([query])[0]
    similarity = index.matrix @ vector
    k = min(k, len(similarity))
    top = np.argpartition(-similarity, k - 1)[:k] if k else np.array([], dtype=int)
    top = top[np.argsort(-similarity[top])]
    return [(index.ids[i], float(similarity[i])) for i in top]


@st.cache_data(show_spinner=False, max_entries=32)
def hits_by_ids(
    url: str,
    version: tuple[Any, ...],
    run_id: str | None,
    ids: tuple[str, ...],
    flt: ViewFilter,
    scorer: str | None,
) -> list[dict[str, Any]]:
    return read(url, lambda e: views.exchanges_by_ids(e, run_id, ids, flt, scorer=scorer))


# ------------------------------------------------------------------------------------ replay
# Replay runs and instruction versions are outside `database_version` (a run in another process
# writes items long before its answers), so their loaders expire after a second instead.


@st.cache_data(show_spinner=False, ttl=1.0)
def replay_runs(url: str) -> list[dict[str, Any]]:
    """Every replay run, newest first, with its item counts."""
    from storage.replay import list_runs

    return read(url, list_runs)


@st.cache_data(show_spinner=False, ttl=1.0)
def instruction_versions(url: str, cluster_id: str) -> list[dict[str, Any]]:
    """A cluster's saved instructions, newest first."""
    from storage.reports import load_instructions

    return read(url, lambda e: load_instructions(e, cluster_id))


@st.cache_data(show_spinner=False, max_entries=16)
def replay_pairs(
    url: str, version: tuple[Any, ...], run_id: str, done: int
) -> tuple[list[dict[str, Any]], RewardDiff | None]:
    """A run's original and new answers with their rewards (None where unscored), and the
    overall reward comparison (None before the answers are scored); `done` keys the cache."""
    from ingest.replay import compare, pairs
    from scoring.judge import JUDGE_SOURCE_PREFIX
    from storage.replay import load_verdicts
    from storage.scores import latest_scores

    def build(engine: Engine) -> tuple[list[dict[str, Any]], RewardDiff | None]:
        rows = pairs(engine, run_id)
        scores = latest_scores(engine, prefix="reward:")
        judged: dict[str, dict[str, str]] = {}  # original answer → judge → its latest winner
        for verdict in load_verdicts(engine, JUDGE_SOURCE_PREFIX + run_id):  # oldest first
            judged.setdefault(verdict["exchange_a"], {})[verdict["judge"]] = verdict["winner"]
        for row in rows:
            row["original_reward"] = scores.get(row["original_id"])
            row["new_reward"] = scores.get(row["new_id"])
            row["judges"] = judged.get(row["original_id"], {})
        overall = compare(engine, run_id, scores=scores, n_boot=500).overall if scores else None
        return rows, overall

    return read(url, build)


@st.cache_data(show_spinner=False, ttl=1.0, max_entries=16)
def runs_sharing_inputs(url: str, run_id: str) -> dict[str, int]:
    """Other run id → how many of `run_id`'s inputs it holds too: the runs its answers can be
    compared with. Expires like the runs: a run started in another process shares inputs
    before the database version counts its answers."""
    from storage.replay import runs_sharing_inputs as sharing

    return read(url, lambda e: sharing(e, run_id))


@st.cache_data(show_spinner=False, max_entries=16)
def run_comparison(
    url: str,
    version: tuple[Any, ...],
    run_id: str,
    against: str,
    done: tuple[int, int],
    cluster_run_id: str | None,
    shown: int,
) -> tuple[RunComparison, list[dict[str, Any]], list[dict[str, Any]]]:
    """`run_id`'s answers against `against`'s on the inputs both answered, as `replay report
    RUN --against OTHER` pairs them (overall and per topic of `cluster_run_id`, the clustering
    the page shows), with the first `shown` inputs only `run_id` answered and only `against`
    answered (id and prompt), which the comparison leaves out. `done` (both runs' answered
    counts) keys the cache: a run resumed elsewhere answers more without a new version."""
    from ingest.replay import answers_by_input, compare_runs
    from storage.clusters import topic_of
    from storage.replay import exchanges_by_id
    from storage.scores import latest_scores

    def build(
        engine: Engine,
    ) -> tuple[RunComparison, list[dict[str, Any]], list[dict[str, Any]]]:
        scores = latest_scores(engine, prefix="reward:") or None
        cluster_of = None if cluster_run_id is None else topic_of(engine, cluster_run_id)
        answers = [answers_by_input(engine, r) for r in (run_id, against)]
        compared = compare_runs(
            engine,
            run_id,
            against,
            scores=scores,
            cluster_of=cluster_of,
            n_boot=500,
            answers=answers,
        )
        mine, theirs = (set(a) for a in answers)
        alone = [sorted(mine - theirs)[:shown], sorted(theirs - mine)[:shown]]
        prompts = exchanges_by_id(engine, alone[0] + alone[1], columns=("id", "prompt"))
        only_run, only_against = (
            [{"id": i, "prompt": prompts[i]["prompt"] if i in prompts else None} for i in ids]
            for ids in alone
        )
        return compared, only_run, only_against

    return read(url, build)


def run_replay(
    url: str, cluster_run_id: str, cluster_id: str, config: ReplayConfig
) -> tuple[ReplaySummary, dict[str, Any] | None]:
    """Replay a cluster's saved inputs (not earlier replays' answers) with `config`, then save
    its instruction as the cluster's next version, linked to the run. Returns the summary and
    the saved version (None without an instruction). Synchronous: the page waits on it."""
    from ingest.replay import REPLAY_SOURCE_PREFIX, replay
    from storage.clusters import exchanges_in_clusters, run_field
    from storage.replay import exchanges_by_id
    from storage.reports import save_instruction

    def go(engine: Engine) -> tuple[ReplaySummary, dict[str, Any] | None]:
        ids = exchanges_in_clusters(engine, cluster_run_id, cluster_id=cluster_id)
        found = exchanges_by_id(engine, ids, columns=("id", "source"))
        inputs = [i for i in ids if not found[i]["source"].startswith(REPLAY_SOURCE_PREFIX)]
        # Recorded with the run: its ids alone cannot say later which topic it replayed.
        label = views.cluster_names(engine, cluster_run_id).get(cluster_id, cluster_id)
        described = {
            "clusters": [{"id": cluster_id, "label": label}],
            "on": run_field(engine, cluster_run_id),
            "clustering_run": cluster_run_id,
        }
        summary = replay(engine, config=config, select=inputs, described=described)
        saved = None
        if config.instruction is not None:
            saved = save_instruction(
                engine, cluster_id, config.instruction, replay_run_id=summary.run_id
            )
        return summary, saved

    result = write(url, go)
    replay_runs.clear()
    instruction_versions.clear()
    return result


@st.cache_data(show_spinner=False, ttl=1.0)
def judge_result(url: str, run_id: str) -> dict[str, JudgeResult]:
    """The LLM judges' verdicts on a run, by judge (two judges' verdicts on the same pairs
    are not independent samples); empty before any."""
    from scoring.judge import results_by_judge

    def each(engine: Engine) -> dict[str, JudgeResult]:
        return {name: overall for name, (overall, _) in results_by_judge(engine, run_id).items()}

    return read(url, each)


@st.cache_data(show_spinner=False, ttl=1.0)
def judge_statuses(url: str, run_id: str) -> dict[str, str]:
    """How each judge of a run stands, by judge: running (a live process holds it), done,
    or incomplete (stopped before every verdict)."""
    from storage.replay import judge_statuses as statuses

    return read(url, lambda e: statuses(e, run_id))


def run_judge(
    url: str, run_id: str, config: JudgeConfig, *, take_over: bool = False
) -> JudgeSummary:
    """Judge a run's answered pairs not judged by this model yet. Synchronous. `take_over`
    takes the judging from another process whose lease has not lapsed (`replay judge
    --take-over`): only for one the user says is dead."""
    from scoring.judge import judge_replay

    summary = write(url, lambda e: judge_replay(e, run_id, config=config, take_over=take_over))
    judge_result.clear()
    judge_statuses.clear()
    replay_pairs.clear()
    return summary


def judge_holder(url: str, run_id: str, judge: str) -> dict[str, Any] | None:
    """The judge run of `run_id` with `judge` while a live process holds it (its lease not
    lapsed: status "running"), else None. Not cached: a take-over is offered on it."""
    from storage.replay import get_judge_run

    found = read(url, lambda e: get_judge_run(e, run_id, judge))
    return found if found is not None and found["status"] == "running" else None


@st.cache_data(show_spinner=False, ttl=1.0, max_entries=16)
def replay_failures(url: str, run_id: str, failed: int) -> list[dict[str, Any]]:
    """A run's failed items with their last error (endpoint text: show it as text). Expires
    like the runs: a resume that fails as many items again, for other reasons, kept the old
    reasons on the page while the count stayed the same."""
    from storage.replay import FAILED, run_items

    items = read(url, lambda e: run_items(e, run_id))
    return [i for i in items if i["status"] == FAILED]
