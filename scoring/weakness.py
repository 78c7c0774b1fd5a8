"""Which clusters are weakest: low reward that we are sure of, on traffic that matters.

Per cluster: mean reward with a bootstrap CI, retry / edit / end rates (over the rows where
the signal is known — an unknown signal is not a 0), and its share of traffic. The turns of
one conversation are not independent draws (one user, one task, often one frustration), so
when the rows carry their `conversation_id` the CI is also bootstrapped over whole
conversations (with fewer than 30, the wider of that interval and the rows' one is kept): a
topic filled by a few long chats is less sure than its row count says. Weakness is
the shortfall of the CI's lower bound below the overall mean reward, times the traffic share:
a small cluster whose CI is wide because it has few rows cannot outrank a large, surely bad
one, and a large cluster that is merely average scores 0. Each cluster carries a sentence
saying why it ranks where it does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

RATES = {"retry_rate": "retried", "edit_rate": "edited", "end_rate": "ended_conversation"}
_BOOTSTRAP_ELEMENTS = 1 << 22  # resampled values held at once (32 MiB of indices)
# Conversations enough for resampling them alone to give a fair interval (the usual rule of
# thumb for a cluster bootstrap); below, the exchanges' interval is a floor on its width.
TRUSTED_CONVERSATIONS = 30


@dataclass(frozen=True, slots=True)
class WeaknessConfig:
    """Bootstrap settings and when a rate is worth naming in the reason."""

    n_bootstrap: int = 1000
    ci: float = 0.95
    notable_ratio: float = 1.25  # a rate this many times the overall rate is named
    seed: int = 0


@dataclass(frozen=True, slots=True)
class ClusterWeakness:
    """One cluster's metrics and its place in the weakness ranking."""

    cluster_id: str
    n: int
    conversations: int | None  # distinct conversations among the rows; None when not given
    traffic_share: float
    mean_reward: float
    reward_lower: float
    reward_upper: float
    retry_rate: float | None  # None when no row of the cluster has the signal
    edit_rate: float | None
    end_rate: float | None
    weakness: float
    reason: str


