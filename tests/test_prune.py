"""`convoscope prune`: stored models and score rows nothing reads are removed, and nothing a
command or page reads is: through the real CLI on a scored DuckDB file, and the storage
layer on every engine."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from clustering.stages import kmeans_clusterer, pca_reducer
from clustering.step import ClusterStepConfig, cluster_exchanges
from clustering.topics import ClusterConfig
from ingest.embed_step import EmbedConfig
from storage.clusters import (
    cluster_ids_used,
    latest_run,
    load_clusters,
    save_cluster_run,
)
from storage.engine import open_database
from storage.logs import utcnow
from storage.models import model_ids, save_model
from storage.prune import plan_prune, prune_stored, reclaim_space, stored_runs
from storage.reports import load_cluster_reports, save_scored
from storage.schema import assignments, cluster_reports, cluster_runs, clusters, trained_models
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


def _synthetic_run(engine: sa.Engine, on: str, ids: list[str], exchanges: list[str]) -> str:
    """A clustering run holding topics `ids`, every exchange in the first, and a report for
    each topic: what `cluster` and `score` store, without fitting anything."""
    run_id = uuid.uuid4().hex
    run = {"id": run_id, "created_at": utcnow(), "on_field": on, "embedder": "e", "params": None}
    run |= {"n_rows": len(exchanges), "n_clusters": len(ids), "unassigned_share": 0.0}
    topics = [
        {"run_id": run_id, "id": i, "parent_id": None, "level": 0, "auto_name": i}
        | {"keywords": "[]", "size": 1, "share": 0.5}
        for i in ids
    ]
    rows = [{"run_id": run_id, "exchange_id": e, "cluster_id": ids[0]} for e in exchanges]
    save_cluster_run(engine, {**run, "events": None}, topics, rows)
    save_scored(engine, run_id, {i: {"weakness": 0.5} for i in ids})
    return run_id


def test_prune_says_what_it_removes_and_refuses_keeping_none(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'p.sqlite'}"
    engine = open_database(db)
    for _ in range(2):
        save_model(engine, "win_predictor", files={"p.json": b"{}"}, config={}, metrics={})
    exchanges = [f"{i:032x}" for i in range(3)]
    superseded = _synthetic_run(engine, "prompt", ["t0"], exchanges)
    _synthetic_run(engine, "prompt", ["t0"], exchanges)
    engine.dispose()
    said = convoscope("prune", "--keep", "1", db=db, cwd=tmp_path)
    assert said.returncode == 0, said.stderr
    assert "removed 1 stored artefact" in said.stdout and "database file" in said.stdout
    assert f"clustering {superseded} on prompt" in said.stdout
    assert "removed 1 superseded clustering with 3 assignment rows; kept 1" in said.stdout
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


def _cluster(db: str, topics: int, *, on: str = "prompt") -> str:
    """A new clustering run of `on` by PCA and k-means (no UMAP: not under test); its id."""
    engine = open_database(db)
    summary = cluster_exchanges(
        engine,
        config=ClusterStepConfig(
            embed=EmbedConfig(device="cpu", progress=False, on=on),
            topics=ClusterConfig(layout=False),
        ),
        reducer=pca_reducer(5),
        clusterer=kmeans_clusterer(topics),
    )
    engine.dispose()
    return summary.run_id


def _run_rows(db: str | sa.Engine, run_id: str) -> dict[str, int]:
    """Rows a clustering run holds in each table that hangs off it (`db`: a URL or engine)."""
    engine = open_database(db) if isinstance(db, str) else db
    tables = {"cluster_runs": cluster_runs.c.id, "clusters": clusters.c.run_id}
    tables |= {"assignments": assignments.c.run_id, "cluster_reports": cluster_reports.c.run_id}
    with engine.connect() as conn:
        counts = {
            name: conn.execute(sa.select(sa.func.count()).where(column == run_id)).scalar_one()
            for name, column in tables.items()
        }
    if isinstance(db, str):
        engine.dispose()
    return counts


def _cluster_ids(db: str, run_id: str) -> set[str]:
    engine = open_database(db)
    ids = {c["id"] for c in load_clusters(engine, run_id)}
    engine.dispose()
    return ids


def _cli_json(db: str, cwd: Path, *args: str) -> dict:
    result = convoscope(*args, "--json", db=db, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_prune_removes_superseded_clusterings_and_the_latest_still_serves(tmp_path: Path) -> None:
    """Three prompt clusterings and one older response clustering, pruned with --keep 1: the
    two older prompt runs go with every row that hangs off them, the response run (older than
    all three, but its field's latest) stays. What reads the latest run still works (clusters,
    export, assign), `route --export` says its table's run was pruned, a re-clustering
    carries ids and a person's name over from the kept run, and the pruned runs' ids are
    never given to a new topic."""
    log = _signal_log(tmp_path / "chats.jsonl")
    db = _ingested_and_clustered([log], tmp_path / "p.duckdb", topics=4)
    engine = open_database(db)
    first = latest_run(engine)["id"]
    engine.dispose()
    response = _cluster(db, 2, on="response")
    _score(db, tmp_path, "--mode", "head")  # reports and a routing table of `first`
    second, third = _cluster(db, 2), _cluster(db, 2)
    ever = set().union(*(_cluster_ids(db, r) for r in (first, second, third, response)))
    retiring = ever - _cluster_ids(db, third) - _cluster_ids(db, response)
    assert retiring  # 4 topics then 2: the gone ones' ids live in the older runs alone
    first_rows = _run_rows(db, first)
    assert first_rows["assignments"] == 80 and first_rows["cluster_reports"] > 0
    topic = sorted(_cluster_ids(db, third))[0]
    assert convoscope("rename", topic, "Trips", db=db, cwd=tmp_path).returncode == 0

    planned = _prune(db, tmp_path, "--keep", "1", "--dry-run")
    assert _run_rows(db, first) == first_rows  # a dry run removes nothing
    assert [(r["id"], r["on"], r["rows"]) for r in planned["removed_runs"]] == [
        (second, "prompt", 80),
        (first, "prompt", 80),
    ]
    assert {r["id"] for r in planned["kept_runs"]} == {third, response}
    assert planned["run_rows"] == 160 and set(planned["retired_cluster_ids"]) == retiring

    pruned = _prune(db, tmp_path, "--keep", "1")
    assert pruned["removed_runs"] == planned["removed_runs"]
    for gone in (first, second):
        assert set(_run_rows(db, gone).values()) == {0}
    assert _run_rows(db, third)["assignments"] == _run_rows(db, response)["assignments"] == 80
    again = _prune(db, tmp_path, "--keep", "1")
    assert (again["removed_runs"], again["run_rows"], again["retired_cluster_ids"]) == ([], 0, [])

    listed = _cli_json(db, tmp_path, "clusters")
    assert listed["run_id"] == third and "Trips" in {c["name"] for c in listed["clusters"]}
    assert _cli_json(db, tmp_path, "clusters", "--on", "response")["run_id"] == response
    exported = _cli_json(db, tmp_path, "export", "--out", str(tmp_path / "out.jsonl"))
    assert exported["rows"] == 80
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert {r["cluster_id"] for r in rows} <= _cluster_ids(db, third) | {None}
    more = tmp_path / "more.jsonl"
    more.write_text(log.read_text().replace("city number", "town number"))
    assert convoscope("ingest", str(more), db=db, cwd=tmp_path).returncode == 0
    assigned = _cli_json(db, tmp_path, "assign", "--device", "cpu")
    assert assigned["run_id"] == third and assigned["stored"] == 80  # the new chats' exchanges
    assert _run_rows(db, third)["assignments"] == 160
    export_table = ("route", "--export", str(tmp_path / "table.json"), "--json")
    routed = convoscope(*export_table, db=db, cwd=tmp_path)
    assert routed.returncode == 0, routed.stderr
    table = json.loads(routed.stdout)
    assert table["clustering_run_id"] == first and table["clustering_run_pruned"] is True
    assert "`convoscope prune` removed" in routed.stderr
    # The table keeps the field it ranked, so the warning names the clustering that replaced it.
    assert table["newer_clustering_run_id"] == third
    assert f"(run {third}, the latest clustering of prompts)" in routed.stderr

    engine = open_database(db)
    assert cluster_ids_used(engine) == ever  # what a fresh id must skip, pruned runs' too
    engine.dispose()
    carried = _cluster(db, 2)
    assert _cluster_ids(db, carried) == _cluster_ids(db, third)  # lineage from the kept run
    assert "Trips" in {c["name"] for c in _cli_json(db, tmp_path, "clusters")["clusters"]}
    finer = _cluster(db, 6)
    fresh = _cluster_ids(db, finer) - _cluster_ids(db, carried)
    assert fresh and not fresh & ever  # new topics take ids no run ever used


def test_prune_clusterings_storage_on_every_engine(db_url: str) -> None:
    """On DuckDB, SQLite and PostgreSQL: the newest run of each field stays whatever its age,
    the others go with their clusters, assignments and reports in the prune's transaction,
    the ids only they held are retired (a fresh cluster id skips them), and a second plan
    finds nothing."""
    engine = open_database(db_url)
    exchanges = [f"{i:032x}" for i in range(1200)]
    response = _synthetic_run(engine, "response", ["t9"], exchanges[:3])
    oldest = _synthetic_run(engine, "prompt", ["t0", "t1", "t2", "t3"], exchanges)
    older = _synthetic_run(engine, "prompt", ["t0", "t1", "t4"], exchanges)
    newest = _synthetic_run(engine, "prompt", ["t0", "t1"], exchanges)

    plan = plan_prune(engine, keep=1)
    assert [(r.id, r.rows, r.clusters) for r in plan.remove_runs] == [
        (older, 1200, 3),
        (oldest, 1200, 4),
    ]
    assert {r.id for r in plan.keep_runs} == {newest, response}
    assert plan.retire == ("t2", "t3", "t4") and plan.run_rows == 2400
    assert [r.id for r in plan_prune(engine, keep=2).remove_runs] == [oldest]

    prune_stored(engine, plan)
    assert [r.id for r in stored_runs(engine)] == [newest, response]
    for gone in (older, oldest):
        assert set(_run_rows(engine, gone).values()) == {0}
    assert _run_rows(engine, newest) == {
        "cluster_runs": 1,
        "clusters": 2,
        "assignments": 1200,
        "cluster_reports": 2,
    }
    assert len(load_cluster_reports(engine, response)) == 1  # what `clusters` reads stays
    assert cluster_ids_used(engine) == {"t0", "t1", "t2", "t3", "t4", "t9"}
    again = plan_prune(engine, keep=1)
    assert (again.remove_runs, again.retire) == ((), ())
    assert again.empty
    engine.dispose()
