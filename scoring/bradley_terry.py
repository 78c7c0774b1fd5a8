"""Bradley–Terry leaderboards over battles, Elo-scaled, with bootstrap CIs and tied ranks.

Ratings follow the Chatbot Arena convention (scale 400, base 10, centred on 1000) so numbers
read like the leaderboards people already know. A tie counts as half a win for each side; soft
outcomes (a predicted P(a wins)) are accepted too, which lets a cluster's leaderboard combine
judged battles with the win predictor's estimates. Ranks follow the Arena rule: 1 + the number
of models whose CI lies wholly above this one, so models with overlapping CIs share a rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import minimize

WINNER_OUTCOME = {"a": 1.0, "b": 0.0, "tie": 0.5}


@dataclass(frozen=True, slots=True)
class BTConfig:
    """How ratings are scaled and how sure they must be before they are shown."""

    scale: float = 400.0
    base: float = 10.0
    init: float = 1000.0
    n_bootstrap: int = 200
    ci: float = 0.95
    min_battles: int = 10  # models with fewer battles are fitted but not ranked
    l2: float = 1e-4  # keeps an unbeaten model's strength finite
    seed: int = 0


@dataclass(frozen=True, slots=True)
class Rating:
    """One model's line on a leaderboard."""

    model: str
    rating: float
    lower: float
    upper: float
    rank: int
    battles: int
    wins: float  # ties count half
    tied_with: tuple[str, ...]  # ranked models whose CI overlaps this one's


@dataclass(frozen=True, slots=True)
class Leaderboard:
    """Ranked models (best first) plus those left out for having too few battles."""

    ratings: tuple[Rating, ...]
    too_few_battles: tuple[str, ...]
    n_battles: int

    def to_frame(self) -> pd.DataFrame:
        """One row per ranked model, for display or storage."""
        return pd.DataFrame(
            [
                {
                    "model": r.model,
                    "rating": r.rating,
                    "lower": r.lower,
                    "upper": r.upper,
                    "rank": r.rank,
                    "battles": r.battles,
                    "wins": r.wins,
                    "tied_with": list(r.tied_with),
                }
                for r in self.ratings
            ]
        )


def battle_outcomes(battles: pd.DataFrame) -> np.ndarray:
    """P(a wins) per battle: the `outcome` column when given, else from `winner` (a/b/tie)."""
    if "outcome" in battles.columns:
        return battles["outcome"].to_numpy(dtype=float)
    outcome = battles["winner"].map(WINNER_OUTCOME)
    if outcome.isna().any():
        bad = sorted(set(battles.loc[outcome.isna(), "winner"].astype(str)))
        raise ValueError(f"unknown winner values {bad}: expected a, b or tie")
    return outcome.to_numpy(dtype=float)


def fit_strengths(
    a: np.ndarray,
    b: np.ndarray,
    outcome: np.ndarray,
    n_models: int,
    *,
    weights: np.ndarray | None = None,
    l2: float = 1e-4,
    start: np.ndarray | None = None,
) -> np.ndarray:
    """Natural-log BT strengths (mean zero) maximising the likelihood of the outcomes."""
    w = np.ones(len(a)) if weights is None else np.asarray(weights, dtype=float)
    total = max(w.sum(), 1e-12)

    def loss(beta: np.ndarray) -> tuple[float, np.ndarray]:
        d = beta[a] - beta[b]
        # -[y log σ(d) + (1-y) log σ(-d)], written stably.
        nll = np.logaddexp(0.0, -d) * outcome + np.logaddexp(0.0, d) * (1.0 - outcome)
        value = float((w * nll).sum() / total + l2 * (beta**2).sum())
        g_d = w * (1.0 / (1.0 + np.exp(-d)) - outcome) / total
        grad = np.bincount(a, g_d, n_models) - np.bincount(b, g_d, n_models) + 2 * l2 * beta
        return value, grad

    x0 = np.zeros(n_models) if start is None else start
    result = minimize(loss, x0, jac=True, method="L-BFGS-B")
    beta = result.x
    return beta - beta.mean()


def leaderboard(
    battles: pd.DataFrame,
    *,
    config: BTConfig = BTConfig(),
    weights: np.ndarray | None = None,
) -> Leaderboard:
    """Fit BT on `model_a`, `model_b` and `winner` (or `outcome`) with bootstrap CIs."""
    outcome = battle_outcomes(battles)
    models = sorted(set(battles["model_a"]) | set(battles["model_b"]))
    index = {m: i for i, m in enumerate(models)}
    a = battles["model_a"].map(index).to_numpy()
    b = battles["model_b"].map(index).to_numpy()
    n = len(models)
    w = None if weights is None else np.asarray(weights, dtype=float)

    beta = fit_strengths(a, b, outcome, n, weights=w, l2=config.l2)
    rng = np.random.default_rng(config.seed)
    boots = np.empty((config.n_bootstrap, n))
    for i in range(config.n_bootstrap):
        pick = rng.integers(0, len(a), len(a))
        boots[i] = fit_strengths(
            a[pick],
            b[pick],
            outcome[pick],
            n,
            weights=None if w is None else w[pick],
            l2=config.l2,
            start=beta,
        )

    counts = np.bincount(a, minlength=n) + np.bincount(b, minlength=n)
    wins = np.bincount(a, outcome, n) + np.bincount(b, 1.0 - outcome, n)
    eligible = counts >= config.min_battles
    # Centre on the ranked models so adding an unranked newcomer does not shift everyone.
    centre = beta[eligible].mean() if eligible.any() else 0.0
    to_elo = config.scale / math.log(config.base)
    rating = config.init + to_elo * (beta - centre)
    tail = (1.0 - config.ci) / 2.0
    boot_centre = boots[:, eligible].mean(axis=1, keepdims=True) if eligible.any() else 0.0
    boot_elo = config.init + to_elo * (boots - boot_centre)
    lower = np.quantile(boot_elo, tail, axis=0) if config.n_bootstrap else rating
    upper = np.quantile(boot_elo, 1.0 - tail, axis=0) if config.n_bootstrap else rating
    # The point estimate always lies inside its interval, even with few bootstrap rounds.
    lower, upper = np.minimum(lower, rating), np.maximum(upper, rating)

    ranked = [i for i in np.argsort(-rating) if eligible[i]]
    lines = []
    for i in ranked:
        above = sum(1 for j in ranked if lower[j] > upper[i])
        overlap = tuple(
            models[j] for j in ranked if j != i and lower[j] <= upper[i] and lower[i] <= upper[j]
        )
        lines.append(
            Rating(
                model=models[i],
                rating=float(rating[i]),
                lower=float(lower[i]),
                upper=float(upper[i]),
                rank=1 + above,
                battles=int(counts[i]),
                wins=float(wins[i]),
                tied_with=overlap,
            )
        )
    return Leaderboard(
        ratings=tuple(lines),
        too_few_battles=tuple(models[i] for i in range(n) if not eligible[i]),
        n_battles=len(battles),
    )


def win_probability(rating_a: float, rating_b: float, config: BTConfig = BTConfig()) -> float:
    """P(a beats b) implied by two Elo-scaled ratings."""
    return 1.0 / (1.0 + config.base ** ((rating_b - rating_a) / config.scale))
