"""`convoscope status`: what a database holds and the commands that would bring it up to date,
through the CLI's `main` on real database files of each engine, step by step: nothing stored,
ingested, clustered, new exchanges then `assign`, scored, rewards newer than the reports, and
replay and judge runs left unfinished."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from clustering.stages import kmeans_clusterer, pca_reducer
from clustering.step import ClusterStepConfig, cluster_exchanges
from clustering.topics import ClusterConfig
from ingest.embed_step import EmbedConfig
from storage.engine import dialect_name, open_database, resolve_url
from storage.migrate import head_revision
from storage.replay import Lease, claim_judge_run, create_run, release_run
from storage.scores import latest_scores, store_scores
from tests.test_ingest_pipeline import convoscope_here as convoscope
from tests.test_ingest_pipeline import write_openai_jsonl

KEYS = {"database", "logs", "embeddings", "clusterings", "scoring", "replay", "next"}


def _status(db: str, cwd: Path) -> tuple[dict[str, Any], str]:
    """`status --json` and `status`: the object and the text a person reads."""
    as_json = convoscope("status", "--json", db=db, cwd=cwd)
    assert as_json.returncode == 0, as_json.stderr
    text = convoscope("status", db=db, cwd=cwd)
    assert text.returncode == 0, text.stderr
    return json.loads(as_json.stdout), text.stdout


def _next(status: dict[str, Any]) -> list[str]:
    return [step["command"] for step in status["next"]]


def _ingest(db: str, cwd: Path, log: Path) -> None:
    done = convoscope("ingest", str(log), "--rejects", str(cwd / "rejects.jsonl"), db=db, cwd=cwd)
    assert done.returncode == 0, done.stderr


def _chats(tmp_path: Path) -> Path:
    log = tmp_path / "chat.jsonl"
    write_openai_jsonl(log, 15)
    return log


def _off_topic_log(path: Path, n: int) -> Path:
    """`n` one-turn chats far from the arithmetic ones, by a fourth model: new exchanges the
    clustering's topics are too far to take, which `assign` stores with no topic."""
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"Write a haiku about {subject} in autumn"},
                {"role": "assistant", "content": f"Leaves fall on the {subject}."},
            ],
            "model": "poet",
        }
        for subject in ("harbours", "volcanoes", "violins", "glaciers", "owls")[:n]
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _cluster(db: str) -> None:
    """PCA and 2-means on prompt, no map: the clustering itself is not under test."""
    engine = open_database(db)
    cluster_exchanges(
        engine,
        config=ClusterStepConfig(
            embed=EmbedConfig(device="cpu", progress=False), topics=ClusterConfig(layout=False)
        ),
        reducer=pca_reducer(5),
        clusterer=kmeans_clusterer(2),
    )
    engine.dispose()


@pytest.mark.parametrize("name", ["missing.duckdb", "missing.sqlite"])
def test_a_missing_database_is_refused_and_not_created(tmp_path: Path, name: str) -> None:
    done = convoscope("status", db=str(tmp_path / name), cwd=tmp_path)
    assert done.returncode == 2
    assert "no database at" in done.stderr and "convoscope ingest" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_empty_database_says_what_to_run_first(db_url: str, tmp_path: Path) -> None:
    open_database(db_url).dispose()  # a convoscope database with nothing in it yet
    status, text = _status(db_url, tmp_path)
    assert set(status) == KEYS
    database = status["database"]
    assert database["backend"] == dialect_name(resolve_url(db_url))
    assert database["schema_revision"] == head_revision()
    assert (database["file_bytes"] is None) == (database["backend"] == "postgresql")
    assert status["logs"] == {
        "conversations": 0,
        "exchanges": 0,
        "battles": 0,
        "ingest_runs": 0,
        "latest_ingest": None,
        "models": 0,
        "dated": 0,
        "first_logged": None,
        "last_logged": None,
    }
    assert status["embeddings"] == {} and status["clusterings"] == []
    assert status["scoring"]["reward_scorer"] is None and status["replay"]["runs"] == 0
    assert _next(status) == ["convoscope ingest FILE", "convoscope demo"]
    assert "convoscope ingest FILE" in text and "0 exchanges" in text


