"""Weak-cluster ranking: sure, large shortfalls first, with reasons."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

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
    overall = pd.concat(parts)["reward"].mean()  # of the clustered rows: named as such
    assert f"surely below the clustered mean {overall:.3f}" in top.reason
    assert ranked[-1].weakness == 0.0
    assert ranked[1].retry_rate is None  # unknown signals are not a 0 % rate
    assert abs(sum(r.traffic_share for r in ranked) - 1.0) < 1e-9


def test_a_topic_of_few_long_conversations_is_less_sure_than_its_row_count() -> None:
    """Turns of one chat share a user and a task: 60 rows from 3 conversations are not 60
    independent draws. Resampled by row, their interval was as narrow as 60 users' and the
    topic read "surely below"; now the interval is also resampled by conversation and the
    wider one kept, and the reason says how few conversations the rows come from."""
    rng = np.random.default_rng(1)
    chat_means = np.repeat([-0.6, 0.1, 0.35], 20)  # one user had a bad time
    reward = chat_means + rng.normal(0, 0.05, 60)
    good = rng.normal(0.3, 0.1, 600)
    frame = pd.DataFrame(
        {
            "cluster_id": ["chats"] * 60 + ["other"] * 600,
            "reward": np.concatenate([reward, good]),
            "conversation_id": [f"c{i // 20}" for i in range(60)] + [f"o{i}" for i in range(600)],
        }
    )
    by_chat = {w.cluster_id: w for w in rank_clusters(frame)}["chats"]
    by_row = {w.cluster_id: w for w in rank_clusters(frame.drop(columns="conversation_id"))}[
        "chats"
    ]
    assert "surely below" in by_row.reason  # what the row bootstrap claimed
    assert by_chat.reward_lower < by_row.reward_lower - 0.1
    assert by_chat.reward_upper >= by_row.reward_upper
    assert "surely below" not in by_chat.reason
    assert "(60 exchanges from 3 conversations)" in by_chat.reason
    assert (by_chat.conversations, by_row.conversations) == (3, None)
    assert by_chat.mean_reward == pytest.approx(reward.mean())
    # One conversation: resampling it gives nothing, so the rows' interval stands.
    one = bootstrap_mean_ci(reward[:20], groups=np.array(["c0"] * 20))
    assert one == bootstrap_mean_ci(reward[:20]) and one[1] < one[2]
    # One row per conversation: the same interval as by row.
    assert bootstrap_mean_ci(good, groups=np.arange(600)) == bootstrap_mean_ci(good)
    # Enough conversations: theirs alone, each resample the mean of the rows it drew.
    chats = np.repeat(np.arange(40), 5)
    values = rng.normal(0, 1, 40)[chats] + rng.normal(0, 0.1, 200)
    drawn = np.random.default_rng(0).integers(0, 40, (1000, 40))
    sums = np.bincount(chats, weights=values)
    expected = np.quantile(sums[drawn].sum(axis=1) / (5 * 40), [0.025, 0.975])
    mean, lo, hi = bootstrap_mean_ci(values, groups=chats)
    assert (lo, hi) == pytest.approx(tuple(expected)) and hi - lo > 0.4
    assert mean == pytest.approx(values.mean())
    assert bootstrap_mean_ci(values)[2] - bootstrap_mean_ci(values)[1] < 0.3  # rows: too sure


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


def test_equally_weak_clusters_rank_lowest_mean_reward_first() -> None:
    """Two topics above the overall mean (weakness 0) ranked by their CI's lower bound, so a
    group's weakest topics named a wide-CI topic with mean 0.5 before a steady one with mean
    0.3, the other way round from the topic list of the same `clusters` output."""
    from scoring.step import group_reports

    rows = [("low", -1.0)] * 60 + [("steady", 0.3 + 0.01 * (i % 2)) for i in range(20)]
    rows += [("wide", -0.5 if i % 2 else 1.5) for i in range(20)]
    frame = pd.DataFrame(rows, columns=["cluster_id", "reward"])
    ranked = rank_clusters(frame)
    assert [r.cluster_id for r in ranked] == ["low", "steady", "wide"]
    wide = ranked[2]
    assert wide.weakness == ranked[1].weakness == 0.0 and wide.reward_lower < ranked[1].reward_lower
    groups = group_reports(frame, {"low": "g1", "steady": "g1", "wide": "g1"}, ranked)
    assert [t["id"] for t in groups["g1"]["weakest_topics"]] == ["low", "steady", "wide"]


def test_clusters_lists_equally_weak_topics_lowest_reward_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every topic not below the overall mean has weakness 0: `clusters` listed those largest
    first, so a big topic that does well came before a small one that does much worse (the
    UI's overview puts the lower reward first)."""
    from app.cli import main
    from storage.clusters import save_cluster_run
    from storage.engine import open_database
    from storage.logs import utcnow
    from storage.reports import save_scored

    db = f"duckdb:///{tmp_path / 'db.duckdb'}"
    engine = open_database(db)
    run = {
        "id": "run1", "created_at": utcnow(), "on_field": "prompt", "embedder": "m",
        "params": "{}", "n_rows": 100, "n_clusters": 4, "unassigned_share": 0.0, "events": None,
    }  # fmt: skip
    sizes = {"weak": 10, "good-big": 50, "fair-small": 15, "unscored": 25, "g1": 100}
    base = {"run_id": "run1", "auto_name": "topic", "keywords": "[]"}
    rows = [
        {**base, "id": cid, "parent_id": None if cid == "g1" else "g1",
         "level": int(cid == "g1"), "size": n, "share": n / 100}
        for cid, n in sizes.items()
    ]  # fmt: skip
    save_cluster_run(engine, run, rows, [])
    figures = {"weak": (0.05, 0.1), "good-big": (0.0, 0.9), "fair-small": (0.0, 0.4)}
    reports = {cid: {"weakness": w, "reward_mean": r} for cid, (w, r) in figures.items()}
    save_scored(engine, "run1", {**reports, "g1": {"weakness": 0.0, "reward_mean": 0.5}})
    engine.dispose()

    assert main(["--db", db, "--json", "clusters"]) == 0
    listed = [c["id"] for c in json.loads(capsys.readouterr().out)["clusters"]]
    assert listed == ["weak", "fair-small", "good-big", "unscored", "g1"]
