"""Weak-cluster ranking: sure, large shortfalls first, with reasons."""

from __future__ import annotations

import numpy as np
import pandas as pd

from scoring.weakness import bootstrap_mean_ci, rank_clusters


def test_weakness_ordering_and_reasons() -> None:
    rng = np.random.default_rng(0)
    parts = [
        # big and clearly bad, lots of retries
        pd.DataFrame(
            {
                "cluster_id": "big-bad",
                "reward": rng.normal(0.3, 0.1, 300),
                "retried": rng.random(300) < 0.5,
            }
        ),
        # tiny and bad: wide CI, little traffic
        pd.DataFrame(
            {"cluster_id": "tiny-bad", "reward": rng.normal(0.2, 0.1, 5), "retried": [None] * 5}
        ),
        # big and good
        pd.DataFrame(
            {
                "cluster_id": "big-good",
                "reward": rng.normal(0.8, 0.1, 600),
                "retried": rng.random(600) < 0.05,
            }
        ),
    ]
    ranked = rank_clusters(pd.concat(parts, ignore_index=True))
    assert [r.cluster_id for r in ranked] == ["big-bad", "tiny-bad", "big-good"]
    top = ranked[0]
    assert top.reward_lower <= top.mean_reward <= top.reward_upper
    assert "surely below" in top.reason and "retry rate" in top.reason
    assert ranked[-1].weakness == 0.0
    assert ranked[1].retry_rate is None  # unknown signals are not a 0 % rate
    assert abs(sum(r.traffic_share for r in ranked) - 1.0) < 1e-9


def test_bootstrap_ci_ignores_nan() -> None:
    mean, lo, hi = bootstrap_mean_ci(np.array([1.0, 2.0, np.nan, 3.0]), n_bootstrap=200)
    assert mean == 2.0 and lo <= mean <= hi
    assert np.isnan(bootstrap_mean_ci(np.array([np.nan]))[0])


def test_bootstrap_of_a_large_group_keeps_memory_bounded_and_the_same_interval() -> None:
    """A parent group can hold most of a big log: resampling it all at once took
    n_bootstrap × n indices (3 GB here). Drawn in blocks, memory stays small and the
    interval is the one the all-at-once draw gives."""
    import tracemalloc

    values = np.random.default_rng(3).normal(0.5, 0.2, 200_000)
    tracemalloc.start()
    mean, lo, hi = bootstrap_mean_ci(values)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 256 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert lo < mean < hi

    small = values[:10_000]  # several blocks, small enough to resample all at once
    rng = np.random.default_rng(0)
    means = small[rng.integers(0, len(small), (1000, len(small)))].mean(axis=1)
    expected = np.quantile(means, [0.025, 0.975])
    assert bootstrap_mean_ci(small)[1:] == (
        min(float(expected[0]), float(small.mean())),
        max(float(expected[1]), float(small.mean())),
    )
