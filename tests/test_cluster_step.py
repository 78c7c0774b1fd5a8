"""Embed → cluster → rename/tag → more data → assign → re-cluster, through the real CLI.

A small real slice of CLINC150 (12 intents) stands in for a chat log: prompts only, answers
empty (saved inputs). The checks are what a prompt engineer relies on: topics match the
intents, names and tags people gave survive re-clustering, exports carry them.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from sklearn.metrics import normalized_mutual_info_score

from clustering.step import ClusterStepConfig, cluster_exchanges
from ingest.embed import default_model_path
from ingest.embed_step import EmbedConfig
from storage.engine import open_database
from storage.vectors import count_vectors
from tests.test_ingest_pipeline import convoscope_here as convoscope  # many commands

INTENTS = (
    "balance", "bill_due", "book_flight", "calories", "change_language", "cook_time",
    "credit_score", "flip_coin", "lost_luggage", "pto_request", "tell_joke", "weather",
)  # fmt: skip


def _clinc_slice(path: Path, per_intent: tuple[int, int]) -> list[tuple[str, str]]:
    data = json.loads(path.read_text())
    by_intent: dict[str, list[str]] = {}
    for text, intent in data["train"]:
        if intent in INTENTS:
            by_intent.setdefault(intent, []).append(text)
    start, stop = per_intent
    return [(text, intent) for intent in INTENTS for text in by_intent[intent][start:stop]]


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "intent"])
        writer.writerows(rows)
    return path


@pytest.fixture
def clinc(shared_file) -> Path:
    return shared_file("clinc150.json")


def test_topics_match_intents_and_survive_reclustering(clinc: Path, tmp_path: Path) -> None:
    db = f"duckdb:///{tmp_path / 'topics.duckdb'}"
    first = _clinc_slice(clinc, (0, 50))
    log = _write_csv(tmp_path / "first.csv", first)
    ingest = convoscope("ingest", str(log), "--map", "prompt=question", db=db, cwd=tmp_path)
    assert ingest.returncode == 0, ingest.stderr

    result = convoscope("cluster", "--device", "cpu", "--json", db=db, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["rows"] == len(first)
    assert 8 <= summary["clusters"] <= 20
    assert summary["unassigned_share"] <= 0.1

    listing = json.loads(convoscope("clusters", "--json", db=db, cwd=tmp_path).stdout)
    topics = [c for c in listing["clusters"] if c["level"] == 0]
    groups = [c for c in listing["clusters"] if c["level"] == 1]
    assert groups and all(t["parent"] in {g["id"] for g in groups} for t in topics)
    assert all(t["keywords"] and t["name"] for t in topics)

    export = tmp_path / "first.csv.out"
    convoscope("export", "--out", str(export), "--format", "csv", db=db, cwd=tmp_path)
    frame = pd.read_csv(export)
    gold = dict(first)
    frame["intent"] = frame["prompt"].map(gold)
    assigned = frame[frame["cluster_id"].notna()]
    nmi = normalized_mutual_info_score(assigned["intent"], assigned["cluster_id"])
    assert nmi >= 0.75, f"NMI {nmi:.3f} on 12 CLINC intents"

    # A person names and tags the cluster holding most "weather" questions.
    weather = Counter(assigned[assigned["intent"] == "weather"]["cluster_id"]).most_common(1)
    weather_id = weather[0][0]
    renamed = convoscope("rename", weather_id, "Weather questions", db=db, cwd=tmp_path)
    assert renamed.returncode == 0, renamed.stderr
    assert convoscope("tag", weather_id, "smalltalk", db=db, cwd=tmp_path).returncode == 0

    # New data arrives: assigned without a refit, then a full re-clustering.
    second = _clinc_slice(clinc, (50, 65))
    more = _write_csv(tmp_path / "second.csv", second)
    assert (
        convoscope("ingest", str(more), "--map", "prompt=question", db=db, cwd=tmp_path).returncode
        == 0
    )
    assigned_new = json.loads(convoscope("assign", "--json", db=db, cwd=tmp_path).stdout)
    assert assigned_new["assigned"] + assigned_new["unassigned"] == len(second)
    assert assigned_new["assigned"] >= 0.8 * len(second)

    # The refit runs in-process: UMAP compiles for ~30 s in every new process.
    engine = open_database(db)
    config = ClusterStepConfig(embed=EmbedConfig(device="cpu", progress=False))
    again = cluster_exchanges(engine, config=config)
    engine.dispose()
    assert again.rows == len(first) + len(second)
    assert again.events["kept"] >= summary["clusters"] // 2

    out = tmp_path / "second.csv.out"  # a name that names no format: --format says which
    exported = convoscope(
        "export", "--out", str(out), "--format", "jsonl", "--tag", "smalltalk", db=db, cwd=tmp_path
    )
    assert exported.returncode == 0, exported.stderr
    tagged = pd.read_json(out, lines=True)
    tagged["intent"] = tagged["prompt"].map({**gold, **dict(second)})
    assert (tagged["cluster_label"] == "Weather questions").all()
    assert tagged["tags"].map(lambda tags: "smalltalk" in tags).all()  # a list in JSONL
    assert (tagged["intent"] == "weather").mean() >= 0.8


def test_cluster_on_an_empty_database_is_a_clear_error(tmp_path: Path) -> None:
    db = f"duckdb:///{tmp_path / 'empty.duckdb'}"
    result = convoscope("cluster", "--device", "cpu", db=db, cwd=tmp_path)
    assert result.returncode == 2
    assert "ingest" in result.stderr and "Traceback" not in result.stderr


def test_a_clustering_that_finds_no_topic_is_a_clear_error_and_keeps_the_last(
    tmp_path: Path,
) -> None:
    from storage.clusters import latest_run
    from tests.test_ingest_pipeline import write_openai_jsonl

    log = tmp_path / "chat.jsonl"
    write_openai_jsonl(log, 15)
    db = f"duckdb:///{tmp_path / 'none.duckdb'}"
    assert convoscope("ingest", str(log), db=db, cwd=tmp_path).returncode == 0
    kmeans = ("--reducer", "pca", "--clusterer", "kmeans", "--k", "2")
    first = convoscope("cluster", "--device", "cpu", *kmeans, "--json", db=db, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    for flags in (("--min-cluster-size", "100000"), ("--sample-size", "5")):
        result = convoscope(
            "cluster", "--device", "cpu", "--reducer", "pca", *flags, db=db, cwd=tmp_path
        )
        assert result.returncode == 2, result.stderr
        assert "no topic found" in result.stderr and "Traceback" not in result.stderr
    engine = open_database(db)
    assert latest_run(engine)["id"] == json.loads(first.stdout)["run_id"]  # nothing replaced
    engine.dispose()

    zero = convoscope("cluster", "--sample-size", "0", db=db, cwd=tmp_path)
    assert zero.returncode == 2 and "--sample-size" in zero.stderr
    assert "Traceback" not in zero.stderr


def test_no_topic_at_the_least_cluster_size_does_not_advise_lowering_it(tmp_path: Path) -> None:
    """Six near-identical prompts make one dense blob, which HDBSCAN never returns as a topic:
    with --min-cluster-size 2, the least it takes, the advice was still to lower it."""
    log = _write_csv(
        tmp_path / "pasta.csv", [(f"question number {i} about cooking pasta", "") for i in range(6)]
    )
    db = f"duckdb:///{tmp_path / 'least.duckdb'}"
    ingest = convoscope("ingest", str(log), "--map", "prompt=question", db=db, cwd=tmp_path)
    assert ingest.returncode == 0, ingest.stderr
    flags = ("--device", "cpu", "--reducer", "none", "--min-cluster-size", "2")
    result = convoscope("cluster", *flags, db=db, cwd=tmp_path)
    assert result.returncode == 2, result.stdout
    assert "no topic found" in result.stderr
    assert "lower --min-cluster-size" not in result.stderr
    assert "--clusterer kmeans --k 2" in result.stderr
    sampled = convoscope("cluster", *flags, "--sample-size", "5", db=db, cwd=tmp_path)
    assert sampled.returncode == 2, sampled.stdout
    assert sampled.stderr.rstrip().endswith("raise --sample-size"), sampled.stderr
    assert "lower --min-cluster-size" not in sampled.stderr


def test_clusterings_on_different_fields_never_share_an_id(tmp_path: Path) -> None:
    from tests.test_ingest_pipeline import write_openai_jsonl

    log = tmp_path / "chat.jsonl"
    write_openai_jsonl(log, 15)
    db = f"duckdb:///{tmp_path / 'fields.duckdb'}"
    assert convoscope("ingest", str(log), db=db, cwd=tmp_path).returncode == 0
    kmeans = ("--device", "cpu", "--reducer", "pca", "--clusterer", "kmeans", "--k", "2")
    before = convoscope("clusters", "--on", "response", db=db, cwd=tmp_path)
    assert "no clusters on response yet: run `convoscope cluster --on response`" in before.stdout
    listed = {}
    for field in ("prompt", "response"):
        done = convoscope("cluster", "--on", field, *kmeans, db=db, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "0 kept" in done.stdout and "{" not in done.stdout  # a sentence, not a dict
        listing = convoscope("clusters", "--on", field, "--json", db=db, cwd=tmp_path)
        listed[field] = {c["id"] for c in json.loads(listing.stdout)["clusters"]}
    assert listed["prompt"] and listed["response"]
    assert not listed["prompt"] & listed["response"]
    # A name given to a prompt topic stays with it: the response clustering is newer, and the
    # id is still found; no response topic shows the name.
    topic = sorted(i for i in listed["prompt"] if i.startswith("t"))[0]
    renamed = convoscope("rename", topic, "Prompt topic", db=db, cwd=tmp_path)
    assert renamed.returncode == 0, renamed.stderr
    responses = convoscope("clusters", "--on", "response", "--json", db=db, cwd=tmp_path)
    assert "Prompt topic" not in responses.stdout
    assert "Prompt topic" in convoscope("clusters", "--json", db=db, cwd=tmp_path).stdout
    listed_plain = convoscope("clusters", db=db, cwd=tmp_path).stdout  # not scored: says so
    assert "no rewards for this clustering yet: run `convoscope score`" in listed_plain


def test_a_clustering_with_another_embedder_continues_ids_by_members(tmp_path: Path) -> None:
    """`--fast` vectors (256 numbers) and the default model's (384) live in different spaces:
    a re-clustering with the other embedder matches topics by their rows, not centroids."""
    from tests.test_ingest_pipeline import write_openai_jsonl

    log = tmp_path / "chat.jsonl"
    write_openai_jsonl(log, 15)
    db = f"duckdb:///{tmp_path / 'switch.duckdb'}"
    assert convoscope("ingest", str(log), db=db, cwd=tmp_path).returncode == 0
    kmeans = ("--device", "cpu", "--reducer", "pca", "--clusterer", "kmeans", "--k", "2")
    summaries = []
    for embedder in (("--fast",), (), ("--fast",)):
        done = convoscope("cluster", *kmeans, *embedder, "--json", db=db, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        summaries.append(json.loads(done.stdout))
    assert len({s["embedder"] for s in summaries}) == 2
    assert all(s["clusters"] == 2 for s in summaries)


def test_a_tag_on_a_group_selects_its_topics_exchanges(tmp_path: Path) -> None:
    from tests.test_ingest_pipeline import write_openai_jsonl

    log = tmp_path / "chat.jsonl"
    write_openai_jsonl(log, 15)
    db = f"duckdb:///{tmp_path / 'groups.duckdb'}"
    assert convoscope("ingest", str(log), db=db, cwd=tmp_path).returncode == 0
    kmeans = ("--fast", "--reducer", "pca", "--clusterer", "kmeans", "--k", "4")
    assert convoscope("cluster", *kmeans, db=db, cwd=tmp_path).returncode == 0
    listing = json.loads(convoscope("clusters", "--json", db=db, cwd=tmp_path).stdout)
    group = next(c for c in listing["clusters"] if c["level"] == 1)
    assert convoscope("tag", group["id"], "grouped", db=db, cwd=tmp_path).returncode == 0

    by_cluster = convoscope(
        "export", "--out", "g.csv", "--cluster", group["id"], db=db, cwd=tmp_path
    )
    by_tag = convoscope("export", "--out", "t.csv", "--tag", "grouped", db=db, cwd=tmp_path)
    assert by_cluster.returncode == by_tag.returncode == 0, by_tag.stderr
    tagged = pd.read_csv(tmp_path / "t.csv")
    assert sorted(tagged["id"]) == sorted(pd.read_csv(tmp_path / "g.csv")["id"])
    assert tagged["tags"].str.contains("grouped").all()  # the group's tag rides along

    untag = convoscope("tag", group["id"], "groupd", "--remove", db=db, cwd=tmp_path)
    assert untag.returncode == 2
    assert f"cluster {group['id']} has no tag 'groupd' (its tags: grouped)" in untag.stderr


def test_assign_puts_a_new_copy_of_a_clustered_text_in_the_topic_of_its_copies(
    clinc: Path, tmp_path: Path
) -> None:
    """A text asked again after the clustering joins the topic its earlier copies are in, as
    the clustering gives every copy of a text one topic. `assign` took the nearest centroid,
    which can differ from the clusterer's verdict: 7 of these 120 prompts asked again landed
    in another topic than before, or in none."""
    rows = _clinc_slice(clinc, (0, 10))
    db = f"duckdb:///{tmp_path / 'again.duckdb'}"
    first = _write_csv(tmp_path / "first.csv", rows)
    ingest = convoscope("ingest", str(first), "--map", "prompt=question", db=db, cwd=tmp_path)
    assert ingest.returncode == 0, ingest.stderr
    kmeans = ("--device", "cpu", "--reducer", "pca", "--clusterer", "kmeans", "--k", "12")
    assert convoscope("cluster", *kmeans, db=db, cwd=tmp_path).returncode == 0

    again = tmp_path / "again.csv"
    with again.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "answer"])
        writer.writerows((text, "asked again") for text, _ in rows)
    mapping = "prompt=question,response=answer"
    assert convoscope("ingest", str(again), "--map", mapping, db=db, cwd=tmp_path).returncode == 0
    # Another embedder is refused before it embeds anything (it embedded every text first).
    other = tmp_path / "other-minilm"
    shutil.copytree(default_model_path(), other)
    refused = convoscope("assign", "--device", "cpu", "--model", str(other), db=db, cwd=tmp_path)
    assert refused.returncode == 2 and "use the same embedder" in refused.stderr
    engine = open_database(db, read_only=True)
    assert count_vectors(engine, str(other.resolve())) == 0
    engine.dispose()

    assigned = convoscope("assign", "--device", "cpu", "--json", db=db, cwd=tmp_path)
    assert assigned.returncode == 0, assigned.stderr
    assert json.loads(assigned.stdout)["stored"] == len(rows)

    out = tmp_path / "all.csv"
    assert convoscope("export", "--out", str(out), db=db, cwd=tmp_path).returncode == 0
    topics: dict[str, set[str]] = {}
    with out.open(newline="") as handle:
        for row in csv.DictReader(handle):
            topics.setdefault(row["prompt"], set()).add(row["cluster_id"])
    assert len(topics) == len(rows)
    split = {text: ids for text, ids in topics.items() if len(ids) > 1}
    assert not split, f"{len(split)} texts in two topics: {split}"
