"""Labels without annotators: one joint target mined from user behaviour.

Each known signal gives a per-signal label in [0, 1] (0 = the user showed the response was bad)
and the joint label is their α-weighted mean; the row's training weight is the sum of the α of
the signals it has. Following Chai, a response is bad when it was retried (regenerated),
edited, or the user left within K turns; good when the user went on for at least N more turns
without retrying or editing; ratings, thumbs and battle outcomes add their own evidence. An unknown
signal (None / NaN) contributes nothing: it is never read as 0, so rows with no signal at all
get a NaN label and weight 0 rather than a fake "bad". A flag a log marks where it happened
(retried, edited) is known for every answer of a source that marks it at all (`source_flag`):
unmarked there means not retried. Leaving says something only where
staying was possible: in a source (a log file) whose conversations never go past one user turn
(an API request log, a one-shot benchmark), every answer "ended" its conversation, so there the
length signal is unknown rather than "bad" for every row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

SIGNALS = ("retry", "edit", "length", "rating", "thumbs", "battle")


@dataclass(frozen=True, slots=True)
class LabelConfig:
    """Weights α per signal and the thresholds that turn conversation length into a label."""

    alpha_retry: float = 1.0
    alpha_edit: float = 1.0
    alpha_length: float = 1.0  # ended within K turns (bad) / continued ≥ N turns (good)
    alpha_rating: float = 1.0
    alpha_thumbs: float = 1.0
    alpha_battle: float = 1.0
    ended_within: int = 1  # K: fewer than K user turns after the response = the user left
    continued_at_least: int = 3  # N: at least N more user turns without a retry = good
    rating_min: float = 1.0
    rating_max: float = 5.0

    def __post_init__(self) -> None:
        """Refuse weights that would silently empty the target: a NaN weight made every row
        unknown, and the model trained on nothing was stored as the newest one all the same."""
        for signal in SIGNALS:
            weight = self.alpha(signal)
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"alpha_{signal} must be a number of at least 0, got {weight}")
        if not any(self.alpha(signal) > 0 for signal in SIGNALS):
            raise ValueError(
                "every signal's weight (alpha) is 0, so no response would get a label: "
                "give at least one signal a weight above 0"
            )
        if self.ended_within < 1 or self.continued_at_least < 1:
            raise ValueError("ended_within and continued_at_least must be at least 1")
        if self.continued_at_least < self.ended_within:  # an answer would be bad and good
            raise ValueError(
                f"continued_at_least ({self.continued_at_least}) must be at least ended_within "
                f"({self.ended_within})"
            )
        if not self.rating_min < self.rating_max:
            raise ValueError(f"rating_min {self.rating_min} must be below rating_max")

    def alpha(self, signal: str) -> float:
        """The weight of one signal by its short name (see SIGNALS)."""
        return float(getattr(self, f"alpha_{signal}"))


@dataclass(frozen=True, slots=True)
class Labels:
    """Per-row joint label and weight, the per-signal labels, and how many rows each signal
    labelled (good / bad / unknown), so a user sees what the target was built from."""

    frame: pd.DataFrame  # columns: label, weight, and label_<signal> for each signal
    counts: dict[str, dict[str, int]]

    @property
    def label(self) -> pd.Series:
        return self.frame["label"]

    @property
    def weight(self) -> pd.Series:
        return self.frame["weight"]


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A signal column as float with NaN for unknown (None, missing column, pandas NA)."""
    if name not in frame.columns:
        return pd.Series(np.nan, index=frame.index, dtype=float)
    return pd.to_numeric(frame[name].astype(object).where(frame[name].notna()), errors="coerce")


