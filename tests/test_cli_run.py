"""`convoscope run PATH...`: every step from one command, and a re-run redoes only what is new."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_ingest_pipeline import convoscope_here as convoscope  # in-process: faster
from tests.test_ingest_pipeline import write_openai_jsonl

FAST_TOPICS = ("--reducer", "pca", "--clusterer", "kmeans", "--k", "3")


def test_run_ingests_embeds_clusters_and_scores_then_reruns_only_what_is_new(
    tmp_path: Path,
) -> None:
    log = tmp_path / "chat.jsonl"
    write_openai_jsonl(log, 60)
    db = f"duckdb:///{tmp_path / 'run.duckdb'}"
    first = convoscope("run", str(log), *FAST_TOPICS, "--json", db=db, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert result["ingest"]["stored"] == 120
    assert (result["embed"]["embedded"], result["embed"]["cached"]) == (120, 0)
    assert result["cluster"]["clusters"] == 3
    assert result["score"]["exchanges"] == 120 and result["score"]["clusters"] == 3
    assert result["stored_in_db"]["exchanges"] == 120

    again = convoscope("run", str(log), *FAST_TOPICS, "--no-score", db=db, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "stored 0, 120 already stored" in again.stdout
    assert "embedded 0" in again.stdout and "120 cached" in again.stdout

    missing = convoscope("run", str(tmp_path / "nope.jsonl"), db=db, cwd=tmp_path)
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_run_scores_with_the_embedder_it_was_given(tmp_path: Path) -> None:
    """`run --fast` embedded and clustered with the fast encoder, then its score step embedded
    every prompt again with the full MiniLM and trained the win predictor on that: the slow
    embedding --fast was given to skip, and a routing table whose encoder was not the one asked
    for. The score step reads the prompts with the run's embedder, as `score --fast` does."""
    log = tmp_path / "chat.jsonl"
    write_openai_jsonl(log, 60)
    db = f"duckdb:///{tmp_path / 'run.duckdb'}"
    ran = convoscope("run", str(log), "--fast", *FAST_TOPICS, "--json", db=db, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["embed"]["model"] == "all-MiniLM-L6-v2+model2vec-256"
    out = tmp_path / "rt.json"
    exported = convoscope("route", "--export", str(out), "--json", db=db, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert json.loads(out.read_text())["encoder"]["name"] == "all-MiniLM-L6-v2+model2vec-256"
    assert json.loads(exported.stdout)["encoder_folder"] == str(tmp_path / "rt-encoder")
