"""Topics over time: each topic's series per period and how surely its reward fell into the
latest period, from the counts `storage.views.cluster_trend` reads.

The change compares the latest period with the one before, not with a long baseline: after a
team changes an instruction, a route or a model, the period it shipped in is the one that
moves. A period of a handful of exchanges moves a lot by chance, so the change carries a 95 %
interval, and topics are ranked by its upper end (surest falls first), as the weakness
ranking goes by a lower bound.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

_FIGURES = ("exchanges", "scored", "reward_mean", "reward_sd", "retry_rate", "end_rate")
Z95 = 1.959964  # a 95 % normal interval


def topic_series(found: dict[str, Any], names: dict[str, str]) -> list[dict[str, Any]]:
    """Each topic of `found` (`cluster_trend`'s result) with its name, `series` and reward
    change, surest falls first; the exchanges no topic holds (id None) come last."""
    by_cluster: dict[str | None, dict[str, dict[str, Any]]] = {}
    for row in found["rows"]:
        by_cluster.setdefault(row["cluster_id"], {})[row["start"]] = row
    topics = [
        {"id": cid, "name": names.get(cid, cid) if cid else None, **_series(rows, found)}
        for cid, rows in by_cluster.items()
    ]
    topics.sort(key=_most_worsened_first)
    return topics


def total_series(found: dict[str, Any]) -> dict[str, Any]:
    """Every exchange's series and reward change, as a topic's."""
    return _series({row["start"]: row for row in found["totals"]}, found)


def surely_worse(topics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The topics whose reward fell into the latest period by more than chance explains
    across all of them: each change's interval is widened for the number of topics compared
    (Bonferroni, 95 % for the family), so among 40 steady topics none is named by chance,
    where a 95 % interval each would name about one."""
    compared = [t for t in topics if t["id"] is not None and t["reward_change_se"] is not None]
    if not compared:
        return []
    z = NormalDist().inv_cdf(1 - 0.025 / len(compared))
    return [t for t in compared if t["reward_change"] + z * t["reward_change_se"] < 0]


def _series(rows: dict[str, dict[str, Any]], found: dict[str, Any]) -> dict[str, Any]:
    """A period-by-period series (no exchanges: 0 and no rates) and the reward's change from
    the period before the latest to the latest, where both have scored exchanges, with its
    95 % interval where both have two or more (a normal interval on the difference of means:
    a period of a handful of exchanges moves a lot by chance, and says so)."""
    series = []
    for start in found["periods"]:
        row = rows.get(start)
        figures = {name: row[name] for name in _FIGURES} if row else _empty()
        series.append({"start": start, **figures})
    change = error = None
    if len(series) >= 2 and series[-1]["scored"] and series[-2]["scored"]:
        before, latest = series[-2], series[-1]
        change = latest["reward_mean"] - before["reward_mean"]
        if before["reward_sd"] is not None and latest["reward_sd"] is not None:
            error = math.sqrt(
                before["reward_sd"] ** 2 / before["scored"]
                + latest["reward_sd"] ** 2 / latest["scored"]
            )
    ci = None if change is None or error is None else [change - Z95 * error, change + Z95 * error]
    return {
        "series": series,
        "reward_change": change,
        "reward_change_se": error,
        "reward_change_ci": ci,
    }


def _empty() -> dict[str, Any]:
    return {name: 0 if name in {"exchanges", "scored"} else None for name in _FIGURES}


def _most_worsened_first(topic: dict[str, Any]) -> tuple[Any, ...]:
    """Topics surest to have worsened into the latest period first: by the upper end of the
    change's interval (as the weakness ranking goes by a lower bound), then by the change
    where there is no interval; topics without a change follow, largest first, and the
    exchanges no topic holds come last."""
    change, ci = topic["reward_change"], topic["reward_change_ci"]
    size = sum(point["exchanges"] for point in topic["series"])
    return (
        topic["id"] is None,
        change is None,
        ci is None,
        ci[1] if ci else change or 0.0,
        -size,
    )
