"""`convoscope prune`: stored models and score rows nothing reads are removed, and nothing a
command or page reads is: through the real CLI on a scored DuckDB file, and the storage
layer on every engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from clustering.stages import kmeans_clusterer, pca_reducer
from clustering.step import ClusterStepConfig, cluster_exchanges
from clustering.topics import ClusterConfig
from ingest.embed_step import EmbedConfig
from storage.engine import open_database
from storage.models import model_ids, save_model
from storage.prune import plan_prune, prune_stored, reclaim_space
from storage.schema import trained_models
from storage.scores import latest_scorer, load_scores, store_scores
from tests.test_ingest_pipeline import convoscope_here as convoscope
from tests.test_score_step import _ingested_and_clustered, _signal_log


def _score(db: str, cwd: Path, *args: str) -> str:
    """`score ARGS --json`; the reward model it stored or applied."""
    result = convoscope("score", *args, "--json", db=db, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["reward_model"]


def _prune(db: str, cwd: Path, *args: str) -> dict:
    result = convoscope("prune", *args, "--json", db=db, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _stored_ids(db: str) -> dict[str, list[str]]:
    """Stored artefact ids by kind, newest first."""
    engine = open_database(db)
    kinds = ("reward_head", "reward_lexical", "reward_ensemble", "win_predictor", "routing_table")
    stored = {kind: model_ids(engine, kind) for kind in kinds}
    engine.dispose()
    return stored


def test_prune_removes_what_nothing_reads_and_keeps_what_is_in_use(tmp_path: Path) -> None:
    """With --keep 1, each head below is kept for one reason only: the newest head, the one
    whose scores are the latest (`apply --model-id`), the one the response clustering's
    reports name, and an ensemble's member. Only the head nothing reads goes, with its
    scores, beside the older predictors and routing tables; a second prune removes nothing."""
    log = _signal_log(tmp_path / "chats.jsonl")
    db = _ingested_and_clustered([log], tmp_path / "p.duckdb", topics=2)
    engine = open_database(db)
    on_response = EmbedConfig(device="cpu", progress=False, on="response")
    cluster_exchanges(
        engine,
        config=ClusterStepConfig(embed=on_response, topics=ClusterConfig(layout=False)),
        reducer=pca_reducer(5),
        clusterer=kmeans_clusterer(2),
    )
    engine.dispose()
    ensemble = _score(db, tmp_path, "--mode", "head+lexical")
    member = _stored_ids(db)["reward_head"][0]
    of_response_reports = _score(db, tmp_path, "--mode", "head", "--on", "response")
    applied, unused, newest = (_score(db, tmp_path, "--mode", "head") for _ in range(3))
    assert _score(db, tmp_path, "reward", "apply", "--model-id", applied) == applied
    before = _stored_ids(db)
    assert len(before["win_predictor"]) == len(before["routing_table"]) == 5

    planned = _prune(db, tmp_path, "--keep", "1", "--dry-run")
    assert _stored_ids(db) == before  # a dry run removes nothing
    old_tables = before["win_predictor"][1:] + before["routing_table"][1:]
    assert {a["id"] for a in planned["removed"]} == {unused, *old_tables}
    assert planned["scorers"] == {f"reward:{unused}": 80} and planned["score_rows"] == 80
    assert planned["bytes"] == sum(a["bytes"] for a in planned["removed"]) > 0

    pruned = _prune(db, tmp_path, "--keep", "1")
    assert pruned["removed"] == planned["removed"] and pruned["bytes"] == planned["bytes"]
    after = _stored_ids(db)
    assert after["reward_head"] == [newest, applied, of_response_reports, member]
    assert after["reward_ensemble"] == [ensemble] and len(after["reward_lexical"]) == 1
    assert after["win_predictor"] == before["win_predictor"][:1]
    engine = open_database(db)
    assert load_scores(engine, f"reward:{unused}") == {}
    assert len(load_scores(engine, f"reward:{applied}")) == 80
    assert latest_scorer(engine, "reward:") == f"reward:{applied}"
    engine.dispose()

    again = _prune(db, tmp_path, "--keep", "1")
    assert (again["removed"], again["score_rows"], again["bytes"]) == ([], 0, 0)
    # What was kept still works: an ensemble scores through its members, `route` reads the
    # newest predictor, and `clusters --on response` finds the scores its reports name.
    assert _score(db, tmp_path, "reward", "apply", "--model-id", ensemble) == ensemble
    routed = convoscope("route", "Plan a trip to Rome", db=db, cwd=tmp_path)
    assert routed.returncode == 0, routed.stderr
    listed = convoscope("clusters", "--on", "response", db=db, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr


def test_prune_says_what_it_removes_and_refuses_keeping_none(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'p.sqlite'}"
    engine = open_database(db)
    for _ in range(2):
        save_model(engine, "win_predictor", files={"p.json": b"{}"}, config={}, metrics={})
    engine.dispose()
    said = convoscope("prune", "--keep", "1", db=db, cwd=tmp_path)
    assert said.returncode == 0, said.stderr
    assert "removed 1 stored artefact" in said.stdout and "database file" in said.stdout
    refused = convoscope("prune", "--keep", "0", db=db, cwd=tmp_path)
    assert refused.returncode == 2 and "--keep: must be at least 1" in refused.stderr
    engine = open_database(db)
    with pytest.raises(ValueError, match="keep must be at least 1"):
        plan_prune(engine, keep=0)  # the newest predictor is what `route` reads
    engine.dispose()


def _payload_bytes(engine: sa.Engine, model_id: str) -> int:
    query = sa.select(trained_models.c.payload).where(trained_models.c.id == model_id)
    with engine.connect() as conn:
        return len(conn.execute(query).scalar_one())


def test_prune_storage_on_every_engine(db_url: str, tmp_path: Path) -> None:
    """The plan, the one-transaction delete and the space given back, on DuckDB, SQLite and
    PostgreSQL: payload sizes are measured in SQL (DuckDB has no length(BLOB), SQLite 3.40
    no octet_length), and SQLite's file shrinks once vacuumed."""
    import os

    engine = open_database(db_url)
    exchanges = [f"{i:032x}" for i in range(3)]
    heads = []
    for i in range(4):
        files = {"head.bin": os.urandom(2_000_000 if i == 2 else 100)}
        heads.append(save_model(engine, "reward_head", files=files, config={}, metrics={}))
        store_scores(engine, f"reward:{heads[-1]}", dict.fromkeys(exchanges, float(i)))
    ensemble = save_model(
        engine, "reward_ensemble", files={}, config={"members": [heads[0]]}, metrics={}
    )
    orphan = "reward:" + "f" * 32  # scores whose model is no longer stored
    store_scores(engine, orphan, dict.fromkeys(exchanges, 0.0))
    store_scores(engine, f"reward:{heads[1]}", dict.fromkeys(exchanges, 1.0))  # the latest

    plan = plan_prune(engine, keep=1)
    assert [a.id for a in plan.remove] == [heads[2]]
    assert plan.score_rows == {f"reward:{heads[2]}": 3, orphan: 3}
    assert plan.bytes == _payload_bytes(engine, heads[2]) > 2_000_000
    assert {a.id for a in plan.keep} == {ensemble, heads[3], heads[1], heads[0]}

    size = _file_size(db_url)
    prune_stored(engine, plan)
    reclaim_space(engine)
    assert model_ids(engine, "reward_head") == [heads[3], heads[1], heads[0]]
    assert load_scores(engine, f"reward:{heads[2]}") == load_scores(engine, orphan) == {}
    assert len(load_scores(engine, f"reward:{heads[1]}")) == 3
    again = plan_prune(engine, keep=1)
    assert (again.remove, again.score_rows) == ((), {})
    engine.dispose()
    if db_url.startswith("sqlite"):
        assert _file_size(db_url) < size - 1_900_000  # VACUUM gave the payload's pages back


def _file_size(db_url: str) -> int:
    path = Path(sa.make_url(db_url).database or "")
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