def bootstrap_mean_ci(
    values: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of the non-NaN values and its percentile bootstrap interval.

    With `groups` (each value's conversation id) whole groups are resampled, each resample's
    mean being its values' mean: resampling values treats a 40-turn chat as 40 users. Under
    `TRUSTED_CONVERSATIONS` groups, too few for their resamples alone (one conversation gives
    a zero-width interval), the wider of that interval and the values' one is kept."""
    v = np.asarray(values, dtype=float)
    known = ~np.isnan(v)
    v = v[known]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if len(v) == 1 or n_bootstrap <= 0:
        return mean, mean, mean
    tail = (1.0 - ci) / 2.0
    quantiles = [tail, 1.0 - tail]
    by_group = None
    if groups is not None:
        # Numbered in order of appearance (hashing, not sorting: ids or codes number alike).
        codes, uniques = pd.factorize(np.asarray(groups)[known])
        if len(uniques) < len(v):  # some conversation has more than one row
            sums, counts = np.bincount(codes, weights=v), np.bincount(codes).astype(float)
            by_group = np.quantile(_resampled_means(sums, counts, n_bootstrap, seed), quantiles)
            if len(uniques) >= TRUSTED_CONVERSATIONS:
                return mean, float(min(by_group[0], mean)), float(max(by_group[1], mean))
    lo, hi = np.quantile(_resampled_means(v, None, n_bootstrap, seed), quantiles)
    if by_group is not None:
        lo, hi = min(lo, by_group[0]), max(hi, by_group[1])
    return mean, float(min(lo, mean)), float(max(hi, mean))


def _resampled_means(
    sums: np.ndarray, counts: np.ndarray | None, n_bootstrap: int, seed: int
) -> np.ndarray:
    """`n_bootstrap` means of units drawn with replacement: each unit (a value, or a whole
    conversation) adds its sum and its count of values (`counts`; None: one each).

    Resamples are drawn a block at a time so memory stays bounded: a parent group can hold
    most of a million-row log, and all resamples at once would need n_bootstrap × n indices.
    The generator yields the same stream in blocks, so the interval does not change."""
    rng = np.random.default_rng(seed)
    n = len(sums)
    block = max(1, _BOOTSTRAP_ELEMENTS // n)
    means = []
    for start in range(0, n_bootstrap, block):
        drawn = rng.integers(0, n, (min(block, n_bootstrap - start), n))
        if counts is None:
            means.append(sums[drawn].mean(axis=1))
        else:
            means.append(sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1))
    return np.concatenate(means)


def _rate(frame: pd.DataFrame, column: str) -> float | None:
    if column not in frame.columns:
        return None
    known = frame[column].dropna()
    return float(known.astype(float).mean()) if len(known) else None


def rank_clusters(
    frame: pd.DataFrame, *, config: WeaknessConfig = WeaknessConfig()
) -> list[ClusterWeakness]:
    """Clusters weakest first, from rows with `cluster_id`, `reward` and (optionally) the
    signal columns `retried`, `edited`, `ended_conversation` and the rows' `conversation_id`.
    """
    total = len(frame)
    if total == 0:
        return []
    # Conversation ids as integer codes once: hashed per cluster, strings cost 3× the ranking.
    conversations = (
        pd.Series(pd.factorize(frame["conversation_id"])[0], index=frame.index)
        if "conversation_id" in frame.columns
        else None
    )
    overall = float(frame["reward"].astype(float).mean())
    overall_rates = {name: _rate(frame, col) for name, col in RATES.items()}
    results = []
    for cid, rows in frame.groupby(frame["cluster_id"].astype(str), sort=True):
        groups = None if conversations is None else conversations[rows.index].to_numpy()
        mean, lo, hi = bootstrap_mean_ci(
            rows["reward"].to_numpy(dtype=float),
            groups=groups,
            n_bootstrap=config.n_bootstrap,
            ci=config.ci,
            seed=config.seed,
        )
        share = len(rows) / total
        shortfall = max(0.0, overall - lo) if not np.isnan(lo) else 0.0
        rates = {name: _rate(rows, col) for name, col in RATES.items()}
        chats = None if groups is None else len(pd.unique(groups))
        traffic = f"{share:.0%} of the clustered traffic"
        if chats is not None and chats < len(rows):
            traffic += f" ({len(rows)} exchanges from {chats} conversations)"
        results.append(
            ClusterWeakness(
                cluster_id=str(cid),
                n=len(rows),
                conversations=chats,
                traffic_share=share,
                mean_reward=mean,
                reward_lower=lo,
                reward_upper=hi,
                retry_rate=rates["retry_rate"],
                edit_rate=rates["edit_rate"],
                end_rate=rates["end_rate"],
                weakness=shortfall * share,
                reason=_reason(mean, lo, hi, overall, traffic, rates, overall_rates, config),
            )
        )
    # Equal weakness (0 for every cluster not below the overall mean) goes lowest mean reward
    # first, as `clusters` and the UI list topics: by the CI's lower bound, a group's weakest
    # topics put a wide-CI topic that does better before one that does worse.
    return sorted(results, key=lambda r: (-r.weakness, r.mean_reward, r.cluster_id))


def _reason(
    mean: float,
    lo: float,
    hi: float,
    overall: float,
    traffic: str,
    rates: dict[str, float | None],
    overall_rates: dict[str, float | None],
    config: WeaknessConfig,
) -> str:
    """A sentence a person can act on: how bad, how sure, how much traffic (`traffic`, said
    already), which signals."""
    if np.isnan(mean):
        return f"no reward scores yet; {traffic}"
    if hi < overall:
        verdict = "surely below"
    elif lo < overall:
        verdict = "possibly below" if mean < overall else "not clearly different from"
    else:
        verdict = "above"
    parts = [
        # "clustered": the unassigned are in no topic's data, so this is not the mean of every
        # exchange the UI's headline shows, and "the overall" read as that one. The verdict
        # leads: the UI's narrow Why column shows a reason's start, and the figures after it
        # stand in its own columns beside.
        f"{verdict} the clustered mean {overall:.3f}: mean reward {mean:.3f} [{lo:.3f}, {hi:.3f}]",
        traffic,
    ]
    for name, value in rates.items():
        base = overall_rates[name]
        if value is not None and base and value >= config.notable_ratio * base:
            label = name.replace("_", " ")
            parts.append(f"{label} {value:.0%} vs {base:.0%} over clustered exchanges")
    return "; ".join(parts)
