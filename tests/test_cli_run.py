"""`convoscope run PATH...`: every step from one command, and a re-run redoes only what is new."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_ingest_pipeline import convoscope, write_openai_jsonl

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
