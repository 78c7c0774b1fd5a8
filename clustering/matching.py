"""Stable cluster ids across re-clustering.

A re-run numbers its clusters from scratch; people, though, have named and tagged the old ones.
`match_clusters` gives each new cluster the id of the old cluster it continues, so names and tags
carry over, and records what changed: clusters kept, split, merged, new or gone.

Matching uses member overlap first (rows present in both runs: the strongest evidence), then,
for clusters still unmatched, centroid similarity (a cluster whose old rows were dropped, or
one fitted on entirely new rows, can still continue an old topic). Each step is a one-to-one
assignment (Hungarian), so an id is never given to two clusters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment

UNASSIGNED = -1
EventKind = Literal["kept", "split", "merged", "new", "gone"]


@dataclass(frozen=True)
class ClusterEvent:
    """What happened to stable ids: `old` ids before, `new` ids after (both stable ids)."""

    kind: EventKind
    old: tuple[int, ...]
    new: tuple[int, ...]


@dataclass(frozen=True)
class ClusterMatch:
    """`ids[new_label]` is the stable id of each new cluster; `events` says what changed."""

    ids: dict[int, int]
    events: tuple[ClusterEvent, ...]


def match_clusters(
    old_centroids: Mapping[int, np.ndarray],
    old_members: Mapping[int, AbstractSet[Hashable]],
    new_centroids: Mapping[int, np.ndarray],
    new_members: Mapping[int, AbstractSet[Hashable]],
    *,
    min_jaccard: float = 0.3,
    min_similarity: float = 0.9,
    part_share: float = 0.2,
    min_containment: float = 0.5,
    next_id: int | None = None,
    compare_centroids: bool = True,
) -> ClusterMatch:
    """Match new clusters (keyed by label) to old ones (keyed by stable id).

    Members are row ids (any hashable: exchange ids, content hashes). Pass the rows a run left
    unassigned under key -1 so that a cluster whose rows mostly became noise is not continued
    by the few that did not.

    min_jaccard: least overlap (Jaccard over rows present in both runs) to continue an id.
    min_similarity: least centroid cosine similarity to continue an id without shared rows.
    part_share: a split (merge) needs at least two parts that each hold this share of the old
        (new) cluster while coming mostly (over half) from it (going mostly into it).
    min_containment: an old cluster no id continues, with at least this share of its rows in
        one new cluster, was absorbed: merged into it (continuing an id still takes
        `min_jaccard`, so names and tags stay where they were); likewise a new cluster that
        continues no id, with this share of its rows from one old cluster, split off from it.
    next_id: first fresh id; by default one past the largest old id.
    compare_centroids: False when the two runs' vectors come from different embedders, whose
        centroids live in different spaces (even of one size): members alone decide then.
    """
    old_ids, new_labels = sorted(old_centroids), sorted(new_centroids)
    counts, old_size, new_size = _overlaps(old_members, new_members)

    ids: dict[int, int] = {}
    jaccard = {
        pair: both / (old_size[pair[0]] + new_size[pair[1]] - both) for pair, both in counts.items()
    }
    _assign(old_ids, new_labels, ids, lambda o, n: jaccard.get((o, n), 0.0), min_jaccard)
    if compare_centroids:
        sims = _similarities(old_centroids, new_centroids, old_ids, new_labels)
        _assign(old_ids, new_labels, ids, lambda o, n: sims[(o, n)], min_similarity)

    fresh = next_id if next_id is not None else (max(old_ids) + 1 if old_ids else 0)
    for label in new_labels:
        if label not in ids:
            ids[label] = fresh
            fresh += 1

    events: list[ClusterEvent] = []
    involved_old: set[int] = set()
    involved_new: set[int] = set()
    for o in old_ids:
        parts = [
            n
            for n in new_labels
            if counts[(o, n)] >= part_share * max(old_size[o], 1)
            and counts[(o, n)] > 0.5 * new_size[n]
        ]
        if len(parts) >= 2:
            parts.sort(key=lambda n: (ids[n] != o, -counts[(o, n)]))
            events.append(ClusterEvent("split", (o,), tuple(ids[n] for n in parts)))
            involved_old.add(o)
            involved_new.update(parts)
    for n in new_labels:
        parts = [
            o
            for o in old_ids
            if counts[(o, n)] >= part_share * max(new_size[n], 1)
            and counts[(o, n)] > 0.5 * old_size[o]
        ]
        if len(parts) >= 2:
            parts.sort(key=lambda o: (ids[n] != o, -counts[(o, n)]))
            events.append(ClusterEvent("merged", tuple(parts), (ids[n],)))
            involved_old.update(parts)
            involved_new.add(n)
    continued = {ids[n] for n in new_labels}
    gone = [o for o in old_ids if o not in continued and o not in involved_old]
    old_rows = {o: len(old_members.get(o, ())) for o in old_ids}  # rows only one run has too
    for o, n in _absorbed(gone, new_labels, counts, old_rows, min_containment).items():
        events = _add_part(events, "merged", o, ids[n], ids[n] in old_centroids)
        involved_old.add(o)
        involved_new.add(n)
    fresh_labels = [n for n in new_labels if n not in involved_new and ids[n] not in old_centroids]
    new_rows = {n: len(new_members.get(n, ())) for n in new_labels}
    for n, o in _carved(fresh_labels, old_ids, counts, new_rows, min_containment).items():
        events = _add_part(events, "split", ids[n], o, o in continued)
        involved_new.update(m for m in new_labels if m == n or ids[m] == o)
    for n in new_labels:
        if n in involved_new:
            continue
        kind: EventKind = "kept" if ids[n] in old_centroids else "new"
        events.append(ClusterEvent(kind, (ids[n],) if kind == "kept" else (), (ids[n],)))
    for o in old_ids:
        if o not in continued and o not in involved_old:
            events.append(ClusterEvent("gone", (o,), ()))
    return ClusterMatch(ids=ids, events=tuple(events))


def _absorbed(
    gone: list[int],
    new_labels: list[int],
    counts: Counter[tuple[int, int]],
    old_rows: Mapping[int, int],
    min_containment: float,
) -> dict[int, int]:
    """Old clusters no new one continues, each → the new cluster holding at least
    `min_containment` of its rows: absorbed whole into a much larger topic, it shares too few
    of that topic's rows to continue it (Jaccard) or to count as a merge's part, and read as
    gone. `old_rows` are the clusters' whole sizes, so rows the new run lacks count against."""
    absorbed = {}
    for o in gone:
        n = max(new_labels, key=lambda n: counts[(o, n)], default=None)
        if n is not None and counts[(o, n)] >= min_containment * max(old_rows[o], 1):
            absorbed[o] = n
    return absorbed


