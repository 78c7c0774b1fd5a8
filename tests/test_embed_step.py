"""The embed step on a real database with the real default model: cached, idempotent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ingest.embed_step import EmbedConfig, embed_exchanges, exchange_texts
from ingest.pipeline import IngestConfig, ingest_paths
from storage.engine import open_database
from storage.vectors import count_vectors, load_vectors


def _log(path: Path, prompts: list[str]) -> Path:
    with path.open("w") as handle:
        for i, prompt in enumerate(prompts):
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": f"answer {i}"},
            ]
            handle.write(json.dumps({"messages": messages, "model": "m"}) + "\n")
    return path


def test_embed_stores_vectors_once_and_only_for_new_texts(tmp_path: Path, duckdb_url: str) -> None:
    engine = open_database(duckdb_url)
    prompts = ["how do I reset my password", "reset my password please", "best pizza in Rome"]
    config = IngestConfig(progress=False, rejects_path=tmp_path / "r.jsonl")
    ingest_paths([_log(tmp_path / "a.jsonl", [*prompts, prompts[0]])], engine=engine, config=config)

    first = embed_exchanges(engine, config=EmbedConfig(device="cpu", progress=False))
    assert (first.exchanges, first.texts, first.embedded, first.cached) == (4, 3, 3, 0)
    again = embed_exchanges(engine, config=EmbedConfig(device="cpu", progress=False))
    assert (again.embedded, again.cached) == (0, 3)

    ingest_paths([_log(tmp_path / "b.jsonl", ["where is my parcel"])], engine=engine, config=config)
    third = embed_exchanges(engine, config=EmbedConfig(device="cpu", progress=False))
    assert (third.embedded, third.cached) == (1, 3)
    assert count_vectors(engine, first.model) == 4

    items = list(exchange_texts(engine, on="prompt"))
    by_text = {item.text: item.text_hash for item in items}
    vectors = load_vectors(engine, first.model, [by_text[p] for p in prompts])
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2  # the two password prompts are close
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    engine.dispose()
