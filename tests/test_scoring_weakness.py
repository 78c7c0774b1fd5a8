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
