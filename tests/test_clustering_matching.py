"""Stable ids across re-clustering: kept, split, merged, new and gone clusters."""

from __future__ import annotations

import numpy as np

from clustering.matching import ClusterEvent, match_clusters

RNG = np.random.default_rng(7)
A, B, C = (RNG.normal(size=16) for _ in range(3))


def rows(start: int, stop: int) -> set[int]:
    return set(range(start, stop))


def test_relabelled_clusters_keep_their_ids() -> None:
    old = {10: A, 11: B}
    match = match_clusters(
        old, {10: rows(0, 50), 11: rows(50, 90)}, {0: B, 1: A}, {0: rows(50, 95), 1: rows(0, 48)}
    )
    assert match.ids == {0: 11, 1: 10}
    assert sorted(e.kind for e in match.events) == ["kept", "kept"]


def test_split_keeps_the_id_on_the_larger_part_and_records_the_split() -> None:
    match = match_clusters(
        {10: A, 11: B},
        {10: rows(0, 100), 11: rows(100, 150)},
        {0: A, 1: A + 0.1 * C, 2: B},
        {0: rows(0, 60), 1: rows(60, 100), 2: rows(100, 150)},
    )
    assert match.ids[0] == 10 and match.ids[2] == 11
    assert match.ids[1] == 12  # fresh id, one past the largest old id
    assert ClusterEvent("split", (10,), (10, 12)) in match.events
    assert ClusterEvent("kept", (11,), (11,)) in match.events


def test_merge_is_recorded_and_the_larger_old_id_continues() -> None:
    match = match_clusters(
        {10: A, 11: B, 12: C},
        {10: rows(0, 60), 11: rows(60, 100), 12: rows(100, 130)},
        {0: A + B, 1: C},
        {0: rows(0, 100), 1: rows(100, 130)},
    )
    assert match.ids == {0: 10, 1: 12}
    assert ClusterEvent("merged", (10, 11), (10,)) in match.events
    assert not any(e.kind == "gone" for e in match.events)


def test_without_shared_rows_centroids_decide_and_the_rest_is_new_or_gone() -> None:
    match = match_clusters(
        {10: A, 11: B},
        {10: rows(0, 50), 11: rows(50, 100)},
        {0: A + 0.05 * C, 1: C},
        {0: rows(1000, 1040), 1: rows(1040, 1080)},
        next_id=500,
    )
    assert match.ids == {0: 10, 1: 500}
    assert set(match.events) == {
        ClusterEvent("kept", (10,), (10,)),
        ClusterEvent("new", (), (500,)),
        ClusterEvent("gone", (11,), ()),
    }


def test_small_overlap_does_not_steal_an_id() -> None:
    # new cluster 0 holds 10 % of old 10's rows plus much else, the rest became noise
    match = match_clusters(
        {10: A}, {10: rows(0, 100)}, {0: C}, {0: rows(0, 10) | rows(200, 300), -1: rows(10, 100)}
    )
    assert match.ids == {0: 11}
    assert {e.kind for e in match.events} == {"new", "gone"}