def _carved(
    fresh: list[int],
    old_ids: list[int],
    counts: Counter[tuple[int, int]],
    new_rows: Mapping[int, int],
    min_containment: float,
) -> dict[int, int]:
    """New clusters that continue no id, each → the old cluster at least `min_containment` of
    its rows came from: the same case as `_absorbed` the other way, a small topic carved out
    of a larger one, which read as new rather than split off. `new_rows` are the clusters'
    whole sizes: one mostly of rows the old run lacked (new data) is new, whatever the rest."""
    carved = {}
    for n in fresh:
        o = max(old_ids, key=lambda o: counts[(o, n)], default=None)
        if o is not None and counts[(o, n)] >= min_containment * max(new_rows[n], 1):
            carved[n] = o
    return carved


def _add_part(
    events: list[ClusterEvent], kind: EventKind, part: int, whole: int, whole_continues: bool
) -> list[ClusterEvent]:
    """`events` with `part` added to the merge into `whole` (kind "merged": `part` is an old
    id) or to the split of `whole` (kind "split": `part` is a new id), recording that event
    when there is none yet; the whole's own id comes first when it continues."""
    side = 0 if kind == "merged" else 1  # where the parts are listed: old ids, or new ids
    for k, event in enumerate(events):
        if event.kind == kind and (event.new, event.old)[side] == (whole,):
            parts = (event.old, event.new)[side] + (part,)
            ends = (parts, event.new) if kind == "merged" else (event.old, parts)
            return [*events[:k], ClusterEvent(kind, *ends), *events[k + 1 :]]
    parts = ((whole,) if whole_continues else ()) + (part,)
    ends = (parts, (whole,)) if kind == "merged" else ((whole,), parts)
    return [*events, ClusterEvent(kind, *ends)]


def _overlaps(
    old_members: Mapping[int, AbstractSet[Hashable]],
    new_members: Mapping[int, AbstractSet[Hashable]],
) -> tuple[Counter[tuple[int, int]], Counter[int], Counter[int]]:
    """Pair counts and sizes, counted over rows present in both runs only.

    Rows that only one run has (new data, deleted data) say nothing about continuity; rows that
    a run left unassigned (key -1) do: they count in the other run's cluster size.
    """
    old_of = {row: o for o, rows in old_members.items() for row in rows}
    new_of = {row: n for n, rows in new_members.items() for row in rows}
    counts: Counter[tuple[int, int]] = Counter()
    old_size: Counter[int] = Counter()
    new_size: Counter[int] = Counter()
    for row, o in old_of.items():
        n = new_of.get(row)
        if n is None:
            continue
        old_size[o] += o != UNASSIGNED
        new_size[n] += n != UNASSIGNED
        if UNASSIGNED not in (o, n):
            counts[(o, n)] += 1
    return counts, old_size, new_size


def _similarities(
    old_centroids: Mapping[int, np.ndarray],
    new_centroids: Mapping[int, np.ndarray],
    old_ids: list[int],
    new_labels: list[int],
) -> dict[tuple[int, int], float]:
    if not old_ids or not new_labels:
        return {}
    a = _unit(np.stack([np.asarray(old_centroids[o], dtype=np.float64) for o in old_ids]))
    b = _unit(np.stack([np.asarray(new_centroids[n], dtype=np.float64) for n in new_labels]))
    sim = a @ b.T
    return {
        (o, n): float(sim[i, j]) for i, o in enumerate(old_ids) for j, n in enumerate(new_labels)
    }


def _assign(
    old_ids: list[int],
    new_labels: list[int],
    ids: dict[int, int],
    score: Callable[[int, int], float],
    threshold: float,
) -> None:
    """One-to-one assignment of still-free old ids to still-free new labels, best total score."""
    taken = set(ids.values())
    olds = [o for o in old_ids if o not in taken]
    news = [n for n in new_labels if n not in ids]
    if not olds or not news:
        return
    matrix = np.array([[score(o, n) for n in news] for o in olds])
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    for r, c in zip(rows, cols, strict=True):
        if matrix[r, c] >= threshold:
            ids[news[c]] = olds[r]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
