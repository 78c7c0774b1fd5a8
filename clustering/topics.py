"""Topics from embeddings: fit on a sample, assign the rest, tag, group under parents, lay out.

Only a sample (`ClusterConfig.sample_size` rows) goes through the expensive reducer and
clusterer; every other row, and every row ingested later, joins its nearest cluster centroid in
embedding space, in batches. That is what keeps 1M rows feasible on two cores, and it is also
how outliers are handled: a row joins a cluster only when it is no farther from the centroid than
the cluster's own fitted members are (`max_distance_quantile`), so clear noise stays unassigned
instead of polluting a topic.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

from clustering.keywords import class_tfidf_keywords, representatives, short_name
from clustering.stages import Clusterer, Reducer, hdbscan_clusterer, umap_reducer


@dataclass(frozen=True)
class ClusterConfig:
    """Knobs of `fit_topics`; the defaults are chosen to hold across data sets, not for one.

    min_cluster_root: smallest topic = this × √(rows fitted), so there are at most
        2·√n topics: granularity grows with the data, but much slower than the data (a fixed
        share shreds small sets, a fixed count shreds large ones); `min_cluster_size`
        overrides it with a count.
    min_cluster_floor: lower bound on the derived size.
    min_samples: HDBSCAN density smoothing; small keeps fewer rows as noise.
    selection: HDBSCAN cluster selection ('leaf': finest clusters of at least the minimum size).
    sample_size: rows that the reducer and clusterer are fitted on; the rest are assigned.
    max_distance_quantile: a row joins its nearest cluster only when its cosine distance to the
        centroid is within this quantile of the distances of the cluster's fitted members
        (1.0 = no farther than the farthest member).
    reassign_outliers: whether rows the clusterer called noise may join a cluster that way.
    n_parents: number of parent groups; None picks round(sqrt(clusters)), at most 10.
    layout_sample: rows placed on the 2-D map by UMAP; the rest from `n_landmarks` of them.
    """

    min_cluster_root: float = 0.5
    min_cluster_size: int | None = None
    min_cluster_floor: int = 10
    min_samples: int | None = 10
    selection: str = "leaf"
    n_components: int = 5
    n_neighbors: int = 15
    sample_size: int = 50_000
    max_distance_quantile: float = 1.0
    reassign_outliers: bool = True
    n_parents: int | None = None
    n_keywords: int = 10
    n_representatives: int = 5
    keyword_sample: int = 200_000
    layout: bool = True
    layout_sample: int = 10_000
    n_landmarks: int = 2_000
    batch_size: int = 32_768
    seed: int = 42

    def cluster_size_for(self, n_rows: int) -> int:
        """The HDBSCAN minimum cluster size used when fitting on `n_rows` rows."""
        if self.min_cluster_size is not None:
            return self.min_cluster_size
        return max(self.min_cluster_floor, round(self.min_cluster_root * math.sqrt(n_rows)))


@dataclass(frozen=True, eq=False)
class TopicModel:
    """A fitted clustering: per-row results plus what is needed to assign new rows later.

    Clusters are numbered 0..k-1 by size, largest first; -1 = unassigned.
    `distances` are cosine distances to the row's own centroid (the nearest when unassigned).
    """

    labels: np.ndarray  # (n,) int32
    distances: np.ndarray  # (n,) float32
    centroids: np.ndarray  # (k, d) float32, unit length
    radii: np.ndarray  # (k,) float32: farthest distance at which a row may join
    sizes: np.ndarray  # (k,) int64, rows assigned in this fit
    parents: np.ndarray  # (k,) int32: parent group of each cluster
    keywords: tuple[tuple[str, ...], ...]
    names: tuple[str, ...]
    parent_keywords: tuple[tuple[str, ...], ...]
    parent_names: tuple[str, ...]
    representatives: tuple[tuple[int, ...], ...]  # row indices, nearest the centroid first
    layout: np.ndarray | None  # (n, 2) float32 map positions
    landmarks: np.ndarray | None  # (m, d) embeddings with known map positions…
    landmark_xy: np.ndarray | None  # (m, 2) …used to place new rows on the map
    fitted_rows: np.ndarray  # indices of the rows the reducer and clusterer saw
    min_cluster_size: int
    seconds: dict[str, float]  # wall time of each stage: reduce, cluster, assign, tags, layout

    @property
    def n_clusters(self) -> int:
        return len(self.centroids)

    @property
    def unassigned_share(self) -> float:
        return float(np.mean(self.labels < 0)) if len(self.labels) else 0.0


def fit_topics(
    embeddings: np.ndarray,
    texts: Sequence[str],
    *,
    config: ClusterConfig | None = None,
    reducer: Reducer | None = None,
    clusterer: Clusterer | None = None,
    layout_reducer: Reducer | None = None,
) -> TopicModel:
    """Cluster `embeddings` (one row per text) into named topics with parents and a 2-D map.

    `reducer`, `clusterer` and `layout_reducer` replace the UMAP / HDBSCAN / 2-D UMAP defaults
    (any object with the same duck-typed methods, see `clustering.stages`).
    """
    config = config or ClusterConfig()
    if len(texts) != len(embeddings):
        raise ValueError(f"{len(texts)} texts for {len(embeddings)} embeddings")
    unit = unit_rows(embeddings)
    n = len(unit)
    rng = np.random.default_rng(config.seed)
    fitted = (
        np.sort(rng.choice(n, size=config.sample_size, replace=False))
        if n > config.sample_size
        else np.arange(n)
    )
    sample = unit[fitted]
    min_size = config.cluster_size_for(len(fitted))
    # UMAP truncates neighbours to the rows there are, with a warning a user can do nothing
    # about; a small log just has fewer.
    neighbours = max(2, min(config.n_neighbors, len(fitted) - 1))
    # Vectors of fewer dimensions than that (imported ones may be) are reduced to as many.
    dims = min(config.n_components, unit.shape[1])
    reducer = reducer or umap_reducer(dims, n_neighbors=neighbours, seed=config.seed)
    clusterer = clusterer or hdbscan_clusterer(
        min_size, min_samples=config.min_samples, selection=config.selection
    )
    clock = _Clock()
    reduced = np.asarray(reducer.fit_transform(sample), dtype=np.float32)
    clock.lap("reduce")
    clusterer.fit(reduced)
    clock.lap("cluster")
    fitted_labels = _dense_labels(np.asarray(clusterer.labels_))

    centroids = _centroids(sample, fitted_labels)
    member = fitted_labels >= 0
    member_dist = 1.0 - np.einsum("ij,ij->i", sample[member], centroids[fitted_labels[member]])
    radii = _radii(member_dist, fitted_labels[member], len(centroids), config)

    labels, distances = assign(unit, centroids, radii, batch_size=config.batch_size)
    labels[fitted[member]] = fitted_labels[member]  # the clusterer's own verdict stands
    distances[fitted[member]] = member_dist
    if not config.reassign_outliers:
        labels[fitted[~member]] = -1
    _one_topic_per_text(texts, labels, distances, unit, centroids)

    k = len(centroids)
    sizes = np.bincount(labels[labels >= 0], minlength=k).astype(np.int64)
    if k:  # renumber by final size, largest first (ties keep the clusterer's order)
        order = np.argsort(-sizes, kind="stable")
        rank = np.empty(k, dtype=np.int32)
        rank[order] = np.arange(k, dtype=np.int32)
        labels = np.where(labels >= 0, rank[np.maximum(labels, 0)], -1).astype(np.int32)
        k = int(np.count_nonzero(sizes))  # a topic whose rows all went with their copies
        order = order[:k]
        centroids, radii, sizes = centroids[order], radii[order], sizes[order]
    clock.lap("assign")
    parents = parent_groups(centroids, sizes, config.n_parents)
    keywords, parent_keywords = _keywords(texts, labels, parents, rng, config)
    reps = representatives(distances, labels, k, n=config.n_representatives)
    clock.lap("tags")

    layout = landmarks = landmark_xy = None
    if config.layout and len(fitted) >= 3:
        layout, landmarks, landmark_xy = _layout(unit, fitted, reduced, layout_reducer, rng, config)
        clock.lap("layout")
    return TopicModel(
        labels=labels,
        distances=distances,
        centroids=centroids,
        radii=radii,
        sizes=sizes,
        parents=parents,
        keywords=keywords,
        names=tuple(short_name(kw) for kw in keywords),
        parent_keywords=parent_keywords,
        parent_names=tuple(short_name(kw) for kw in parent_keywords),
        representatives=reps,
        layout=layout,
        landmarks=landmarks,
        landmark_xy=landmark_xy,
        fitted_rows=fitted,
        min_cluster_size=min_size,
        seconds=clock.laps,
    )


def _one_topic_per_text(
    texts: Sequence[str],
    labels: np.ndarray,
    distances: np.ndarray,
    unit: np.ndarray,
    centroids: np.ndarray,
) -> None:
    """Give every copy of a text the topic most of its copies got (a topic before none on a
    tie), in place. Copies were split: the clusterer's verdict on a fitted copy and the
    nearest centroid for the others can differ, and UMAP places equal rows apart; a battle's
    two answers to one prompt then fell in two topics."""
    first: dict[str, int] = {}
    copies: dict[int, list[int]] = {}
    for i, text in enumerate(texts):
        j = first.setdefault(text, i)
        if j != i:
            copies.setdefault(j, [j]).append(i)
    for group in copies.values():
        votes = Counter(labels[group].tolist())
        label = max(votes, key=lambda c: (votes[c], c >= 0, -c))
        labels[group] = label
        if label >= 0:  # the distance to that topic (equal texts, equal vectors)
            distances[group] = 1.0 - float(unit[group[0]] @ centroids[label])


def _keywords(
    texts: Sequence[str],
    labels: np.ndarray,
    parents: np.ndarray,
    rng: np.random.Generator,
    config: ClusterConfig,
) -> tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]]:
    """c-TF-IDF keywords of clusters and of parents, from at most `keyword_sample` rows."""
    n, k = len(labels), len(parents)
    rows = (
        np.sort(rng.choice(n, size=config.keyword_sample, replace=False))
        if n > config.keyword_sample
        else np.arange(n)
    )
    sample_texts = [texts[i] for i in rows]
    sample_labels = labels[rows]
    keywords = class_tfidf_keywords(sample_texts, sample_labels, k, n_keywords=config.n_keywords)
    if k == 0:
        return keywords, ()
    parent_labels = np.where(sample_labels >= 0, parents[np.maximum(sample_labels, 0)], -1)
    parent_keywords = class_tfidf_keywords(
        sample_texts, parent_labels, int(parents.max()) + 1, n_keywords=config.n_keywords
    )
    return keywords, parent_keywords


def assign(
    embeddings: np.ndarray,
    centroids: np.ndarray,
    radii: np.ndarray | None = None,
    *,
    max_distance: float | None = None,
    batch_size: int = 32_768,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row, -1 where it is farther than the cluster's radius.

    `max_distance` (cosine distance) additionally caps every cluster. Runs in batches, so memory
    stays at batch_size × clusters. New rows are assigned this way without a refit:
    `assign(new, model.centroids, model.radii)`.
    """
    unit = unit_rows(embeddings)
    n, k = len(unit), len(centroids)
    labels = np.full(n, -1, dtype=np.int32)
    distances = np.full(n, np.inf, dtype=np.float32)
    if k == 0:
        return labels, distances
    centroids = np.asarray(centroids, dtype=np.float32)
    limit = np.full(k, np.inf, dtype=np.float32) if radii is None else np.asarray(radii)
    if max_distance is not None:
        limit = np.minimum(limit, max_distance)
    for start in range(0, n, batch_size):
        sims = unit[start : start + batch_size] @ centroids.T
        best = sims.argmax(axis=1)
        dist = 1.0 - sims[np.arange(len(best)), best]
        distances[start : start + len(best)] = dist
        labels[start : start + len(best)] = np.where(dist <= limit[best], best, -1)
    return labels, distances


