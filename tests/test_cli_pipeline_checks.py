"""The cluster → score → route commands on a small scored database: what they report after
`--fast`, a re-clustering, a blank name or prompt, and an `assign` since the scores; and
cluster options the stored rows cannot satisfy, refused before any embedding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.cli import main
from clustering.stages import kmeans_clusterer, pca_reducer
from clustering.step import ClusterStepConfig, cluster_exchanges
from clustering.topics import ClusterConfig
from ingest.embed_step import EmbedConfig
from ingest.pipeline import IngestConfig, ingest_paths
from storage.clusters import latest_run
from storage.engine import open_database
from storage.models import latest_model, save_model
from tests.test_cli_errors import cli
from tests.test_ingest_pipeline import write_openai_jsonl

FAST = EmbedConfig(fast=True, progress=False)


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each command runs in the test's own folder: a rejects file lands there."""
    monkeypatch.chdir(tmp_path)


def _recluster(db: str) -> str:
    """A new clustering run on the stored fast vectors (no 2-D map: seconds); its id."""
    engine = open_database(db)
    try:
        config = ClusterStepConfig(embed=FAST, topics=ClusterConfig(layout=False))
        return cluster_exchanges(
            engine, config=config, reducer=pca_reducer(5), clusterer=kmeans_clusterer(3)
        ).run_id
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def scored_fast(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 chats answered by 3 experts (120 exchanges), clustered into 3 topics and scored,
    both on `--fast` vectors: the win predictor's encoder is the fast one."""
    folder = tmp_path_factory.mktemp("scored-fast")
    log = folder / "chat.jsonl"
    write_openai_jsonl(log, 60)
    db = folder / "fast.duckdb"
    engine = open_database(str(db))
    ingest_paths([log], engine=engine, config=IngestConfig(rejects_path=folder / "r.jsonl"))
    engine.dispose()
    _recluster(str(db))
    assert main(["--db", str(db), "score", "--fast"]) == 0
    return db


@pytest.fixture
def fast_db(scored_fast: Path, tmp_path: Path) -> str:
    """A copy of the scored database, for a test that changes it."""
    copy = tmp_path / scored_fast.name
    shutil.copy(scored_fast, copy)
    return str(copy)


def test_route_embeds_with_the_fast_encoder_the_predictor_was_trained_on(
    fast_db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = cli(capsys, "--db", fast_db, "route", "What is 5 + 5?", "--json")
    assert code == 0, err
    (route,) = json.loads(out)["routes"]
    assert {e["model"] for e in route["experts"]} == {"expert-0", "expert-1", "expert-2"}

    code, out, err = cli(capsys, "--db", fast_db, "route", "   ")  # as `--file` refuses it
    assert code == 2 and out == "" and "the prompt to route is empty" in err

    engine = open_database(fast_db)  # a predictor trained on an embedder not on this machine
    stored = latest_model(engine, "win_predictor")
    config = {**stored["config"], "encoder": "no-such-model+model2vec-128"}
    save_model(engine, "win_predictor", files=stored["files"], config=config, metrics={})
    engine.dispose()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = cli(capsys, "--db", fast_db, "route", "What is 5 + 5?")
    assert code == 2 and out == ""
    assert "cannot load 'no-such-model+model2vec-128', the embedder the win predictor" in err
    assert "run `convoscope score`" in err and len(err.strip().splitlines()) == 1


def test_an_exported_routing_table_of_an_older_clustering_is_named(
    fast_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "new" / "folder" / "routing.json"  # created, as `export --out` does
    code, said, err = cli(capsys, "--db", fast_db, "route", "--export", str(out), "--json")
    assert code == 0 and "warning" not in err, err
    engine = open_database(fast_db)
    scored_run = latest_run(engine)["id"]
    engine.dispose()
    summary = json.loads(said)
    assert summary["clustering_run_id"] == scored_run and summary["newer_clustering_run_id"] is None
    assert json.loads(out.read_text())["clustering_run_id"] == scored_run

    newer = _recluster(fast_db)
    code, said, err = cli(capsys, "--db", fast_db, "route", "--export", str(out), "--json")
    assert code == 0
    assert f"clusters are those of clustering run {scored_run}" in err
    assert f"clustered again since (run {newer})" in err and "run `convoscope score`" in err
    assert json.loads(said)["newer_clustering_run_id"] == newer

    code, said, err = cli(capsys, "--db", fast_db, "route", "--export", str(out / "x.json"))
    assert code == 2 and said == ""
    assert f"--export {out / 'x.json'} cannot be created: {out} is a file, not a folder" in err


def test_a_blank_name_reports_the_automatic_name_it_restores(
    fast_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(capsys, "--db", fast_db, "clusters", "--level", "0", "--json")
    topic = json.loads(out)["clusters"][0]
    cluster_id, auto = topic["id"], topic["auto_name"]

    code, out, err = cli(capsys, "--db", fast_db, "rename", cluster_id, "  Sums  ", "--json")
    assert code == 0 and json.loads(out)["name"] == "Sums", err
    # One line of printable text: a line break split the `clusters` table, a bidi override
    # reordered what followed it.
    code, out, err = cli(
        capsys, "--db", fast_db, "rename", cluster_id, "Two\nlines\t\u202eand more", "--json"
    )
    assert code == 0 and json.loads(out)["name"] == "Two lines and more", err
    code, out, err = cli(capsys, "--db", fast_db, "rename", cluster_id, "   ", "--json")
    assert code == 0, err
    assert json.loads(out) == {"cluster_id": cluster_id, "name": None, "auto_name": auto}
    code, out, _ = cli(capsys, "--db", fast_db, "rename", cluster_id, "   ")
    assert out.strip() == f"cluster {cluster_id} has its automatic name again ({auto!r})"
    code, out, _ = cli(capsys, "--db", fast_db, "clusters", "--json")
    listed = {c["id"]: c["name"] for c in json.loads(out)["clusters"]}
    assert listed[cluster_id] == auto


def test_battles_with_equal_rewards_are_ties_and_no_decided_battle_is_said(
    scored_fast: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    battle = {"prompt": "What is 2 + 2?", "response_a": "4.", "response_b": "4."}
    battles = tmp_path / "battles.jsonl"
    battles.write_text(json.dumps({**battle, "winner": "tie"}) + "\n")
    code, out, err = cli(
        capsys, "--db", str(scored_fast), "reward", "--file", str(battles), "--json"
    )
    assert code == 0, err
    (scored,) = json.loads(out)["battles"]
    assert scored["reward_a"] == scored["reward_b"] and scored["preferred"] == "tie"

    code, out, err = cli(capsys, "--db", str(scored_fast), "reward", "--file", str(battles))
    assert code == 0, err
    assert out.splitlines()[0].endswith("→ tie (judge: tie)")
    assert "no battle the judge decided (1 tie): no agreement to measure" in out
    assert "agreement with the judge" not in out and "ties left out" not in out


def test_label_thresholds_and_rating_scale_reach_the_labels(
    fast_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """K, N and the rating scale were fixed: a chat of two questions never had a good answer."""
    fast = ("score", "--fast", "--mode", "head", "--json")
    code, out, err = cli(capsys, "--db", fast_db, *fast)
    assert code == 0, err
    assert json.loads(out)["labels"]["length"]["good"] == 0  # one turn after: not 3
    code, out, err = cli(capsys, "--db", fast_db, *fast, "--continued-at-least", "1")
    assert code == 0, err
    assert json.loads(out)["labels"]["length"]["good"] == 60  # each chat's first answer
    wrong = ("--ended-within", "2", "--continued-at-least", "1")
    code, out, err = cli(capsys, "--db", fast_db, "score", *wrong)
    assert code == 2 and "--continued-at-least 1 is below --ended-within 2" in err
    code, _, err = cli(capsys, "--db", fast_db, "score", "--rating-scale", "5:1")
    assert code == 2 and "argument --rating-scale: MIN must be below MAX" in err


def test_clusters_show_the_size_their_scores_are_over(
    fast_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After `assign` and `score reward apply` a report covers exchanges the clustering never
    counted: the listing showed the clustering's size beside figures over more rows."""
    more = tmp_path / "more.jsonl"
    write_openai_jsonl(more, 80)  # the 60 chats stored, and 20 new ones (40 exchanges)
    for command in (["ingest", str(more)], ["assign", "--fast"], ["score", "reward", "apply"]):
        code, _, err = cli(capsys, "--db", fast_db, *command)
        assert code == 0, err
    code, out, err = cli(capsys, "--db", fast_db, "clusters", "--level", "0", "--json")
    assert code == 0, err
    topics = json.loads(out)["clusters"]
    assert sum(t["size"] for t in topics) == 120 < sum(t["scored_n"] for t in topics) <= 160
    assert all(t["scored_n"] >= t["size"] for t in topics)
    assert sum(t["scored_share"] for t in topics) == pytest.approx(1.0)

    code, out, _ = cli(capsys, "--db", fast_db, "clusters", "--level", "0")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line[:1] == "t"}
    assert {i: int(rows[t["id"]][1]) for i, t in enumerate(topics)} == {
        i: t["scored_n"] for i, t in enumerate(topics)
    }
    assert "size, share: the exchanges the latest scores cover" in out


@pytest.fixture
def tiny_db(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """8 exchanges, ingested and not embedded."""
    write_openai_jsonl(tmp_path / "tiny.jsonl", 4)
    db = str(tmp_path / "tiny.duckdb")
    assert cli(capsys, "--db", db, "ingest", "tiny.jsonl")[0] == 0
    return db


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (
            ["--sample-size", "3"],
            "--reducer umap (it reduces to 5 dimensions) needs at least 5 rows to fit, and "
            "--sample-size 3 leaves 3 of the 8 stored: raise --sample-size to 5 or more",
        ),
        (
            ["--reducer", "none", "--sample-size", "1"],
            "clustering needs at least 2 rows to fit, and --sample-size 1 leaves 1 of the 8",
        ),
        (
            ["--clusterer", "kmeans", "--k", "50"],
            "--k 50 (a row per cluster) needs at least 50 rows to fit, and only 8 exchanges "
            "are stored: lower --k (8 at most)",
        ),
        (
            ["--reducer", "pca", "--clusterer", "kmeans", "--k", "6", "--sample-size", "5"],
            "--k 6 (a row per cluster) needs at least 6 rows to fit, and --sample-size 5",
        ),
    ],
)
def test_cluster_options_the_rows_cannot_satisfy_are_refused_before_embedding(
    tiny_db: str, capsys: pytest.CaptureFixture[str], options: list[str], said: str
) -> None:
    code, out, err = cli(capsys, "--db", tiny_db, "cluster", "--fast", *options)
    assert code == 2 and out == "" and f"error: {said}" in err
    code, out, err = cli(capsys, "--db", tiny_db, "embed", "--fast", "--json")
    assert code == 0 and json.loads(out)["embedded"] == 8, err  # nothing was embedded before


def test_run_names_the_option_once_the_rows_are_ingested(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_openai_jsonl(tmp_path / "tiny.jsonl", 4)
    db = str(tmp_path / "run.duckdb")
    args = (
        "run",
        "tiny.jsonl",
        "--fast",
        "--reducer",
        "none",
        "--clusterer",
        "kmeans",
        "--k",
        "50",
    )
    code, _, err = cli(capsys, "--db", db, *args, "--min-cluster-size", "5")
    assert code == 2
    assert "warning: --min-cluster-size is ignored with --clusterer kmeans" in err
    assert "error: --k 50 (a row per cluster) needs at least 50 rows to fit, and only 8" in err


def test_each_held_out_figure_carries_its_own_caveat() -> None:
    """The labels' caveat was printed after the last figure, the battle accuracy."""
    from app.commands import describe

    def line(labels: int, battles: int) -> str:
        metrics = {"held_out_exchanges": 300, "engagement_auc": 0.35, "held_out_labels": labels}
        metrics |= {"battle_pairwise_accuracy": 0.7, "held_out_battles": battles}
        result = {"exchanges": 300, "reward_model": "m", "mode": "head", "reward_metrics": metrics}
        return describe("score", result)

    assert line(20, 500).endswith(
        "(head; engagement_auc 0.350 on only 20 held-out labels: too few to trust; "
        "battle_pairwise_accuracy 0.700)"
    )
    assert line(500, 13).endswith(
        "(head; engagement_auc 0.350; battle_pairwise_accuracy 0.700 on only 13 held-out "
        "battles: too few to trust)"
    )