def signal_labels(frame: pd.DataFrame, config: LabelConfig = LabelConfig()) -> pd.DataFrame:
    """Per-signal labels in [0, 1], NaN where the signal is unknown.

    Reads the canonical exchange columns `retried`, `edited`, `user_turns_after`,
    `ended_conversation`, `rating`, `thumbs`, and for battles `battle_wins` / `battle_count`
    (ties count half a win).
    """
    retried = source_flag(frame, "retried")
    edited = source_flag(frame, "edited")
    turns = _column(frame, "user_turns_after")
    ended = _column(frame, "ended_conversation")
    out = pd.DataFrame(index=frame.index)
    out["retry"] = 1.0 - retried
    out["edit"] = 1.0 - edited

    length = pd.Series(np.nan, index=frame.index, dtype=float)
    # An ended flag alone says the user left right after this response.
    length[ended == 1] = 0.0
    length[turns < config.ended_within] = 0.0
    # Going on for N turns only counts as good when the response was not regenerated or
    # edited away: the user went on from another answer (an edit, `--merge-history`).
    length[(turns >= config.continued_at_least) & (retried != 1) & (edited != 1)] = 1.0
    out["length"] = length.where(_conversations_go_on(frame, turns))

    span = config.rating_max - config.rating_min
    out["rating"] = ((_column(frame, "rating") - config.rating_min) / span).clip(0.0, 1.0)
    thumbs = _column(frame, "thumbs")
    out["thumbs"] = thumbs.map({1.0: 1.0, -1.0: 0.0, 0.0: np.nan})
    count = _column(frame, "battle_count")
    out["battle"] = (_column(frame, "battle_wins") / count).where(count > 0)
    return out


def rating_scale_warning(frame: pd.DataFrame, config: LabelConfig = LabelConfig()) -> str | None:
    """What to say when logged ratings fall outside the rating scale, else None. They are
    clipped to its ends, so a log rated 1-10 read on the default 1:5 scale labelled a 6 and
    a 10 alike as fully good, and said nothing."""
    ratings = _column(frame, "rating").dropna()
    outside = ratings[(ratings < config.rating_min) | (ratings > config.rating_max)]
    if outside.empty:
        return None
    return (
        f"{len(outside)} of {len(ratings)} ratings lie outside the rating scale "
        f"{config.rating_min:g}:{config.rating_max:g} (logged: {ratings.min():g} to "
        f"{ratings.max():g}), and count as its nearest end; give --rating-scale MIN:MAX "
        "for this log's scale"
    )


def source_flag(frame: pd.DataFrame, name: str) -> pd.Series:
    """A flag a log marks where it happened (`retried`, `edited`) as float, NaN where unknown:
    in a source (log file) that marks it on any answer, the unmarked answers were not retried
    (0). Logs mark the answers a user regenerated ("retried": true, a regeneration found by
    `--merge-history`) and say nothing of the rest; read as unknown, the retry label knew
    only bad answers and every cluster's retry rate read 100 %."""
    values = _column(frame, name)
    if "source" not in frame.columns:  # which answers share a log is not known: no inference
        return values
    logged = values.notna().groupby(_sources(frame)).transform("any").astype(bool)
    return values.where(values.notna() | ~logged, 0.0)


def _sources(frame: pd.DataFrame) -> pd.Series:
    sources = frame["source"] if "source" in frame.columns else pd.Series("", index=frame.index)
    return sources.astype(object).where(sources.notna(), "")


def _conversations_go_on(frame: pd.DataFrame, turns: pd.Series) -> pd.Series:
    """Per row: does its source hold any conversation with a user turn after an answer?"""
    went_on = (turns > 0).groupby(_sources(frame)).transform("any")
    return went_on.astype(bool)


def joint_labels(frame: pd.DataFrame, config: LabelConfig = LabelConfig()) -> Labels:
    """The α-weighted joint target per row; rows with no known signal get NaN and weight 0."""
    per_signal = signal_labels(frame, config)
    alphas = np.array([config.alpha(s) for s in SIGNALS])
    values = per_signal[list(SIGNALS)].to_numpy(dtype=float)
    known = ~np.isnan(values)
    w = known * alphas
    weight = w.sum(axis=1)
    total = np.where(known, values, 0.0) * alphas
    with np.errstate(invalid="ignore", divide="ignore"):
        label = np.where(weight > 0, total.sum(axis=1) / weight, np.nan)
    result = per_signal.add_prefix("label_")
    result.insert(0, "weight", weight)
    result.insert(0, "label", label)

    counts: dict[str, dict[str, int]] = {}
    for name in SIGNALS:
        v = per_signal[name]
        counts[name] = {
            "known": int(v.notna().sum()),
            "good": int((v >= 0.5).sum()),
            "bad": int((v < 0.5).sum()),
            "unknown": int(v.isna().sum()),
        }
    lab = pd.Series(label)
    counts["joint"] = {
        "known": int(lab.notna().sum()),
        "good": int((lab >= 0.5).sum()),
        "bad": int((lab < 0.5).sum()),
        "unknown": int(lab.isna().sum()),
    }
    return Labels(frame=result, counts=counts)
