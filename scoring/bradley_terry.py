"""Bradley–Terry leaderboards over battles, Elo-scaled, with bootstrap CIs and tied ranks.

Ratings follow the Chatbot Arena convention (scale 400, base 10, centred on 1000) so numbers
read like the leaderboards people already know. A tie counts as half a win for each side; soft
outcomes (a predicted P(a wins)) are accepted too, which lets a cluster's leaderboard combine
judged battles with the win predictor's estimates (`predicted_battles`). Ranks follow the Arena
rule: 1 + the number of models whose CI lies wholly above this one, so models with overlapping
CIs share a rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.optimize import minimize
from scipy.special import expit

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
    battles: int  # judged battles
    wins: float  # in judged battles; ties count half
    tied_with: tuple[str, ...]  # ranked models whose CI overlaps this one's
    predicted: int = 0  # battles standing for the win predictor's estimate (`predicted_battles`)


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
                    "predicted": r.predicted,
                    "tied_with": list(r.tied_with),
                }
                for r in self.ratings
            ]
        )


def battle_outcomes(battles: pd.DataFrame) -> np.ndarray:
    """P(a wins) per battle: the `outcome` column where given, else from `winner` (a/b/tie)."""
    given = battles["outcome"] if "outcome" in battles.columns else None
    if given is not None and given.notna().all():
        return given.to_numpy(dtype=float)
    outcome = battles["winner"].map(WINNER_OUTCOME)
    if given is not None:
        outcome = given.astype(float).fillna(outcome)
    if outcome.isna().any():
        bad = sorted(set(battles.loc[outcome.isna(), "winner"].astype(str)))
        raise ValueError(f"unknown winner values {bad}: expected a, b or tie")
    return outcome.to_numpy(dtype=float)


def predicted_battles(
    experts: Sequence[str], scores: np.ndarray, *, per_expert: int, seed: int = 0
) -> pd.DataFrame:
    """Battles standing for the win predictor's estimate, `per_expert` for each expert, to
    join a topic's judged battles in its leaderboard: a topic with few battles (or none) still
    ranks its experts, and an expert with few battles gets the predictor's prior, while many
    judged battles outweigh it.

    `scores` are the predictor's scores (some of the topic's prompts × `experts`). In each of
    `per_expert` rounds the experts are shuffled and paired off (with an odd count, the last
    meets a random other), each pair on a random one of the prompts, with the soft outcome the
    predictor gives, P(a beats b | prompt) = σ(s_a − s_b). Rows are marked `predicted`: the
    leaderboard's bootstrap draws their outcomes anew, so each counts as one battle, no more.
    """
    scores = np.asarray(scores, dtype=float)
    n = len(experts)
    if n < 2 or per_expert <= 0 or not len(scores):
        return pd.DataFrame(columns=["model_a", "model_b", "outcome", "predicted"])
    rng = np.random.default_rng(seed)
    a: list[int] = []
    b: list[int] = []
    for _ in range(per_expert):
        order = rng.permutation(n)
        if n % 2:
            others = order[:-1]
            order = np.append(order, others[rng.integers(len(others))])
        a.extend(order[0::2])
        b.extend(order[1::2])
    rows = rng.integers(0, len(scores), len(a))
    margin = scores[rows, a] - scores[rows, b]
    return pd.DataFrame(
        {
            "model_a": [experts[i] for i in a],
            "model_b": [experts[i] for i in b],
            "outcome": expit(margin),
            "predicted": True,
        }
    )


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
    """Natural-log BT strengths (mean zero) maximising the likelihood of the outcomes.

    `outcome` and `weights` may hold one row per fit (fits × battles), for many fits of the
    same battles at once (the bootstrap's resamples, as counts in `weights`): their losses
    are independent, so one L-BFGS run over all of them finds each one's optimum, and a
    hundred fits cost one scipy call, not a hundred (28 experts: 2 s → 0.1 s a leaderboard).
    """
    y = np.atleast_2d(np.asarray(outcome, dtype=float))
    w = np.ones_like(y) if weights is None else np.atleast_2d(np.asarray(weights, dtype=float))
    fits = len(y)
    total = np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
    rows = np.arange(len(a))
    incidence = sparse.csr_matrix(
        (np.r_[np.ones(len(a)), -np.ones(len(b))], (np.r_[rows, rows], np.r_[a, b])),
        shape=(len(a), n_models),
    )

    def loss(flat: np.ndarray) -> tuple[float, np.ndarray]:
        beta = flat.reshape(fits, n_models)
        d = beta[:, a] - beta[:, b]
        # -[y log σ(d) + (1-y) log σ(-d)], written stably.
        nll = np.logaddexp(0.0, -d) * y + np.logaddexp(0.0, d) * (1.0 - y)
        value = float((w * nll / total).sum() + l2 * (beta**2).sum())
        g_d = w * (expit(d) - y) / total
        grad = np.asarray(incidence.T @ g_d.T).T + 2 * l2 * beta
        return value, grad.ravel()

    x0 = np.zeros((fits, n_models)) if start is None else np.tile(start, (fits, 1))
    beta = minimize(loss, x0.ravel(), jac=True, method="L-BFGS-B").x.reshape(fits, n_models)
    beta = beta - beta.mean(axis=1, keepdims=True)
    return beta if np.ndim(outcome) == 2 else beta[0]


def leaderboard(
    battles: pd.DataFrame,
    *,
    config: BTConfig = BTConfig(),
    weights: np.ndarray | None = None,
) -> Leaderboard:
    """Fit BT on `model_a`, `model_b` and `winner` (or `outcome`) with bootstrap CIs.

    Rows marked `predicted` (`predicted_battles`) count towards the ratings and the minimum
    number of battles, not towards a model's judged `battles` and `wins`; the bootstrap draws
    their outcomes from their predicted probability (a parametric bootstrap), so a topic
    ranked on estimates alone gets CIs as wide as that many battles would give.
    """
    outcome = battle_outcomes(battles)
    soft = (
        battles["predicted"].eq(True).to_numpy()
        if "predicted" in battles.columns
        else np.zeros(len(battles), dtype=bool)
    )
    models = sorted(set(battles["model_a"]) | set(battles["model_b"]))
    index = {m: i for i, m in enumerate(models)}
    a = battles["model_a"].map(index).to_numpy()
    b = battles["model_b"].map(index).to_numpy()
    n = len(models)
    w = None if weights is None else np.asarray(weights, dtype=float)

    beta = fit_strengths(a, b, outcome, n, weights=w, l2=config.l2)
    boots = _bootstrap(a, b, outcome, soft, n, w, config, start=beta)

    counts = np.bincount(a, minlength=n) + np.bincount(b, minlength=n)
    guessed = np.bincount(a[soft], minlength=n) + np.bincount(b[soft], minlength=n)
    judged = ~soft
    wins = np.bincount(a[judged], outcome[judged], n) + np.bincount(
        b[judged], 1.0 - outcome[judged], n
    )
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
                battles=int(counts[i] - guessed[i]),
                wins=float(wins[i]),
                tied_with=overlap,
                predicted=int(guessed[i]),
            )
        )
    return Leaderboard(
        ratings=tuple(lines),
        too_few_battles=tuple(models[i] for i in range(n) if not eligible[i]),
        n_battles=int(judged.sum()),
    )


def _bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    outcome: np.ndarray,
    soft: np.ndarray,
    n: int,
    weights: np.ndarray | None,
    config: BTConfig,
    *,
    start: np.ndarray,
) -> np.ndarray:
    """Strengths of `config.n_bootstrap` resamples of the battles (resamples × models), each
    a battle's count of draws as its weight; a `soft` battle picked k times wins a
    Binomial(k, p) share of them. Fitted a block at a time, so that at most a few million
    battle-weights are held at once."""
    rng = np.random.default_rng(config.seed)
    size = len(a)
    block = max(1, min(config.n_bootstrap, 2_000_000 // max(size, 1)))
    boots = np.empty((config.n_bootstrap, n))
    for first in range(0, config.n_bootstrap, block):
        fits = min(block, config.n_bootstrap - first)
        counts = np.stack(
            [np.bincount(rng.integers(0, size, size), minlength=size) for _ in range(fits)]
        )
        drawn = np.tile(outcome, (fits, 1))
        if soft.any():
            picked = counts[:, soft]
            wins = rng.binomial(picked, outcome[soft])
            drawn[:, soft] = np.where(picked > 0, wins / np.maximum(picked, 1), outcome[soft])
        weight = counts if weights is None else counts * weights
        boots[first : first + fits] = fit_strengths(
            a, b, drawn, n, weights=weight, l2=config.l2, start=start
        )
    return boots


def win_probability(rating_a: float, rating_b: float, config: BTConfig = BTConfig()) -> float:
    """P(a beats b) implied by two Elo-scaled ratings."""
    return 1.0 / (1.0 + config.base ** ((rating_b - rating_a) / config.scale))
