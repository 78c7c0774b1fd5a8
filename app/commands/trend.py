"""`trend`: the topics of the latest clustering over time, the ones that got worse first.

A cluster table says which topics go badly overall; a team that changed an instruction, a
route or a model last week asks whether the topic is better since. `storage.views` counts
each topic per day, week or month of its exchanges' own logged times, and `scoring.trend`
turns the counts into series and ranks the topics by how surely their reward fell.
"""

from __future__ import annotations

import argparse
from typing import Any

from app.commands.common import UserError, checked_window, no_clustering
from scoring.trend import topic_series, total_series
from storage.engine import open_database


def trend(args: argparse.Namespace) -> dict[str, Any]:
    """Each topic's figures per period and the change of its reward into the latest period,
    most worsened first; `total` is every clustered exchange's series."""
    from storage.clusters import latest_run, load_clusters
    from storage.views import ViewFilter, cluster_trend, reward_scorer

    since, until = checked_window(args.since, args.until)  # refused before the database is opened
    flt = ViewFilter(models=tuple(args.model or ()), since=since, until=until)
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
        found = cluster_trend(
            engine, run["id"], flt, scorer=scorer, period=args.by, cluster_id=args.cluster
        )
    finally:
        engine.dispose()
    return {
        "run_id": run["id"],
        "on": run["on_field"],
        "scorer": scorer,
        "period": found["period"],
        "periods": found["periods"],
        "models": list(flt.models),
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
        "undated": found["undated"],
        "total": total_series(found),
        "clusters": topic_series(found, names),
    }
