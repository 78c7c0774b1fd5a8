"""How often a reward model agrees with a judge on battles it has not seen.

The question a team asks before trusting rewards on a new set of experts: give it battles the
judge decided (`convoscope reward --file battles.jsonl`) and count how often the answer with
the higher reward is the one the judge preferred. "The longer answer wins" is measured on the
same battles beside it: LLM judges favour long answers so strongly (87 % of AlpacaEval's
battles) that a reward model is only worth its cost where it beats that rule. Ties are left
out of both, as the benchmarks do; per expert, each battle counts for both its experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ingest.records import Winner


@dataclass(frozen=True, slots=True)
class Agreement:
    """Agreement with the judge on the battles it decided (None when it decided none)."""

    battles: int  # battles with a winner
    ties: int
    accuracy: float | None  # the higher reward is the winner's
    longer_wins: float | None  # the longer answer is the winner's


@dataclass(frozen=True, slots=True)
class JudgedBattle:
    """One battle's two rewards and answer lengths, the judge's verdict and the experts."""

    reward_a: float
    reward_b: float
    length_a: int
    length_b: int
    winner: Winner
    model_a: str | None = None
    model_b: str | None = None


def agreement(battles: Sequence[JudgedBattle]) -> Agreement:
    """Pairwise accuracy of the rewards and of answer length on the decided battles."""
    decided = [b for b in battles if b.winner != "tie"]
    ties = len(battles) - len(decided)
    if not decided:
        return Agreement(battles=0, ties=ties, accuracy=None, longer_wins=None)
    a_won = np.array([b.winner == "a" for b in decided])
    reward_gap = np.array([b.reward_a - b.reward_b for b in decided])
    length_gap = np.array([b.length_a - b.length_b for b in decided])
    return Agreement(
        battles=len(decided),
        ties=ties,
        accuracy=agreeing_share(reward_gap, a_won),
        longer_wins=agreeing_share(length_gap, a_won),
    )


def agreeing_share(gap: np.ndarray, a_won: np.ndarray) -> float:
    """The share of battles where the larger value (a's when `gap` > 0) is the judge's pick; an
    equal pair prefers neither and counts half, as a coin would (it used to count as b)."""
    return float(np.mean(np.where(gap == 0, 0.5, (gap > 0) == a_won)))


def agreement_by_model(battles: Sequence[JudgedBattle]) -> dict[str, Agreement]:
    """`agreement` over the battles each named expert took part in, by expert name."""
    taking_part: dict[str, list[JudgedBattle]] = {}
    for battle in battles:
        for model in {battle.model_a, battle.model_b}:
            if model is not None:
                taking_part.setdefault(model, []).append(battle)
    return {model: agreement(taking_part[model]) for model in sorted(taking_part)}
