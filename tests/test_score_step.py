"""The score step on a small real slice: judged battles plus logs with behaviour signals."""

from __future__ import annotations

import gzip
import itertools
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy.engine import Engine

from clustering.stages import kmeans_clusterer, pca_reducer
from clustering.step import ClusterStepConfig, cluster_exchanges
from clustering.topics import ClusterConfig
from ingest.embed import DEFAULT_MODEL_NAME
from ingest.embed_step import EmbedConfig, exchange_texts
from ingest.pipeline import IngestConfig, ingest_paths
from scoring.features import FEATURE_NAMES
from scoring.labels import LabelConfig
from scoring.reward_head import HeadConfig
from scoring.reward_step import (
    TrainedReward,
    exchange_embeddings,
    reward_members,
    train_head,
)
from scoring.step import (
    ScoreConfig,
    _exchange_frame,
    apply_reward,
    load_predictor,
    load_routing_table,
    score_all,
    train_reward_only,
)
from storage.clusters import latest_run, load_assignments
from storage.engine import open_database
from storage.models import latest_model, load_model, model_ids, save_models
from storage.reports import SCORER_KEY, load_cluster_reports
from storage.scores import latest_scores
from storage.vectors import missing_hashes
from tests.conftest import shared_data_file
from tests.test_ingest_pipeline import convoscope_here as convoscope  # many commands


def _signal_log(path: Path) -> Path:
    """Chats where one expert's answers get retried and the other's keep the user talking."""
    with path.open("w") as handle:
        for i in range(40):
            good = i % 2 == 0
            answer = {"role": "assistant", "content": "Here is a detailed plan: day one, museums."}
            if not good:
                answer["retried"] = True  # the user regenerated it
            else:
                answer["rating"] = 5
            messages = [
                {"role": "user", "content": f"Help me plan a trip to city number {i}"},
                answer,
            ]
            if good:
                messages += [
                    {"role": "user", "content": "Great, and day two?"},
                    {"role": "assistant", "content": "Day two: the old town and a river cruise."},
                    {"role": "user", "content": "Thanks!"},
                ]
            record = {"messages": messages, "model": "helpful-bot" if good else "terse-bot"}
            handle.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="session")
