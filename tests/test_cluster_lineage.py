"""Topic lineage across stored re-clusterings: a small topic absorbed whole into a larger one
is merged into it, and one carved out of a larger one is split from it, not "gone" and "new".

Real runs of the clustering step on a real DuckDB file with real embeddings; the partition
of each run is chosen by a clusterer stage that labels the rows as the test says (any object
with `fit` and `labels_` is a clusterer, clustering/stages.py), so the sizes that decide the
lineage are exact."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from clustering.stages import PassThrough
from clustering.step import ClusterStepConfig, cluster_exchanges
from clustering.topics import ClusterConfig
from ingest.embed_step import EmbedConfig, exchange_texts
from storage.clusters import latest_run, load_assignments
from storage.engine import open_database
from tests.test_ingest_pipeline import convoscope_here as convoscope

TEMPLATES = {  # topic → (rows, prompt); far apart, so no centroid continues another's id
    "router": (10, "How do I reset the admin password of my wifi router, attempt {i}?"),
    "lentils": (50, "Give me a vegan dinner recipe with red lentils and rice, number {i}"),
    "haiku": (20, "Write a haiku about falling autumn leaves, version {i}"),
    "physics": (50, "Explain quantum entanglement to a first-year physics student, part {i}"),
}
CONFIG = ClusterStepConfig(
    embed=EmbedConfig(device="cpu", progress=False),
    topics=ClusterConfig(layout=False, reassign_outliers=False),  # noise stays noise
)


class GivenPartition:
    """A clusterer stage that labels the fitted rows (every exchange, in the order the step
    reads them) with the partition the test gives, -1 for noise."""

    def __init__(self, labels: list[int]) -> None:
        self.given = np.asarray(labels)

    def fit(self, X: np.ndarray, /) -> GivenPartition:
        assert len(X) == len(self.given)
        self.labels_ = self.given
        return self


def _ingested(tmp_path: Path) -> tuple[str, list[str]]:
    """The database, and each exchange's topic in the order the clustering step reads them."""
    log = tmp_path / "prompts.csv"
    with log.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question"])
        for n, template in TEMPLATES.values():
            writer.writerows([template.format(i=i)] for i in range(n))
    db = f"duckdb:///{tmp_path / 'lineage.duckdb'}"
    done = convoscope("ingest", str(log), "--map", "prompt=question", db=db, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    engine = open_database(db)
    topic_of = {t.format(i=i): name for name, (n, t) in TEMPLATES.items() for i in range(n)}
    order = [topic_of[item.text] for item in exchange_texts(engine, on="prompt")]
    engine.dispose()
    return db, order


def _cluster(db: str, labels: list[int]) -> tuple[list[str | None], list[dict]]:
    """A stored run with the given partition: each row's cluster id, and the run's events."""
    engine = open_database(db)
    try:
        cluster_exchanges(
            engine, config=CONFIG, reducer=PassThrough(), clusterer=GivenPartition(labels)
        )
        run = latest_run(engine)
        assigned = load_assignments(engine, run["id"])
        ordered = [item.exchange_id for item in exchange_texts(engine, on="prompt")]
    finally:
        engine.dispose()
    return [assigned[i] for i in ordered], json.loads(run["events"])["topics"]


def _ids(rows: list[str | None], order: list[str], topic: str) -> set[str | None]:
    return {cluster for cluster, t in zip(rows, order, strict=True) if t == topic}


def test_absorbed_topics_are_merged_and_carved_ones_split_in_stored_runs(tmp_path: Path) -> None:
    db, order = _ingested(tmp_path)
    first = {"router": 0, "lentils": 1, "haiku": 2, "physics": -1}
    base, _ = _cluster(db, [first[t] for t in order])
    (router,), (lentils,), (haiku,) = (_ids(base, order, t) for t in ("router", "lentils", "haiku"))

    # The router topic joins the lentils one, 6x its size (Jaccard 10/60, a share of 1/6: too
    # small to continue an id or to be a merge's part); the haiku topic joins the rows that
    # were noise, a fresh topic (Jaccard 20/70 = 0.29).
    second = {"router": 0, "lentils": 0, "haiku": 1, "physics": 1}
    absorbed, events = _cluster(db, [second[t] for t in order])
    assert _ids(absorbed, order, "lentils") == {lentils}  # the larger keeps its id
    (fresh,) = _ids(absorbed, order, "haiku")
    assert fresh not in (router, lentils, haiku)  # ids continue as before: Jaccard >= 0.3
    assert {"kind": "merged", "old": [lentils, router], "new": [lentils]} in events
    assert {"kind": "merged", "old": [haiku], "new": [fresh]} in events
    assert not [e for e in events if e["kind"] in ("gone", "new")], events

    # Eight lentil rows leave as a topic of their own: 8 of the 60 rows (Jaccard 0.13, under
    # the share a split's part takes), every one of them from the lentils topic.
    third = [0 if t in ("router", "lentils") else 1 for t in order]
    carved_rows = [i for i, t in enumerate(order) if t == "lentils"][:8]
    for i in carved_rows:
        third[i] = 2
    carved, events = _cluster(db, third)
    (part,) = {carved[i] for i in carved_rows}
    assert part not in (router, lentils, haiku, fresh)
    assert _ids(carved, order, "router") == {lentils}
    assert {"kind": "split", "old": [lentils], "new": [lentils, part]} in events
    assert {"kind": "kept", "old": [fresh], "new": [fresh]} in events
    assert not [e for e in events if e["kind"] in ("gone", "new")], events
