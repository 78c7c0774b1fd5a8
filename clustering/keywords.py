"""Automatic tags for clusters: class-based TF-IDF keywords, a short name, representatives.

c-TF-IDF treats all texts of a cluster as one document, so a term scores high when it is
frequent in this cluster and rare across clusters. That gives keywords that tell clusters apart,
which plain frequency (dominated by "how", "my", "can") does not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import CountVectorizer

_TOKEN_PATTERN = r"(?u)\b[^\W\d_][\w'-]*[^\W_]\b"  # words of 2+ chars that start with a letter


def class_tfidf_keywords(
    texts: Sequence[str],
    labels: np.ndarray,
    n_clusters: int,
    *,
    n_keywords: int = 10,
    ngram_range: tuple[int, int] = (1, 2),
    stop_words: str | list[str] | None = "english",
) -> tuple[tuple[str, ...], ...]:
    """Top `n_keywords` terms of each cluster 0..n_clusters-1 (rows labelled -1 are ignored).

    Score (as in BERTopic): tf(t, c) · log(1 + A / f(t)), where tf is the term's share of the
    cluster's words, f(t) its count over all clusters and A the mean word count of a cluster.
    """
    labels = np.asarray(labels)
    keep = np.flatnonzero((labels >= 0) & (labels < n_clusters))
    empty: tuple[tuple[str, ...], ...] = tuple(() for _ in range(n_clusters))
    if keep.size == 0:
        return empty
    vectorizer = CountVectorizer(
        ngram_range=ngram_range,
        stop_words=stop_words,
        token_pattern=_TOKEN_PATTERN,
        min_df=2 if keep.size >= 100 else 1,
        dtype=np.float32,
    )
    try:
        counts = vectorizer.fit_transform([texts[i] for i in keep])
    except ValueError:  # nothing but stop words
        return empty
    membership = sparse.csr_matrix(
        (np.ones(keep.size, dtype=np.float32), (labels[keep], np.arange(keep.size))),
        shape=(n_clusters, keep.size),
    )
    per_class = (membership @ counts).toarray()
    words_per_class = per_class.sum(axis=1, keepdims=True)
    tf = per_class / np.maximum(words_per_class, 1.0)
    mean_words = float(words_per_class.mean())
    idf = np.log1p(mean_words / np.maximum(per_class.sum(axis=0), 1.0))
    scores = tf * idf
    vocab = vectorizer.get_feature_names_out()
    result = []
    for row in scores:
        top = np.argsort(-row, kind="stable")[:n_keywords]
        result.append(tuple(str(vocab[j]) for j in top if row[j] > 0))
    return tuple(result)


def short_name(keywords: Sequence[str], *, max_terms: int = 3, max_chars: int = 40) -> str:
    """A readable name from the keywords, best first, without repeating a word.

    A phrase ranked near the top ("credit score") is kept whole and the single words it contains
    are dropped, so names read "credit score / improve" rather than "credit / score / credit
    score"; phrases further down ("know spell") are too weak to replace their word.
    """
    phrases = [k for k in keywords[: max_terms + 1] if " " in k]
    covered = {w for p in phrases for w in p.split()}
    picked: list[str] = []
    used: set[str] = set()
    for term in keywords:
        if term in covered:  # a single word that a free phrase contains: take the phrase
            free = (p for p in phrases if term in p.split() and not used.intersection(p.split()))
            term = next(free, term)
        words = term.split()
        if used.intersection(words):
            continue
        candidate = " / ".join([*picked, term])
        if picked and len(candidate) > max_chars:
            break
        picked.append(term)
        used.update(words)
        if len(picked) == max_terms:
            break
    return " / ".join(picked) if picked else "unnamed"


def representatives(
    distances: np.ndarray, labels: np.ndarray, n_clusters: int, *, n: int = 5
) -> tuple[tuple[int, ...], ...]:
    """Row indices of the `n` members nearest each cluster's centroid, nearest first."""
    labels = np.asarray(labels)
    order = np.lexsort((distances, labels))
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, np.arange(n_clusters), side="left")
    result = []
    for c, start in enumerate(starts):
        stop = start
        while stop < len(order) and stop - start < n and sorted_labels[stop] == c:
            stop += 1
        result.append(tuple(int(i) for i in order[start:stop]))
    return tuple(result)