def clustered_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of `_clustered_db`, built once: ingesting, embedding and clustering it took
    5-6 s, and most tests here start from it."""
    folder = tmp_path_factory.mktemp("clustered")
    _clustered_db(shared_data_file, folder)
    return folder


@pytest.fixture
def scored_db(clustered_template: Path, tmp_path: Path) -> str:
    """A copy of the clustered database (and the logs beside it) that this test may change."""
    for path in clustered_template.iterdir():
        shutil.copy2(path, tmp_path / path.name)
    return f"duckdb:///{tmp_path / 'scored.duckdb'}"


def _clustered_db(shared_file, tmp_path: Path, *, fast: bool = False) -> str:
    """200 judged battles and the signal log, ingested and clustered into 6 topics (on
    `--fast` vectors when `fast`)."""
    battles = tmp_path / "battles.jsonl"
    with gzip.open(shared_file("alpacaeval_battles_dev.jsonl.gz"), "rt") as source:
        battles.write_text("".join(itertools.islice(source, 200)))
    db = f"duckdb:///{tmp_path / 'scored.duckdb'}"
    engine = open_database(db)
    config = IngestConfig(progress=False, rejects_path=tmp_path / "rejects.jsonl")
    ingest_paths([battles, _signal_log(tmp_path / "chats.jsonl")], engine=engine, config=config)
    embed = EmbedConfig(device="cpu", progress=False, fast=fast)
    topics = ClusterConfig(layout=False)
    cluster_exchanges(
        engine,
        config=ClusterStepConfig(embed=embed, topics=topics),
        reducer=pca_reducer(10),
        clusterer=kmeans_clusterer(6),
    )
    engine.dispose()
    return db


def test_the_routing_table_is_in_the_predictors_space_whatever_clustered(
    shared_file, tmp_path: Path
) -> None:
    """Clustered on `--fast` vectors (256 numbers), scored on the default model's (384): the
    table named the fast encoder and carried its centroids beside a projection for 384
    numbers, so no gateway embedding fitted both ways of routing."""
    from scoring.routing import apply_routing_table

    engine = open_database(_clustered_db(shared_file, tmp_path, fast=True))
    assert latest_run(engine)["embedder"] != DEFAULT_MODEL_NAME
    score_all(engine, config=ScoreConfig(embed=EmbedConfig(device="cpu", progress=False)))
    _, encoder = load_predictor(engine)
    table = load_routing_table(engine)
    engine.dispose()
    assert table["encoder"]["name"] == encoder == DEFAULT_MODEL_NAME
    dims = len(table["projection"][0]) - len(table["prompt_features"])
    assert {len(c["centroid"]) for c in table["clusters"]} == {dims} == {384}
    for entry in table["clusters"]:
        centroid = np.asarray(entry["centroid"])
        assert apply_routing_table(table, centroid, per_cluster=True) == entry["expert"]
        assert apply_routing_table(table, centroid) in table["experts"]


def test_a_fast_encoder_is_exported_beside_the_table(scored_db: str, tmp_path: Path) -> None:
    """After `score --fast` the table named `all-MiniLM-L6-v2+model2vec-256`, a static model
    convoscope distils, which a gateway cannot rebuild from that name. `route --export` copies
    it beside the table, and the gateway's route with that folder is `route TEXT`'s."""
    from model2vec import StaticModel

    from scoring.features import prompt_features
    from scoring.routing import apply_routing_table

    engine = open_database(scored_db)
    embed = EmbedConfig(device="cpu", progress=False, fast=True)
    score_all(engine, config=ScoreConfig(embed=embed, mode="head"))
    engine.dispose()
    (tmp_path / "rt-encoder").mkdir()  # someone else's folder is never replaced
    out = tmp_path / "rt.json"
    refused = convoscope("route", "--export", str(out), db=scored_db, cwd=tmp_path)
    assert refused.returncode != 0 and "is not an encoder folder" in refused.stderr
    (tmp_path / "rt-encoder").rmdir()
    for _ in range(2):  # a second export replaces the folder it wrote
        exported = convoscope("route", "--export", str(out), "--json", db=scored_db, cwd=tmp_path)
        assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["encoder_folder"] == str(tmp_path / "rt-encoder")
    table = json.loads(out.read_text())
    assert table["encoder"]["static_model"] == "rt-encoder"
    gateway = StaticModel.from_pretrained(str(out.parent / table["encoder"]["static_model"]))
    for prompt in ("Plan a weekend in Lisbon", "Write a Python function that sorts a list"):
        routed = convoscope("route", prompt, "--json", db=scored_db, cwd=tmp_path)
        assert routed.returncode == 0, routed.stderr
        (vector,) = gateway.encode([prompt], max_length=table["encoder"]["max_length"])
        chosen = apply_routing_table(table, vector, features=prompt_features([prompt])[0])
        assert chosen == json.loads(routed.stdout)["routes"][0]["recommended"]


def test_a_battle_is_held_out_whole_with_the_battles_sharing_its_answers() -> None:
    """Each answer of a battles file is its own conversation: holding out conversations one by
    one split most battles across training and measure, where they counted on neither."""
    from scoring.step import _holdout

    index = np.arange(60)
    frame = pd.DataFrame({"id": [f"e{i}" for i in index], "conversation_id": index.astype(str)})
    # 20 prompts: the baseline's answer (e0..e19) judged against two others each.
    a = [p for p in range(20) for _ in range(2)]
    b = [20 + 2 * p + k for p in range(20) for k in range(2)]
    battles = pd.DataFrame({"exchange_a": [f"e{i}" for i in a], "exchange_b": [f"e{i}" for i in b]})
    for seed in range(5):
        holdout = _holdout(frame, battles, 0.2, seed)
        assert (holdout[a] == holdout[b]).all()
        assert holdout.sum() == 12  # 4 of the 20 prompts, each with its 3 answers
    alone = _holdout(frame, battles.iloc[:0], 0.2, 0)  # no battles: conversations alone
    assert alone.sum() == 12 and not (alone[a] == alone[b]).all()


def _pairs_file(path: Path) -> Path:
    lines = [
        {"prompt": "What is 2+2?", "response": "4."},
        {"prompt": "What is 2+2?", "response": "I like turtles."},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_score_trains_applies_and_reports_every_cluster(scored_db: str, tmp_path: Path) -> None:
    engine = open_database(scored_db)
    costs = {"helpful-bot": 5.0, "terse-bot": 1.0, "gpt4_1106_preview": 10.0, "typo-bot": 0.1}
    config = ScoreConfig(
        embed=EmbedConfig(device="cpu", progress=False), costs=costs, route_cheapest=True
    )
    result = score_all(engine, config=config)
    (warning,) = result["warnings"]  # a misspelt expert is named, not silently costless
    assert "typo-bot" in warning and "terse-bot" in warning
    assert result["labels"]["retry"]["bad"] == 20  # the retried answers, and only those
    assert result["labels"]["battle"]["known"] >= 200  # the baseline answer recurs
    assert result["clusters"] == 6
    rewards = latest_scores(engine, prefix="reward:")
    assert len(rewards) == result["exchanges"]
    from scoring.reward_step import REWARD_KINDS
    from storage.models import latest_model

    assert latest_model(engine, "reward_head")["config"]["features"].startswith("structure:")
    default = latest_model(engine, REWARD_KINDS)  # head+lexical: their ensemble is the newest
    assert default["kind"] == "reward_ensemble" and default["id"] == result["reward_model"]
    apply_reward(engine, config=config)  # the stored head, reloaded, reads the same inputs,
    again = latest_scores(engine, prefix="reward:")  # so it gives the same scores
    assert all(again[i] == pytest.approx(r, abs=1e-5) for i, r in rewards.items())

    reports = load_cluster_reports(engine, latest_run(engine)["id"])
    weakest = next(iter(reports.values()))
    assert {"reward_mean", "reward_ci", "weakness", "reason", "routing"} <= set(weakest)
    assert weakest["reward_ci"][0] <= weakest["reward_mean"] <= weakest["reward_ci"][1]
    weakness = [r["weakness"] for r in reports.values()]
    assert weakness == sorted(weakness, reverse=True)
    assert any(r["leaderboard"] for r in reports.values())

    predictor, encoder = load_predictor(engine)
    assert {"helpful-bot", "terse-bot", "gpt4_1106_preview"} <= set(predictor.experts)
    for report in reports.values():  # judged battles plus the predictor's estimate: all ranked
        board = {line["model"]: line for line in report["leaderboard"]}
        assert set(board) == set(predictor.experts)
        for line in board.values():
            assert line["predicted_battles"] >= 10
            assert (line["win_rate"] is None) == (line["battles"] == 0)
    assert encoder == "all-MiniLM-L6-v2"
    table = load_routing_table(engine)
    assert {c["cluster_id"] for c in table["clusters"]} == set(reports)
    priced = [e for e in table["clusters"] if e["route"]["cheapest_expert"]]
    assert priced  # --route-cheapest: the cheapest expert within tolerance serves
    for entry in priced:
        route = entry["route"]
        assert entry["expert"] == route["cheapest_expert"]
        assert costs[route["cheapest_expert"]] <= costs.get(route["best_expert"], np.inf)
        assert route["cheapest_win_rate"] >= route["best_win_rate"] - 0.02
        assert reports[entry["cluster_id"]]["routing"]["cheapest_cost"] == route["cheapest_cost"]
    from scoring.routing import apply_routing_table

    centroid = np.asarray(table["clusters"][0]["centroid"])
    assert apply_routing_table(table, centroid, per_cluster=True) == table["clusters"][0]["expert"]
    engine.dispose()

    routed = convoscope("route", "Plan a weekend in Lisbon", "--json", db=scored_db, cwd=tmp_path)
    assert routed.returncode == 0, routed.stderr
    ranking = json.loads(routed.stdout)["routes"][0]["experts"]
    assert len(ranking) == len(predictor.experts)
    prompts = tmp_path / "prompts.txt"  # plain lines and JSONL mixed; a bad line is skipped
    prompts.write_text(
        'Plan a weekend in Lisbon\n{"prompt": "Sort a list"}\n{"prompt": 3}\n{"prompt": " "}\n'
    )
    routed = convoscope("route", "--file", str(prompts), "--json", db=scored_db, cwd=tmp_path)
    assert routed.returncode == 0, routed.stderr
    answer = json.loads(routed.stdout)
    assert [(r["line"], r["prompt"]) for r in answer["routes"]] == [
        (1, "Plan a weekend in Lisbon"),
        (2, "Sort a list"),
    ]
    again = answer["routes"][0]["experts"]  # the same prompt ranks the same (batched: ≈)
    assert [e["model"] for e in again] == [e["model"] for e in ranking]
    assert [e["score"] for e in again] == pytest.approx([e["score"] for e in ranking], abs=1e-4)
    assert [(r["line"], r["field"]) for r in answer["rejected"]] == [(3, "prompt"), (4, "prompt")]
    said = convoscope("route", "--file", str(prompts), db=scored_db, cwd=tmp_path).stdout
    assert [line.split(":")[0] for line in said.splitlines()] == ["line 1", "line 2"]
    best = ranking[0]["model"]  # what the figures are is said, not left to guess
    beat = f"line 1: route to {best}; predicted chance to beat the average expert: {best} 0."
    assert said.splitlines()[0].startswith(beat)

    # Without --json each command says what it did in a sentence, never a dict.
    cluster_id = table["clusters"][0]["cluster_id"]
    out = tmp_path / "rt.json"
    said = {
        f"routing table written to {out} ({len(table['clusters'])} clusters, 0 with an "
        "instruction that beat the original answers; instruction versions left out: 0 never "
        "scored": ("route", "--export", str(out)),
        f"cluster {cluster_id} renamed to 'Travel'": ("rename", cluster_id, "Travel"),
        f"cluster {cluster_id} has its automatic name again": ("rename", cluster_id, ""),
        f"cluster {cluster_id} tagged 'weak'": ("tag", cluster_id, "weak"),
        f"cluster {cluster_id} was already tagged 'weak'": ("tag", cluster_id, "weak"),
        f"tag 'weak' removed from cluster {cluster_id}": ("tag", cluster_id, "weak", "--remove"),
        "0 new exchanges assigned to the clusters of run": ("assign", "--device", "cpu"),
    }  # fmt: skip
    for sentence, args in said.items():
        printed = convoscope(*args, db=scored_db, cwd=tmp_path)
        assert printed.returncode == 0, printed.stderr
        assert printed.stdout.startswith(sentence) and "{" not in printed.stdout

    # The exported table carries a cluster's instruction only where its replay beat the
    # original answers to the same inputs (`replay report` stores both means).
    from storage.reports import save_instruction, set_instruction_reward

    other = table["clusters"][1]["cluster_id"]
    engine = open_database(scored_db)
    better = save_instruction(engine, cluster_id, "Answer step by step.")
    set_instruction_reward(engine, better["id"], 0.6, 0.4)
    worse = save_instruction(engine, cluster_id, "Be terse.")  # the best mean, yet a loss
    set_instruction_reward(engine, worse["id"], 0.7, 0.8)
    save_instruction(engine, other, "Never scored.")
    gone = save_instruction(engine, "t999", "A topic no longer routed to.")  # a gateway's dead end
    set_instruction_reward(engine, gone["id"], 0.9, 0.1)
    engine.dispose()
    exported = convoscope("route", "--export", str(out), "--json", db=scored_db, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    summary = json.loads(exported.stdout)
    assert summary["instructions"] == 1
    assert summary["instructions_left_out"] == {
        "not_scored": 1,
        "not_better_than_original": 1,
        "cluster_not_in_table": 1,
    }
    assert json.loads(out.read_text())["instructions"] == {
        cluster_id: {
            "version": 1,
            "text": "Answer step by step.",
            "mean_reward": 0.6,
            "original_mean_reward": 0.4,
        }
    }

    listing = json.loads(convoscope("clusters", "--json", db=scored_db, cwd=tmp_path).stdout)
    assert all("reward_mean" in c for c in listing["clusters"] if c["level"] == 0)
    assert listing["warnings"] == []
    assert {c["reward_scorer"] for c in listing["clusters"]} == {f"reward:{result['reward_model']}"}

    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    scored = convoscope("reward", "--file", str(pairs), "--json", db=scored_db, cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    answer = json.loads(scored.stdout)
    assert answer["reward_model"] == result["reward_model"]
    assert len(answer["scores"]) == 2 and all(np.isfinite(s["reward"]) for s in answer["scores"])

    # Reward scores newer than the reports' (as `score --on response` leaves the prompt
    # topics): `clusters` says the ranking is from the older model (it read as current).
    from storage.scores import store_scores

    engine = open_database(scored_db)
    store_scores(engine, "reward:stopped0001", dict.fromkeys(rewards, 0.5))
    engine.dispose()
    listed = convoscope("clusters", "--json", db=scored_db, cwd=tmp_path)
    (stale,) = json.loads(listed.stdout)["warnings"]
    assert f"reward:{result['reward_model']}" in stale and "reward:stopped0001" in stale
    assert "run `convoscope score` again" in stale and stale in listed.stderr

    # `score reward apply` re-aggregates the reports' rewards and keeps the routing `score`
    # made (with its costs) without being given them again.
    applied = convoscope("score", "reward", "apply", "--json", db=scored_db, cwd=tmp_path)
    assert applied.returncode == 0, applied.stderr
    assert json.loads(applied.stdout)["clusters"] == 6
    engine = open_database(scored_db)
    after = load_cluster_reports(engine, latest_run(engine)["id"])
    assert {k: r["routing"] for k, r in after.items()} == {
        k: r["routing"] for k, r in reports.items()
    }
    _assert_reports_use(engine, latest_scores(engine, prefix="reward:"))
    engine.dispose()
    listing = json.loads(convoscope("clusters", "--json", db=scored_db, cwd=tmp_path).stdout)
    assert listing["warnings"] == []


def test_the_routing_table_is_always_the_newest_predictors(scored_db: str, tmp_path: Path) -> None:
    """`score --on response` with nothing clustered on responses stored a new win predictor
    and no table, so `route --export` wrote the older predictor's table while `route TEXT`
    ranked with the new one, and nothing said so. Every predictor now gets its table (with
    per-cluster choices where a clustering gave them), and a table older than the newest
    predictor (a `score` stopped between the two, an older database) is exported with a
    warning naming that predictor."""
    from storage.models import save_model

    engine = open_database(scored_db)
    embed = EmbedConfig(device="cpu", progress=False)
    result = score_all(engine, config=ScoreConfig(embed=embed, mode="head"))
    table = load_routing_table(engine)
    assert table["predictor_id"] == result["predictor"] and len(table["clusters"]) == 6
    newer = load_model(engine, result["predictor"])  # as a `score` stopped after storing it
    newer_id = save_model(
        engine, "win_predictor", files=newer["files"], config=newer["config"], metrics={}
    )
    engine.dispose()
    out = tmp_path / "table.json"
    exported = convoscope("route", "--export", str(out), "--json", db=scored_db, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["newer_predictor_id"] == newer_id
    assert f"older win predictor than win predictor {newer_id}" in exported.stderr

    scored = convoscope("score", "--on", "response", "--mode", "head", db=scored_db, cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    assert "no clusters on response yet, only on prompt: pass --on prompt" in scored.stdout
    exported = convoscope("route", "--export", str(out), "--json", db=scored_db, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    summary = json.loads(exported.stdout)
    assert summary["newer_predictor_id"] is None and summary["clusters"] == 0
    assert "no per-cluster choices" in exported.stderr and "older win" not in exported.stderr
    engine = open_database(scored_db)
    predictor_id = model_ids(engine, "win_predictor")[0]
    engine.dispose()
    written = json.loads(out.read_text())
    assert written["predictor_id"] == predictor_id not in (newer_id, result["predictor"])
    assert written["clusters"] == [] and written["theta"]  # each prompt by the predictor


def test_a_score_stopped_at_its_last_write_leaves_the_previous_one_whole(scored_db: str) -> None:
    """`score` stored the reward models, then the cluster reports, then the win predictor with
    its routing table, each in a transaction of its own: stopped before the last, the reports
    routed by an older predictor than `route` used, and stopped before the reports, the
    table ranked clusters by the old model beside the new one's rewards. Now a failure at
    the very last row (the routing table) stores none of it."""
    import sqlalchemy as sa

    from storage.scores import latest_scorer

    engine = open_database(scored_db)
    embed = EmbedConfig(device="cpu", progress=False)
    first = score_all(engine, config=ScoreConfig(embed=embed, mode="head+lexical"))
    run_id = latest_run(engine)["id"]
    kinds = ["reward_head", "reward_lexical", "reward_ensemble", "win_predictor", "routing_table"]
    models, reports = model_ids(engine, kinds), load_cluster_reports(engine, run_id, level=None)
    assert latest_scorer(engine, "reward:") == f"reward:{first['reward_model']}"

    def stop_at_the_table(_conn, _cursor, statement: str, parameters: object, *_: object) -> None:
        if statement.startswith("INSERT INTO trained_models") and "'routing_table'" in repr(
            parameters
        ):
            raise RuntimeError("stopped")

    sa.event.listen(engine, "before_cursor_execute", stop_at_the_table)
    with pytest.raises(RuntimeError, match="stopped"):
        score_all(engine, config=ScoreConfig(embed=embed, mode="head+lexical", seed=1))
    sa.event.remove(engine, "before_cursor_execute", stop_at_the_table)
    assert model_ids(engine, kinds) == models
    assert load_cluster_reports(engine, run_id, level=None) == reports
    assert latest_scorer(engine, "reward:") == f"reward:{first['reward_model']}"

    second = score_all(engine, config=ScoreConfig(embed=embed, mode="head+lexical", seed=1))
    stored = model_ids(engine, kinds)
    assert len(stored) == len(models) + 5 and stored[1] == second["predictor"]  # table newest
    assert load_routing_table(engine)["predictor_id"] == second["predictor"]
    stamps = {r[SCORER_KEY] for r in load_cluster_reports(engine, run_id, level=None).values()}
    assert stamps == {f"reward:{second['reward_model']}"}
    engine.dispose()


def test_an_apply_stopped_at_its_last_write_leaves_the_previous_one_whole(scored_db: str) -> None:
    """`score reward apply` stored a model's scores, then re-ranked the reports, in two
    transactions: stopped between them, the cluster table ranked topics by the previous
    model beside the new one's rewards. Now a failure at its last write (the reports, after
    the scores) stores none of it, and the apply run again stores both."""
    import sqlalchemy as sa

    from storage.reports import stale_reports
    from storage.scores import latest_scorer

    engine = open_database(scored_db)
    config = ScoreConfig(embed=EmbedConfig(device="cpu", progress=False), mode="head+lexical")
    first = score_all(engine, config=config)
    run_id = latest_run(engine)["id"]
    head = latest_model(engine, "reward_head")["id"]
    rewards, reports = latest_scores(engine, prefix="reward:"), load_cluster_reports(engine, run_id)

    def stop_at_the_reports(_conn, _cursor, statement: str, *_: object) -> None:
        if statement.startswith("DELETE FROM cluster_reports"):  # the old ones, replaced
            raise RuntimeError("stopped")

    sa.event.listen(engine, "before_cursor_execute", stop_at_the_reports)
    with pytest.raises(RuntimeError, match="stopped"):
        apply_reward(engine, config=config, model_id=head)
    sa.event.remove(engine, "before_cursor_execute", stop_at_the_reports)
    assert latest_scorer(engine, "reward:") == f"reward:{first['reward_model']}"
    assert latest_scores(engine, prefix="reward:") == rewards
    assert load_cluster_reports(engine, run_id) == reports
    assert stale_reports(engine, run_id) is None

    applied = apply_reward(engine, config=config, model_id=head)
    assert latest_scorer(engine, "reward:") == applied["scorer"] == f"reward:{head}"
    stamps = {r[SCORER_KEY] for r in load_cluster_reports(engine, run_id, level=None).values()}
    assert stamps == {f"reward:{head}"} and stale_reports(engine, run_id) is None
    engine.dispose()


def test_the_default_head_reads_no_embeddings_an_older_head_still_does(scored_db: str) -> None:
    """Embedding every answer was most of a first `score` on a CPU and lowered the head's
    accuracy: the default head reads the answers' structure only. A head stored before, on
    embeddings and text features, still scores with the inputs it was trained on."""
    engine = open_database(scored_db)
    embed = EmbedConfig(device="cpu", progress=False)
    responses = sorted({item.text_hash for item in exchange_texts(engine, on="response")})
    result = score_all(engine, config=ScoreConfig(embed=embed))
    assert result["clusters"] == 6 and result["predictor"]  # prompts embedded, as before
    assert len(missing_hashes(engine, DEFAULT_MODEL_NAME, responses)) == len(responses)
    assert latest_model(engine, "reward_head")["config"]["encoder"] is None

    frame = _exchange_frame(engine)
    older = _older_text_head(engine, frame, embed)
    assert missing_hashes(engine, DEFAULT_MODEL_NAME, responses) == []  # it read them
    stored = load_model(engine, older.model_id)
    assert stored["config"]["encoder"] == DEFAULT_MODEL_NAME
    applied = apply_reward(engine, config=ScoreConfig(embed=embed), model_id=older.model_id)
    assert applied["exchanges"] == len(frame)
    rewards = latest_scores(engine, prefix="reward:")
    assert np.allclose([rewards[i] for i in frame["id"]], older.scores, atol=1e-5)
    engine.dispose()


def _older_text_head(engine: Engine, frame: pd.DataFrame, embed: EmbedConfig) -> TrainedReward:
    """A head as earlier releases trained it by default: on the prompt's and the response's
    `embed` vectors beside the text features, labelled by retries alone."""
    labels = pd.DataFrame({"label": np.where(frame["retried"].eq(True), 0.0, 1.0), "weight": 1.0})
    trained = train_head(
        frame,
        lambda: exchange_embeddings(engine, list(frame["id"]), embed),
        labels,
        pd.DataFrame(columns=["exchange_a", "exchange_b", "winner"]),
        np.zeros(len(frame), dtype=bool),
        config=HeadConfig(epochs=2),
        label_config=LabelConfig(),
        features_kind=f"text:{len(FEATURE_NAMES)}",
    )
    save_models(engine, [trained.record])
    return trained


def test_an_older_head_on_fast_vectors_still_scores(tmp_path: Path) -> None:
    """A head an earlier release trained after `score --fast` stored its encoder as
    `all-MiniLM-L6-v2+model2vec-256`: `score reward apply` and `reward --file` looked that
    name up as a model on the hub and failed, so the upgraded database could not use it."""
    from scoring.reward_step import score_texts

    engine = open_database(f"duckdb:///{tmp_path / 'old.duckdb'}")
    config = IngestConfig(progress=False, rejects_path=tmp_path / "rejects.jsonl")
    ingest_paths([_signal_log(tmp_path / "chats.jsonl")], engine=engine, config=config)
    frame = _exchange_frame(engine)
    older = _older_text_head(engine, frame, EmbedConfig(device="cpu", progress=False, fast=True))
    assert load_model(engine, older.model_id)["config"]["encoder"].endswith("+model2vec-256")
    apply_reward(
        engine, config=ScoreConfig(embed=EmbedConfig(progress=False)), model_id=older.model_id
    )
    rewards = latest_scores(engine, prefix="reward:")
    assert np.allclose([rewards[i] for i in frame["id"]], older.scores, atol=1e-5)
    first = frame["prompt"].str.startswith("Help me plan").to_numpy()  # no earlier turn
    texts, _ = score_texts(engine, list(frame["prompt"]), list(frame["response"]))
    assert np.allclose(texts[first], older.scores[first], atol=1e-4)
    engine.dispose()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("[1, 2]", "expected a JSON object"),
        ('{"a": "cheap"}', "the cost of 'a' must be a number"),
        ('{"a": -1}', "the cost of 'a' must be a number"),
        ("{nope", "not JSON"),
        ('\ufeff{"a": -1}', "the cost of 'a' must be a number"),  # a BOM: JSON all the same
    ],
)
def test_score_refuses_a_bad_costs_file(tmp_path: Path, content: str | None, message: str) -> None:
    costs = tmp_path / "costs.json"
    if content is not None:
        costs.write_text(content)
    db = f"duckdb:///{tmp_path / 'empty.duckdb'}"
    refused = convoscope("score", "--costs", str(costs), db=db, cwd=tmp_path)
    assert refused.returncode == 2 and message in refused.stderr
    assert "costs.json" in refused.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "--steps must be at least 1"),
        (["--max-length", "1024"], "--max-length must be between 8 and 512"),
        (["--finetune-batch-size", "1"], "--finetune-batch-size must be at least 4"),
        (["--mode", "head+magic"], "unknown reward mode 'head+magic'"),
        (["--mode", "head+head"], "unknown reward mode 'head+head'"),
    ],
)
def test_score_refuses_bad_fine_tuning_flags(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    db = f"duckdb:///{tmp_path / 'empty.duckdb'}"
    refused = convoscope(
        "score", "reward", "train", "--mode", "ensemble", *flags, db=db, cwd=tmp_path
    )
    assert refused.returncode == 2 and message in refused.stderr


def test_ratings_outside_the_rating_scale_are_said(tmp_path: Path) -> None:
    """A log rated 1-10, scored on the default 1:5 scale, read every rating of 5 or more as
    fully good (a 6 and a 10 alike) and said nothing: it is now a warning that names the
    ratings logged and the option, and the right scale clears it."""
    log = tmp_path / "rated.jsonl"
    with log.open("w") as handle:
        for i in range(30):
            messages = [
                {"role": "user", "content": f"Rate my haiku number {i}"},
                {"role": "assistant", "content": "Lovely. " * (i % 5 + 1), "rating": i % 10 + 1},
            ]
            handle.write(json.dumps({"messages": messages, "model": "bot"}) + "\n")
    db = f"duckdb:///{tmp_path / 'rated.duckdb'}"
    assert convoscope("ingest", str(log), db=db, cwd=tmp_path).returncode == 0
    train = ["score", "reward", "train", "--mode", "head", "--json"]
    scored = convoscope(*train, db=db, cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    (warning,) = json.loads(scored.stdout)["warnings"]
    assert warning.startswith("15 of 30 ratings lie outside the rating scale 1:5 (logged: 1 to 10)")
    assert warning in scored.stderr and "--rating-scale" in warning
    rescaled = convoscope(*train, "--rating-scale", "1:10", db=db, cwd=tmp_path)
    assert rescaled.returncode == 0 and json.loads(rescaled.stdout)["warnings"] == []


def test_a_battle_of_an_expert_against_itself_is_in_no_leaderboard(tmp_path: Path) -> None:
    """A judge's verdict on a replay by the same model with a new instruction is a battle of
    that expert against itself: it counted as two of its battles with one win, so a cluster
    leaderboard (and the UI's) gave it more battles and a win rate nearer 0.5 than it had."""
    from storage.views import ViewFilter, battle_models

    battles = tmp_path / "battles.jsonl"
    with battles.open("w") as handle:
        for i in range(24):
            self_battle = i % 4 == 0
            line = {
                "prompt": f"Name a {['river', 'mountain'][i % 2]} number {i}",
                "model_a": "steady",
                "response_a": f"Here is one answer, number {i}.",
                "model_b": "steady" if self_battle else "rival",
                "response_b": f"Another answer {i}, longer than the first one here.",
                "winner": "model_b",
            }
            handle.write(json.dumps(line) + "\n")
    db = _ingested_and_clustered([battles], tmp_path / "self.duckdb", topics=2)
    scored = convoscope("score", "--mode", "head", db=db, cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    engine = open_database(db)
    reports = load_cluster_reports(engine, latest_run(engine)["id"])  # the two topics
    ui_battles = battle_models(engine, ViewFilter())
    engine.dispose()
    lines = [line for r in reports.values() for line in r["leaderboard"]]
    judged = {
        m: sum(line["battles"] for line in lines if line["model"] == m) for m in ("steady", "rival")
    }
    assert judged == {"steady": 18, "rival": 18}  # the 6 battles of `steady` against itself: none
    assert all(line["win_rate"] in (0.0, 1.0) for line in lines)
    assert len(ui_battles) == 18


def test_a_battle_of_two_identical_answers_is_a_tie(tmp_path: Path) -> None:
    """`reward --file` scored the same answer at two places of a batch some 1e-7 apart, so a
    battle of two identical answers named one of them preferred rather than a tie."""
    from tests.tiny_reward_model import tiny_classifier

    own = tiny_classifier(tmp_path / "own-reward-model")
    lines = tmp_path / "same.jsonl"
    with lines.open("w") as handle:
        for i in range(40):
            answer = "The moon orbits the earth. " * (i + 1)
            line = {"prompt": "Tell me about the moon " * (i % 3 + 1), "winner": "tie"}
            handle.write(json.dumps({**line, "response_a": answer, "response_b": answer}) + "\n")
    db = f"duckdb:///{tmp_path / 'none.duckdb'}"
    scored = convoscope(
        "reward", "--file", str(lines), "--reward-model", str(own), "--json", db=db, cwd=tmp_path
    )
    assert scored.returncode == 0, scored.stderr
    battles = json.loads(scored.stdout)["battles"]
    assert len(battles) == 40
    assert all(b["reward_a"] == b["reward_b"] and b["preferred"] == "tie" for b in battles)


def test_fine_tuning_on_a_gpu_that_is_not_there_is_refused(tmp_path: Path) -> None:
    """`score reward train --mode ensemble --device cuda` on a machine without CUDA stored the
    head and lexical members, then failed in torch with an AssertionError traceback."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    log = _signal_log(tmp_path / "chats.jsonl")
    db = f"duckdb:///{tmp_path / 'gpu.duckdb'}"
    assert convoscope("ingest", str(log), db=db, cwd=tmp_path).returncode == 0
    train = ["score", "reward", "train", "--mode", "ensemble", "--steps", "1", "--max-length", "16"]
    refused = convoscope(*train, "--device", "cuda", db=db, cwd=tmp_path)
    assert refused.returncode == 2
    assert "device 'cuda' was asked for but torch sees no CUDA GPU" in refused.stderr
    engine = open_database(db)
    assert latest_model(engine, "reward_head") is None  # nothing trained, nothing stored
    engine.dispose()


def test_a_log_of_one_conversation_trains_on_it(tmp_path: Path) -> None:
    """One conversation, every answer rated or thumbed: the held-out 20 % of conversations
    took it whole and `score` refused with "no training row has a known signal", which
    every row had. It is now trained on whole, with no held-out measure to report."""
    messages = []
    for turn in range(6):
        signal = {"rating": 5} if turn % 2 else {"thumbs": -1}
        messages += [
            {"role": "user", "content": f"Question {turn} about Rust lifetimes"},
            {"role": "assistant", "content": "Borrow it. " * (turn + 1), **signal},
        ]
    log = tmp_path / "one.jsonl"
    log.write_text(json.dumps({"messages": messages, "model": "solo"}) + "\n")
    db = f"duckdb:///{tmp_path / 'one.duckdb'}"
    assert convoscope("ingest", str(log), db=db, cwd=tmp_path).returncode == 0
    trained = convoscope(
        "score", "reward", "train", "--mode", "head", "--json", db=db, cwd=tmp_path
    )
    assert trained.returncode == 0, trained.stderr
    result = json.loads(trained.stdout)
    assert result["labels"]["joint"]["known"] == 6
    assert result["reward_metrics"] == {"held_out_exchanges": 0}


@pytest.mark.parametrize(
    ("words", "named"),
    [
        (["reward", "apply", "--reward-model", "my-model"], "--reward-model"),
        (["reward", "apply", "--mode=lexical", "--alpha-retry", "2"], "--mode, --alpha-retry"),
        (["reward", "apply", "--rating-scale", "1:10"], "--rating-scale"),
        (["reward", "apply", "--predicted-battles", "0"], "--predicted-battles"),
        (["reward", "train", "--costs", "costs.json", "--route-cheapest"], "--costs, --route"),
        (["reward", "--cost-tolerance", "0.1", "train"], "--cost-tolerance"),
        (["--cost-tolerance", "0.1"], "--cost-tolerance would go unused without --costs"),
        (["reward", "apply", "--fast"], "trained on, so --fast would go unused"),
        (["reward", "train", "--model", "m", "--batch-size", "8"], "embeds nothing"),
        (["--mode", "head", "--steps", "1600"], "--mode head fine-tunes no model, so --steps"),
        (["reward", "train", "--mode", "lexical", "--epochs", "5"], "trains no head, so --epochs"),
        (["--reward-model", "my-model", "--mode", "ensemble"], "so --mode would go unused"),
    ],
)
def test_score_reward_refuses_options_it_would_not_read(
    tmp_path: Path, words: list[str], named: str
) -> None:
    """`score reward apply --reward-model DIR` applied the stored model, `score reward train
    --costs F` chose no cheaper expert, `--mode head --steps N` fine-tuned nothing and
    `--reward-model DIR --mode ensemble` trained nothing, each saying nothing: refused before
    any work."""
    db = f"duckdb:///{tmp_path / 'never.duckdb'}"
    refused = convoscope("score", *words, db=db, cwd=tmp_path)
    assert refused.returncode == 2 and named in refused.stderr
    assert "would go unused" in refused.stderr
    assert not (tmp_path / "never.duckdb").exists()


def test_reward_file_and_a_users_own_reward_model(scored_db: str, tmp_path: Path) -> None:
    from tests.tiny_reward_model import tiny_classifier

    # A real sequence-classification directory, of one small layer reading 64 tokens.
    own = tiny_classifier(tmp_path / "own-reward-model", positions=64)

    engine = open_database(scored_db)
    config = ScoreConfig(embed=EmbedConfig(device="cpu", progress=False), reward_model_dir=str(own))
    result = score_all(engine, config=config)
    assert len(latest_scores(engine, prefix="reward:")) == result["exchanges"]
    engine.dispose()

    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    stored = convoscope("reward", "--file", str(pairs), "--json", db=scored_db, cwd=tmp_path)
    assert stored.returncode == 0, stored.stderr  # the stored external model scores the file
    assert json.loads(stored.stdout)["reward_model"] == result["reward_model"]
    rewards_stored = [s["reward"] for s in json.loads(stored.stdout)["scores"]]
    scored = convoscope(
        "reward", "--file", str(pairs), "--reward-model", str(own), "--json",
        db=scored_db, cwd=tmp_path,
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    rewards = [s["reward"] for s in json.loads(scored.stdout)["scores"]]
    assert len(rewards) == 2 and all(np.isfinite(rewards))

    # A bad line costs only itself: the good lines around it are scored, with their numbers.
    mixed = tmp_path / "mixed.jsonl"
    good = pairs.read_text().splitlines()
    mixed.write_text("\n".join([good[0], '{"prompt": "no response"}', "", good[1]]) + "\n")
    partial = convoscope("reward", "--file", str(mixed), "--json", db=scored_db, cwd=tmp_path)
    assert partial.returncode == 0, partial.stderr
    answer = json.loads(partial.stdout)
    assert [s["line"] for s in answer["scores"]] == [1, 4]
    assert [s["reward"] for s in answer["scores"]] == pytest.approx(rewards_stored)
    assert answer["rejected"] == [
        {"file": str(mixed), "line": 2, "field": "response", "reason": "missing"}
    ]
    assert "mixed.jsonl:2: field 'response': missing" in partial.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no response"}\n')
    refused = convoscope("reward", "--file", str(bad), db=scored_db, cwd=tmp_path)
    assert refused.returncode == 2 and "bad.jsonl:1" in refused.stderr
    assert "no usable line" in refused.stderr


def test_reward_file_measures_battles_against_the_judge(
    scored_db: str, shared_file, tmp_path: Path
) -> None:
    """Battles the reward model never saw (other lines of the AlpacaEval file) go through
    `reward --file`: each answer gets the reward it gets as a pair line, and the agreement with
    the judge is counted beside "the longer answer wins", overall and by expert."""
    _train_reward("lexical", scored_db, tmp_path)
    with gzip.open(shared_file("alpacaeval_battles_dev.jsonl.gz"), "rt") as source:
        held = [json.loads(line) for line in itertools.islice(source, 200, 260)]
    held[0]["winner"] = "tie"
    lines = [json.dumps(b) for b in held]
    lines.append(json.dumps({**held[1], "winner": "model_c"}))  # an unknown verdict: skipped
    lines.append(json.dumps({"prompt": held[2]["prompt"], "response": held[2]["response_b"]}))
    path = tmp_path / "held.jsonl"
    path.write_text("\n".join(lines) + "\n")

    scored = convoscope("reward", "--file", str(path), "--json", db=scored_db, cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    assert f"held.jsonl:{len(held) + 1}: field 'winner'" in scored.stderr
    answer = json.loads(scored.stdout)
    battles = answer["battles"]
    assert [b["line"] for b in battles] == list(range(1, len(held) + 1))
    assert battles[2]["reward_b"] == pytest.approx(answer["scores"][0]["reward"], abs=1e-6)
    for b in battles:
        gap = b["reward_a"] - b["reward_b"]
        assert b["preferred"] == ("a" if gap > 0 else "b" if gap < 0 else "tie")

    decided = [(b, h) for b, h in zip(battles, held, strict=True) if b["winner"] != "tie"]
    agreement = answer["agreement"]
    assert (agreement["battles"], agreement["ties"]) == (len(held) - 1, 1)
    won = [b["winner"] for b, _ in decided]
    assert agreement["accuracy"] == pytest.approx(
        np.mean([b["preferred"] == w for (b, _), w in zip(decided, won, strict=True)])
    )
    longer = ["a" if len(h["response_a"]) > len(h["response_b"]) else "b" for _, h in decided]
    assert agreement["longer_wins"] == pytest.approx(np.mean(np.array(longer) == np.array(won)))
    by_model = answer["agreement_by_model"]
    assert set(by_model) == {h["model_a"] for h in held} | {h["model_b"] for h in held}
    assert by_model["gpt4_1106_preview"] == agreement  # the reference plays every battle

    table = convoscope("reward", "--file", str(path), db=scored_db, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    row = next(ln for ln in table.stdout.splitlines() if ln.startswith("all battles"))
    figures = (agreement["battles"], agreement["accuracy"], agreement["longer_wins"])
    assert row.split()[2:] == [str(figures[0]), *(f"{x:.3f}" for x in figures[1:])]


def test_reward_train_finetune_then_apply(scored_db: str, tmp_path: Path) -> None:
    """`score reward train --mode finetune` fine-tunes MiniLM (a few steps here), stores it in
    the database; `apply` scores every exchange with it again, without training."""
    from storage.models import latest_model

    result = _train_reward("finetune", scored_db, tmp_path)
    assert result["mode"] == "finetune" and "battle_pairwise_accuracy" in result["reward_metrics"]
    engine = open_database(scored_db)
    stored = latest_model(engine, "reward_finetuned")
    assert stored is not None and stored["id"] == result["reward_model"]
    assert "backbone/config.json" in stored["files"] and "head.pt" in stored["files"]
    assert len(stored["data_fingerprint"]) == 64  # sha256 of the data it learnt from
    before = latest_scores(engine, prefix="reward:")
    assert len(before) == result["exchanges"]
    _assert_reports_use(engine, before)  # the cluster table moved to the new model's rewards
    assert result["clusters"] > 0

    applied = apply_reward(engine, config=ScoreConfig(), model_id=result["reward_model"])
    assert applied["exchanges"] == result["exchanges"] and applied["kind"] == "reward_finetuned"
    after = latest_scores(engine, prefix="reward:")
    some = next(iter(before))
    assert after[some] == pytest.approx(before[some], abs=1e-4)  # the same model, reloaded
    listed = f"no stored reward model 'nope' \\(stored, newest first: {result['reward_model']}"
    with pytest.raises(ValueError, match=listed):
        apply_reward(engine, config=ScoreConfig(), model_id="nope")
    engine.dispose()

    reapplied = convoscope("score", "reward", "apply", "--json", db=scored_db, cwd=tmp_path)
    assert reapplied.returncode == 0, reapplied.stderr
    assert json.loads(reapplied.stdout)["clusters"] == result["clusters"]

    wrong = convoscope("score", "reward", "fit", db=scored_db, cwd=tmp_path)
    assert wrong.returncode == 2 and "score reward train" in wrong.stderr

    _assert_ensemble_trains_and_applies(scored_db, tmp_path)


def _train_reward(mode: str, db: str, cwd: Path) -> dict:
    """`score reward train --mode MODE`, when it fine-tunes with two CPU steps on 32 tokens
    (every exchange is scored again after each: at the default 128, most of the test's
    minutes); its --json result."""
    finetune = ["--steps", "2", "--max-length", "32"] if "finetune" in reward_members(mode) else []
    trained = convoscope(
        "score", "reward", "train", "--mode", mode, *finetune, "--device", "cpu", "--json",
        db=db, cwd=cwd,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    return json.loads(trained.stdout)


def _assert_ensemble_trains_and_applies(scored_db: str, tmp_path: Path) -> None:
    """`--mode ensemble` stores a head, a lexical model, a fine-tuned model and their
    ensemble (the newest);
    its rewards are the sum of the members' standardised rewards, and `apply` and
    `reward --file` use it."""
    from scoring.reward_step import REWARD_KINDS, Ensemble
    from storage.models import latest_model, load_model
    from storage.scores import load_scores

    result = _train_reward("ensemble", scored_db, tmp_path)
    assert result["mode"] == "ensemble" and "battle_pairwise_accuracy" in result["reward_metrics"]
    engine = open_database(scored_db)
    stored = latest_model(engine, REWARD_KINDS)
    assert stored is not None and stored["kind"] == "reward_ensemble"
    assert stored["id"] == result["reward_model"]
    ensemble = Ensemble.load(stored)
    kinds = [load_model(engine, member)["kind"] for member, _, _ in ensemble.members]
    assert kinds == ["reward_head", "reward_lexical", "reward_finetuned"]
    assert set(result["reward_metrics"]["members"]) == {m for m, _, _ in ensemble.members}
    rewards = load_scores(engine, f"reward:{stored['id']}")
    parts = [load_scores(engine, f"reward:{member}") for member, _, _ in ensemble.members]
    ids = sorted(rewards)
    expected = ensemble.combine([np.array([part[i] for i in ids]) for part in parts])
    assert [rewards[i] for i in ids] == pytest.approx(expected.tolist(), abs=1e-6)
    assert abs(float(np.mean(expected))) < 1.0  # standardised on the training rows

    applied = apply_reward(engine, config=ScoreConfig())
    assert applied["reward_model"] == stored["id"] and applied["kind"] == "reward_ensemble"
    again = load_scores(engine, f"reward:{stored['id']}")
    assert [again[i] for i in ids] == pytest.approx([rewards[i] for i in ids], abs=1e-4)
    engine.dispose()

    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    scored = convoscope("reward", "--file", str(pairs), "--json", db=scored_db, cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    answer = json.loads(scored.stdout)
    assert answer["reward_model"] == stored["id"] and len(answer["scores"]) == 2
    assert all(np.isfinite([s["reward"] for s in answer["scores"]]))


def _assert_reports_use(engine: Engine, rewards: dict[str, float]) -> None:
    """Every cluster report's mean reward is the mean of `rewards` over its members."""
    run = latest_run(engine, on_field="prompt")
    assert run is not None
    members: dict[str, list[float]] = {}
    for exchange_id, cluster_id in load_assignments(engine, run["id"]).items():
        if cluster_id is not None:
            members.setdefault(cluster_id, []).append(rewards[exchange_id])
    reports = load_cluster_reports(engine, run["id"])
    assert reports and set(reports) <= set(members)
    for cluster_id, report in reports.items():
        assert report["reward_mean"] == pytest.approx(np.mean(members[cluster_id]), abs=1e-6)


def test_groups_carry_reward_weakness_and_weakest_topics(scored_db: str, tmp_path: Path) -> None:
    """A parent group is scored like a topic, over its own exchanges, in the same step: its
    CI is bootstrapped over them (not a mean of topic means), its weakness is on the topics'
    scale, it names its weakest topics, and re-scoring replaces it."""
    from scoring.weakness import bootstrap_mean_ci
    from storage.clusters import load_clusters
    from storage.scores import latest_scorer

    engine = open_database(scored_db)
    config = ScoreConfig(embed=EmbedConfig(device="cpu", progress=False), mode="head")
    result = score_all(engine, config=config)
    run = latest_run(engine)
    parent_of = {
        c["id"]: c["parent_id"] for c in load_clusters(engine, run["id"]) if c["level"] == 0
    }
    groups = {g for g in parent_of.values() if g}
    assert len(groups) >= 2
    assert (result["clusters"], result["groups"]) == (6, len(groups))
    topics = load_cluster_reports(engine, run["id"])
    reports = load_cluster_reports(engine, run["id"], level=1)
    assert set(reports) == groups and not groups & set(topics)
    weakness = [r["weakness"] for r in reports.values()]
    assert weakness == sorted(weakness, reverse=True)
    assert any(r["leaderboard"] for r in reports.values())  # the group's battles, pooled
    from storage.views import expert_matrix

    assert {row["cluster_id"] for row in expert_matrix(engine, run["id"])} <= set(topics)

    def check(rewards: dict[str, float]) -> None:
        signals = _exchange_frame(engine).set_index("id")
        assignment = {e: t for e, t in load_assignments(engine, run["id"]).items() if t}
        overall = np.mean([rewards[e] for e in assignment])
        topic_reports = load_cluster_reports(engine, run["id"])
        pooled = []
        for group, report in load_cluster_reports(engine, run["id"], level=1).items():
            members = [e for e, t in assignment.items() if parent_of[t] == group]
            values = np.array([rewards[e] for e in members])
            chats = signals.loc[members, "conversation_id"].to_numpy()
            mean, lo, hi = bootstrap_mean_ci(values, groups=chats)
            assert report["n"] == len(members)
            assert report["conversations"] == len(set(chats))
            assert report["share"] == pytest.approx(len(members) / len(assignment))
            assert report["reward_mean"] == pytest.approx(mean, abs=1e-9)
            assert report["reward_ci"] == pytest.approx([lo, hi], abs=1e-9)
            assert report["weakness"] == pytest.approx(max(0.0, overall - lo) * report["share"])
            # The chats log marks its retried answers: there, unmarked ones were not retried.
            rows = signals.loc[members]
            marks = rows["source"].str.endswith("chats.jsonl")
            retried = rows["retried"].where(rows["retried"].notna() | ~marks, False)
            retried = retried.dropna().astype(float)
            assert 0 < retried.mean() < 1 or not marks.any()
            assert report["retry_rate"] == (pytest.approx(retried.mean()) if len(retried) else None)
            assert f"the clustered mean {overall:.3f}: mean reward {mean:.3f}" in report["reason"]
            mine = sorted(  # weakest first, ties by the CI's lower bound: the topics' order
                (t for t in topic_reports if parent_of[t] == group),
                key=lambda t: (-topic_reports[t]["weakness"], topic_reports[t]["reward_ci"][0], t),
            )
            assert report["topics"] == len(mine)
            assert [t["id"] for t in report["weakest_topics"]] == mine[:3]
            of_topics = np.mean([topic_reports[t]["reward_mean"] for t in mine])
            pooled.append(abs(report["reward_mean"] - of_topics) > 1e-6)
        assert any(pooled)  # unequal topics: the mean of their means is another figure

    check(latest_scores(engine, prefix="reward:"))
    # Re-ranking leaves one report per topic and group, and new rewards reach the groups:
    # another model's (`score reward train`), then the first one's again (`score reward apply`).
    lexical = train_reward_only(engine, config=replace(config, mode="lexical"))
    assert (lexical["clusters"], lexical["groups"]) == (6, len(groups))
    check(latest_scores(engine, prefix="reward:"))
    applied = apply_reward(engine, config=config, model_id=result["reward_model"])
    assert (applied["clusters"], applied["groups"]) == (6, len(groups))
    assert (
        latest_scorer(engine, "reward:") == applied["scorer"] != f"reward:{lexical['reward_model']}"
    )
    assert len(load_cluster_reports(engine, run["id"], level=None)) == 6 + len(groups)
    check(latest_scores(engine, prefix="reward:"))
    reports = load_cluster_reports(engine, run["id"], level=1)
    engine.dispose()

    listing = convoscope("clusters", "--json", db=scored_db, cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    listed = {c["id"]: c for c in json.loads(listing.stdout)["clusters"]}
    for group in groups:
        assert listed[group]["reward_mean"] == reports[group]["reward_mean"]
        assert listed[group]["weakness"] == reports[group]["weakness"]
        assert listed[group]["reason"] and listed[group]["weakest_topics"]
        first = listed[group]["weakest_topics"][0]
        assert first["name"] == listed[first["id"]]["name"]
    plain = convoscope("clusters", "--level", "1", db=scored_db, cwd=tmp_path).stdout
    # A reason leads with its verdict, which the UI's narrow Why column still shows.
    why = r"why: (surely below|possibly below|not clearly different from|above) the clustered"
    assert plain.startswith("groups, weakest first\n")
    both = convoscope("clusters", db=scored_db, cwd=tmp_path).stdout
    assert both.startswith("topics, weakest first (low reward × traffic share)\nid ")
    assert plain.count("weakest topics: ") == len(groups) and re.search(why, plain)


def test_the_score_summary_counts_topic_and_group_reports() -> None:
    from app.commands import describe

    result = {"exchanges": 10, "reward_model": "m1", "mode": "head", "reward_metrics": {}}
    line = describe("score", {**result, "clusters": 30, "groups": 5})
    assert line.endswith("; 30 topic reports and 5 group reports")
    assert describe("score", {**result, "clusters": 1, "groups": 0}).endswith("; 1 topic report")


def test_an_engagement_auc_on_few_labels_is_said_to_be_noise() -> None:
    from app.commands import describe

    def line(labels: int) -> str:
        metrics = {"engagement_auc": 0.35, "held_out_labels": labels}
        return describe(
            "score",
            {"exchanges": 40, "reward_model": "m", "mode": "head", "reward_metrics": metrics},
        )

    assert "engagement_auc 0.350 on only 20 held-out labels: too few to trust" in line(20)
    assert "too few" not in line(500)


def test_score_after_two_replays_of_a_log_that_names_no_model(tmp_path: Path) -> None:
    """A ShareGPT-style log names no model; two replays against it add two models whose
    answers no user saw (no label). `score` then fitted the win predictor on two experts
    without a single labelled row and failed ("no battles and no labelled single-expert rows
    to learn from") after storing the rewards, leaving every cluster report stale: the
    README's replay, score, replay report flow broke on the demo's own data."""
    from ingest.replay import ReplayConfig, replay
    from tests.openai_server import OpenAIServer

    db = _clustered_log_without_models(tmp_path)
    engine = open_database(db)
    embed = EmbedConfig(device="cpu", progress=False)
    with OpenAIServer() as server:
        for model in ("new-a", "new-b"):
            sent = ReplayConfig(model=model, base_url=server.base_url, progress=False)
            assert replay(engine, config=sent).done > 0
    result = score_all(engine, config=ScoreConfig(embed=embed))
    assert "predictor" not in result  # nothing to learn experts from: no predictor, no error
    assert result["clusters"] == 2
    rewards = latest_scores(engine, prefix="reward:")
    reports = load_cluster_reports(engine, latest_run(engine)["id"])
    engine.dispose()
    assert len(rewards) == result["exchanges"] and len(reports) == 2


def _clustered_log_without_models(tmp_path: Path) -> str:
    """The signal log with its model names taken out, ingested and clustered into 2 topics:
    the database of a log that names no model (a DuckDB URL)."""
    log = _signal_log(tmp_path / "chats.jsonl")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    log.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in lines))
    return _ingested_and_clustered([log], tmp_path / "nomodel.duckdb", topics=2)


def _ingested_and_clustered(logs: list[Path], path: Path, *, topics: int) -> str:
    """A DuckDB file (its URL) holding `logs`, clustered into `topics` topics by PCA and
    k-means (no UMAP: the clustering itself is not under test)."""
    db = f"duckdb:///{path}"
    engine = open_database(db)
    config = IngestConfig(progress=False, rejects_path=path.with_suffix(".rejects.jsonl"))
    ingest_paths(logs, engine=engine, config=config)
    cluster_exchanges(
        engine,
        config=ClusterStepConfig(
            embed=EmbedConfig(device="cpu", progress=False),
            topics=ClusterConfig(layout=False),
        ),
        reducer=pca_reducer(5),
        clusterer=kmeans_clusterer(topics),
    )
    engine.dispose()
    return db


def test_score_after_judging_a_replay_of_a_log_that_names_no_model(tmp_path: Path) -> None:
    """A judge's verdicts on a replay of a log that names no model are battles between an
    answer with no model and the replayed model's. `score` put them in the leaderboards and
    failed with a TypeError traceback (sorting None beside model names) after storing the
    new rewards; a leaderboard ranks named experts, so such a battle is left out of it."""
    from ingest.replay import ReplayConfig, replay
    from scoring.judge import JudgeConfig, judge_replay
    from tests.openai_server import OpenAIServer
    from tests.test_replay_judge import prefers_replayed

    db = _clustered_log_without_models(tmp_path)
    engine = open_database(db)
    with OpenAIServer() as server:
        sent = ReplayConfig(model="new-a", base_url=server.base_url, sample=12, progress=False)
        run_id = replay(engine, config=sent).run_id
    with OpenAIServer(responder=prefers_replayed) as judge:
        judged = JudgeConfig(model="judge", base_url=judge.base_url, progress=False)
        assert judge_replay(engine, run_id, config=judged).judged > 0
    engine.dispose()

    scored = convoscope("score", "--mode", "head", db=db, cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    engine = open_database(db)
    reports = load_cluster_reports(engine, latest_run(engine)["id"], level=None)
    engine.dispose()
    assert len(reports) == 3  # two topics and their group
    assert all(r["leaderboard"] == [] for r in reports.values())  # one named expert: no ranks
