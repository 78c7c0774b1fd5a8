"""`trend`: the topics of the latest clustering over time, the ones that got worse first.

A cluster table says which topics go badly overall; a team that changed an instruction, a
route or a model last week asks whether the topic is better since. So each topic gets a
series per day, week or month of its exchanges' own logged times: exchanges, mean reward,
retry and end rates, and the change of its reward from the period before the latest to the
latest.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from app.commands.common import UserError, no_clustering, time_window
from storage.engine import open_database

_FIGURES = ("exchanges", "scored", "reward_mean", "reward_sd", "retry_rate", "end_rate")
Z95 = 1.959964  # a 95 % normal interval


def trend(args: argparse.Namespace) -> dict[str, Any]:
    """Each topic's figures per period and the change of its reward into the latest period,
    most worsened first; `total` is every clustered exchange's series."""
    from storage.clusters import latest_run, load_clusters
    from storage.views import ViewFilter, cluster_trend, reward_scorer

    engine = open_database(args.db, read_only=True)  # reads only: beside other readers
    try:
        run = latest_run(engine, on_field=args.on)
        if run is None:
            return {"run_id": None, "on": args.on, "hint": no_clustering(engine, args.on)}
        names = {c["id"]: c["name"] for c in load_clusters(engine, run["id"]) if c["level"] == 0}
        if args.cluster is not None and args.cluster not in names:
            raise UserError(
                f"no topic {args.cluster!r} in the latest clustering on {run['on_field']} "
                f"(run {run['id']}): `convoscope clusters --level 0` lists its topics"
            )
        scorer = reward_scorer(engine)
        since, until = time_window(args)
        flt = ViewFilter(models=tuple(args.model or ()), since=since, until=until)
        found = cluster_trend(
            engine, run["id"], flt, scorer=scorer, period=args.by, cluster_id=args.cluster
        )
    finally:
        engine.dispose()
    periods = found["periods"]
    by_cluster: dict[str | None, dict[str, dict[str, Any]]] = {}
    for row in found["rows"]:
        by_cluster.setdefault(row["cluster_id"], {})[row["start"]] = row
    topics = [
        {"id": cid, "name": names.get(cid, cid) if cid else None, **_series(rows, periods)}
        for cid, rows in by_cluster.items()
    ]
    topics.sort(key=_most_worsened_first)
    return {
        "run_id": run["id"],
        "on": run["on_field"],
        "scorer": scorer,
        "period": found["period"],
        "periods": periods,
        "models": list(flt.models),
        "undated": found["undated"],
        "total": _series({r["start"]: r for r in found["totals"]}, periods),
        "clusters": topics,
    }


def _series(rows: dict[str, dict[str, Any]], periods: list[str]) -> dict[str, Any]:
    """A period-by-period series (no exchanges: 0 and no rates) and the reward's change from
    the period before the latest to the latest, where both have scored exchanges, with its
    95 % interval where both have two or more (a normal interval on the difference of means:
    a period of a handful of exchanges moves a lot by chance, and says so)."""
    series = []
    for start in periods:
        row = rows.get(start)
        figures = {name: row[name] for name in _FIGURES} if row else _empty()
        series.append({"start": start, **figures})
    change = low = high = None
    if len(series) >= 2 and series[-1]["scored"] and series[-2]["scored"]:
        before, latest = series[-2], series[-1]
        change = latest["reward_mean"] - before["reward_mean"]
        if before["reward_sd"] is not None and latest["reward_sd"] is not None:
            error = math.sqrt(
                before["reward_sd"] ** 2 / before["scored"]
                + latest["reward_sd"] ** 2 / latest["scored"]
            )
            low, high = change - Z95 * error, change + Z95 * error
    return {"series": series, "reward_change": change, "reward_change_ci": _ci(low, high)}


def _ci(low: float | None, high: float | None) -> list[float] | None:
    return None if low is None or high is None else [low, high]


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
