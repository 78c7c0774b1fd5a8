"""Bradley–Terry leaderboards on a real slice of the AlpacaEval battles."""

from __future__ import annotations

import functools
import gzip
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scoring.bradley_terry import BTConfig, leaderboard, predicted_battles, win_probability

STRONG, WEAK = "FuseChat-Gemma-2-9B-Instruct", "alpaca-7b"


@functools.cache
def _slice(path: Path, models: frozenset[str], n_prompts: int) -> pd.DataFrame:
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if int(r["prompt_id"]) < n_prompts and r["model_b"] in models:
                rows.append(r)
    df = pd.DataFrame(rows)
    df["winner"] = df["winner"].map({"model_a": "a", "model_b": "b", "tie": "tie"})
    return df


@pytest.fixture
def battles(shared_file: Callable[[str], Path]) -> pd.DataFrame:
    models = frozenset({STRONG, WEAK, "claude-2", "vicuna-13b", "FuseChat-Qwen-2.5-7B-Instruct"})
    return _slice(shared_file("alpacaeval_battles_dev.jsonl.gz"), models, 60)


def test_recovers_order_of_clearly_different_models(battles: pd.DataFrame) -> None:
    board = leaderboard(battles, config=BTConfig(n_bootstrap=50, min_battles=5))
    order = [r.model for r in board.ratings]
    assert order.index(STRONG) < order.index("gpt4_1106_preview") < order.index(WEAK)
    by = {r.model: r for r in board.ratings}
    assert by[STRONG].rank < by[WEAK].rank
    # Elo scale: centred on 1000 over ranked models, 400 points = 10:1 odds.
    assert abs(sum(r.rating for r in board.ratings) / len(board.ratings) - 1000) < 1e-6
    assert win_probability(1400, 1000) == pytest.approx(10 / 11)


def test_cis_contain_estimates_and_overlaps_tie(battles: pd.DataFrame) -> None:
    board = leaderboard(battles, config=BTConfig(n_bootstrap=50, min_battles=5))
    for r in board.ratings:
        assert r.lower <= r.rating <= r.upper
        assert r.upper - r.lower > 0
    # Two models with nearly the same results on the same prompts: CIs overlap, same rank.
    twin = battles[battles["model_b"] == WEAK].assign(model_b="alpaca-7b-copy")
    both = pd.concat([battles, twin], ignore_index=True)
    board = leaderboard(both, config=BTConfig(n_bootstrap=50, min_battles=5))
    by = {r.model: r for r in board.ratings}
    assert by[WEAK].rank == by["alpaca-7b-copy"].rank
    assert "alpaca-7b-copy" in by[WEAK].tied_with
    assert by[STRONG].rank < by[WEAK].rank


def test_minimum_battles_and_ties(battles: pd.DataFrame) -> None:
    few = battles[battles["model_b"] == "claude-2"].head(3).assign(model_b="newcomer")
    tie = battles.head(1).assign(model_b="tie-only", winner="tie")
    board = leaderboard(
        pd.concat([battles, few, tie], ignore_index=True),
        config=BTConfig(n_bootstrap=10, min_battles=5),
    )
    assert set(board.too_few_battles) == {"newcomer", "tie-only"}
    assert "newcomer" not in {r.model for r in board.ratings}
    with pytest.raises(ValueError, match="unknown winner"):
        leaderboard(battles.head(3).assign(winner="model_a"))


def _scores(strengths: list[float], prompts: int = 40, seed: int = 1) -> np.ndarray:
    """Predictor scores: each expert's strength plus per-prompt noise."""
    rng = np.random.default_rng(seed)
    return np.array(strengths) + rng.normal(0.0, 0.3, (prompts, len(strengths)))


def test_predicted_battles_rank_a_topic_without_judged_battles() -> None:
    experts = ["e0", "e1", "e2", "e3", "e4"]
    estimate = predicted_battles(experts, _scores([2, 1, 0, -1, -2]), per_expert=10)
    assert estimate["predicted"].all() and estimate["outcome"].between(0, 1).all()
    board = leaderboard(estimate, config=BTConfig(n_bootstrap=50, min_battles=10))
    assert [r.model for r in board.ratings] == experts  # the predictor's order
    assert board.n_battles == 0
    for r in board.ratings:
        assert r.battles == 0 and r.wins == 0 and r.predicted >= 10
        assert r.lower < r.rating < r.upper  # drawn anew in the bootstrap: not a point
    assert board.ratings[0].rank < board.ratings[-1].rank


def test_judged_battles_outweigh_a_wrong_estimate(battles: pd.DataFrame) -> None:
    experts = [STRONG, WEAK, "newcomer"]
    wrong = predicted_battles(experts, _scores([-1.5, 1.5, 0.0]), per_expert=10)
    few = battles[battles["model_b"] == "claude-2"].head(3).assign(model_b="newcomer")
    board = leaderboard(
        pd.concat([battles, few, wrong], ignore_index=True),
        config=BTConfig(n_bootstrap=20, min_battles=5),
    )
    by = {r.model: r for r in board.ratings}
    assert by[STRONG].rating > by[WEAK].rating  # 60 judged prompts against 10 estimates
    judged = battles[battles["model_b"] == WEAK]
    assert by[WEAK].battles == len(judged)  # the estimate is not a judged battle
    assert by[WEAK].wins == judged["winner"].map({"a": 0.0, "b": 1.0, "tie": 0.5}).sum()
    # Three battles alone are below the minimum: the estimate ranks the newcomer.
    assert by["newcomer"].battles == 3 and by["newcomer"].predicted >= 10
    assert board.n_battles == len(battles) + 3