def place(embeddings: np.ndarray, model: TopicModel, *, k: int = 5) -> np.ndarray:
    """Map positions for rows the layout never saw: distance-weighted mean of nearest landmarks."""
    if model.landmarks is None or model.landmark_xy is None:
        raise ValueError("this model was fitted without a layout")
    return _interpolate(unit_rows(embeddings), model.landmarks, model.landmark_xy, k=k)


def parent_groups(centroids: np.ndarray, sizes: np.ndarray, n_parents: int | None) -> np.ndarray:
    """Group clusters under parents by Ward linkage of their centroids; parents largest first."""
    k = len(centroids)
    if k == 0:
        return np.zeros(0, dtype=np.int32)
    wanted = n_parents if n_parents is not None else min(10, max(1, round(math.sqrt(k))))
    wanted = min(wanted, k)
    if wanted <= 1 or k < 2:
        return np.zeros(k, dtype=np.int32)
    groups = fcluster(linkage(centroids, method="ward"), t=wanted, criterion="maxclust") - 1
    totals = np.bincount(groups, weights=sizes.astype(np.float64))
    order = np.argsort(-totals, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[groups].astype(np.int32)


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """float32 rows of unit length; the input itself when it already is (no 1M-row copy)."""
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D, got shape {x.shape}")
    probe = x[:: max(1, len(x) // 1000)]
    if len(probe) and np.allclose(np.linalg.norm(probe, axis=1), 1.0, atol=1e-3):
        return x
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class _Clock:
    """Wall time per stage, so callers can report where a run spent its time."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = round(now - self._last, 3)
        self._last = now


def _dense_labels(raw: np.ndarray) -> np.ndarray:
    """Labels 0..k-1 in the clusterer's order, -1 kept for noise (any negative label)."""
    ids, dense = np.unique(np.where(raw >= 0, raw, -1), return_inverse=True)
    shift = 1 if ids[0] < 0 else 0
    return np.where(raw >= 0, dense - shift, -1).astype(np.int32)


def _centroids(unit: np.ndarray, labels: np.ndarray) -> np.ndarray:
    k = int(labels.max()) + 1 if len(labels) else 0
    sums = np.zeros((k, unit.shape[1]), dtype=np.float64)
    member = labels >= 0
    np.add.at(sums, labels[member], unit[member])
    return unit_rows(sums.astype(np.float32)) if k else sums.astype(np.float32)


def _radii(dist: np.ndarray, labels: np.ndarray, k: int, config: ClusterConfig) -> np.ndarray:
    radii = np.zeros(k, dtype=np.float32)
    for c in range(k):
        radii[c] = np.quantile(dist[labels == c], config.max_distance_quantile)
    return radii


def _layout(
    unit: np.ndarray,
    fitted: np.ndarray,
    reduced: np.ndarray,
    layout_reducer: Reducer | None,
    rng: np.random.Generator,
    config: ClusterConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2-D map fitted on at most `layout_sample` reduced rows (cheap, and shows what the
    clusterer saw); a map needs far fewer exactly placed points than the clustering does.

    Every other row is placed from landmarks, a random subset of the mapped rows.
    """
    if layout_reducer is None:
        import umap

        layout_reducer = umap.UMAP(
            n_components=2,
            n_neighbors=max(2, min(config.n_neighbors, len(fitted) - 1)),
            min_dist=0.1,
            init="pca",
            random_state=config.seed,
            n_jobs=1,
        )
    mapped = np.sort(
        rng.choice(len(fitted), size=min(config.layout_sample, len(fitted)), replace=False)
    )
    xy_mapped = np.asarray(layout_reducer.fit_transform(reduced[mapped]), dtype=np.float32)
    pick = np.sort(
        rng.choice(len(mapped), size=min(config.n_landmarks, len(mapped)), replace=False)
    )
    landmarks, landmark_xy = unit[fitted[mapped[pick]]].copy(), xy_mapped[pick]
    layout = np.empty((len(unit), 2), dtype=np.float32)
    rest = np.setdiff1d(np.arange(len(unit)), fitted[mapped], assume_unique=True)
    for start in range(0, len(rest), config.batch_size):
        rows = rest[start : start + config.batch_size]
        layout[rows] = _interpolate(unit[rows], landmarks, landmark_xy)
    layout[fitted[mapped]] = xy_mapped
    return layout, landmarks, landmark_xy


def _interpolate(
    unit: np.ndarray, landmarks: np.ndarray, xy: np.ndarray, *, k: int = 5
) -> np.ndarray:
    k = min(k, len(landmarks))
    sims = unit @ landmarks.T
    near = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    weights = np.maximum(np.take_along_axis(sims, near, axis=1), 0.0) + 1e-6
    weights /= weights.sum(axis=1, keepdims=True)
    return np.einsum("nk,nkd->nd", weights, xy[near]).astype(np.float32)
