"""Swappable reduction and clustering stages.

Callers only rely on duck-typed methods, so any object with the same shape plugs in (BERTopic
style): `umap.UMAP`, `sklearn.decomposition.PCA` and `PassThrough` are all reducers;
`hdbscan.HDBSCAN` and `sklearn.cluster.KMeans` are both clusterers. The factories below build the
defaults with the settings this project chose, and say why.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Reducer(Protocol):
    """Maps embeddings to fewer dimensions; `fit_transform` on the fitting sample."""

    def fit_transform(self, X: np.ndarray, /) -> np.ndarray: ...


@runtime_checkable
class Clusterer(Protocol):
    """Groups reduced points; after `fit`, `labels_` holds one label a row, -1 for noise."""

    labels_: np.ndarray

    def fit(self, X: np.ndarray, /) -> Any: ...


class PassThrough:
    """A reducer that keeps the input as is, to skip reduction without changing callers."""

    def fit_transform(self, X: np.ndarray, /) -> np.ndarray:
        return np.asarray(X)

    def transform(self, X: np.ndarray, /) -> np.ndarray:
        return np.asarray(X)


def umap_reducer(n_components: int = 5, *, n_neighbors: int = 15, seed: int | None = 42) -> Reducer:
    """UMAP with cosine input metric and min_dist 0: tight, dense blobs are what HDBSCAN needs.

    PCA initialisation: the spectral default spends most of a fit in an eigensolver that often
    fails to converge on real embeddings, for no gain in the clusters found. A seed makes runs
    repeatable (topics that move between identical runs are a known pain) at
    the cost of UMAP's multi-threading; pass `seed=None` to trade repeatability for speed.
    """
    import umap

    return umap.UMAP(
        n_components=n_components,
        n_neighbors=n_neighbors,
        min_dist=0.0,
        metric="cosine",
        init="pca",
        random_state=seed,
        n_jobs=1 if seed is not None else -1,
        low_memory=True,
    )


def pca_reducer(n_components: int = 50, *, seed: int | None = 42) -> Reducer:
    """Linear reduction: fast and deterministic, a fallback when UMAP is too slow."""
    return _AtMostPCA(n_components, seed)


class _AtMostPCA:
    """PCA to `n_components` dimensions, or to fewer when the rows or the vectors' own
    dimensions are fewer (a small log, imported vectors): PCA refuses more, and a reduction
    to what is there is no reduction to refuse."""

    def __init__(self, n_components: int, seed: int | None) -> None:
        self.n_components, self.seed = n_components, seed

    def fit_transform(self, X: np.ndarray, /) -> np.ndarray:
        from sklearn.decomposition import PCA

        n_components = min(self.n_components, *np.shape(X))
        self.pca = PCA(n_components=n_components, random_state=self.seed)
        return self.pca.fit_transform(X)

    def transform(self, X: np.ndarray, /) -> np.ndarray:
        return self.pca.transform(X)


def hdbscan_clusterer(
    min_cluster_size: int, *, min_samples: int | None = 10, selection: str = "leaf"
) -> Clusterer:
    """HDBSCAN with leaf selection.

    'eom' picks the most persistent clusters, which on real logs often means a few huge
    parents swallowing most rows; 'leaf' picks the finest clusters that still hold
    `min_cluster_size` rows, so granularity is set by one explicit knob and the coarse view is
    left to the parent level. A small `min_samples` (density smoothing) keeps fewer rows as noise
    than the default of `min_samples = min_cluster_size`.
    """
    import hdbscan

    return hdbscan.HDBSCAN(
        min_cluster_size=min_cluster_size,
        min_samples=None if min_samples is None else min(min_samples, min_cluster_size),
        cluster_selection_method=selection,
        core_dist_n_jobs=1,
    )


def kmeans_clusterer(n_clusters: int, *, seed: int | None = 42) -> Clusterer:
    """k-means: every row gets a cluster, but you must choose how many."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=n_clusters, n_init=3, random_state=seed)