def test_status_follows_ingest_cluster_and_assign_to_zero(db_url: str, tmp_path: Path) -> None:
    """After new exchanges come in, the clustering says how many it has not placed and asks
    for `assign`; after `assign` the count is 0, though `assign` stored some of them with no
    topic (rows with a NULL cluster are placed: `assign` would not take them again)."""
    _ingest(db_url, tmp_path, _chats(tmp_path))
    status, _ = _status(db_url, tmp_path)
    assert (status["logs"]["conversations"], status["logs"]["exchanges"]) == (15, 30)
    assert status["logs"]["models"] == 3 and status["logs"]["ingest_runs"] == 1
    assert status["logs"]["latest_ingest"] is not None
    assert _next(status) == ["convoscope embed", "convoscope cluster", "convoscope score"]

    _cluster(db_url)
    status, text = _status(db_url, tmp_path)
    (run,) = status["clusterings"]
    assert (run["on"], run["topics"], run["groups"], run["reports"]) == ("prompt", 2, 1, 0)
    assert run["placed"] + run["unassigned"] == 30 and run["not_placed"] == 0
    assert sum(status["embeddings"].values()) > 0
    assert _next(status) == ["convoscope score"]
    assert f"prompt: run {run['run_id']}" in text and "0 not yet placed" in text

    _ingest(db_url, tmp_path, _off_topic_log(tmp_path / "poems.jsonl", 5))
    status, text = _status(db_url, tmp_path)
    assert status["clusterings"][0]["not_placed"] == 5 and status["logs"]["models"] == 4
    assert status["logs"]["ingest_runs"] == 2
    assert _next(status) == ["convoscope assign", "convoscope score"]
    assert "5 not yet placed" in text and "convoscope assign" in text

    assigned = convoscope("assign", "--device", "cpu", "--json", db=db_url, cwd=tmp_path)
    assert assigned.returncode == 0, assigned.stderr
    assert json.loads(assigned.stdout)["unassigned"] > 0  # rows stored with no topic
    status, text = _status(db_url, tmp_path)
    run = status["clusterings"][0]
    assert run["not_placed"] == 0 and run["placed"] + run["unassigned"] == 35
    assert run["unassigned"] > 0
    assert _next(status) == ["convoscope score"]
    assert "0 not yet placed" in text


def test_status_after_scoring_and_when_it_falls_behind(db_url: str, tmp_path: Path) -> None:
    """Scored, nothing to do; then rewards newer than the reports (a `score` stopped
    between the two), exchanges the rewards miss, and a replay and a judge left unfinished,
    each with the command that finishes it."""
    db = db_url
    _ingest(db, tmp_path, _chats(tmp_path))
    _cluster(db)
    scored = convoscope("score", "--mode", "head", "--json", db=db, cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    model_id = json.loads(scored.stdout)["reward_model"]
    status, text = _status(db, tmp_path)
    scoring = status["scoring"]
    assert scoring["reward_scorer"] == f"reward:{model_id}" and scoring["unscored"] == 0
    assert scoring["reward_model"]["kind"] == "reward_head"
    assert "held_out_exchanges" in scoring["reward_model"]["metrics"]
    assert scoring["win_predictor"] and scoring["routing_table"]
    assert (
        status["clusterings"][0]["reports"] == 3 and not status["clusterings"][0]["reports_stale"]
    )
    assert status["next"] == [] and "nothing: the database is up to date" in text

    engine = open_database(db)
    rewards = latest_scores(engine, prefix="reward:")
    store_scores(engine, "reward:stopped0001", dict.fromkeys(list(rewards)[:20], 0.5))
    exchange_ids = list(rewards)[:4]
    replay = Lease(run_id="r1", owner="a" * 32, seconds=3600)
    create_run(
        engine,
        lease=replay,
        model="new-model",
        base_url="http://127.0.0.1:1/v1",
        instruction=None,
        params={},
        exchange_ids=exchange_ids,
    )
    judge = Lease(run_id="r1", owner="b" * 32, seconds=3600, judge="judge-model")
    assert claim_judge_run(engine, judge) is None
    engine.dispose()

    status, text = _status(db, tmp_path)
    assert status["scoring"]["reward_scorer"] == "reward:stopped0001"
    assert status["scoring"]["reward_model"] is None and status["scoring"]["unscored"] == 10
    assert status["clusterings"][0]["reports_stale"]
    assert [r["status"] for r in status["replay"]["open"]] == ["running"]
    assert status["replay"]["open"][0]["pending"] == 4
    assert status["replay"]["open_judges"] == [
        {"run_id": "r1", "judge": "judge-model", "status": "running"}
    ]
    # Running in a live process: nothing to resume yet.
    assert _next(status) == ["convoscope score reward apply", "convoscope score"]
    assert "10 exchanges unscored" in text and "reports stale" in text

    engine = open_database(db)
    release_run(engine, replay, "incomplete")
    release_run(engine, judge, "incomplete")
    engine.dispose()
    status, text = _status(db, tmp_path)
    assert _next(status)[2:] == [
        "convoscope replay --resume r1",
        "convoscope replay judge r1 --model judge-model --base-url URL",
    ]
    assert (status["replay"]["runs"], status["replay"]["judge_runs"]) == (1, 1)
    assert "convoscope replay --resume r1" in text
