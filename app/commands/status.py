"""`status`: what the database holds, how far each step has got, and the commands that would
bring it up to date, without opening the UI.

Read-only and cheap: counts and a few small rows (storage/status.py), never an exchange's
text, so it answers at once on a million exchanges and runs beside the UI or an export.
"""

from __future__ import annotations

import argparse
from typing import Any

from sqlalchemy.engine import Engine

from app.commands.common import file_bytes, safe_url
from storage.clusters import DEFAULT_ON, latest_runs
from storage.engine import database_file, open_database, resolve_url
from storage.logs import table_counts
from storage.models import model_ids, model_info
from storage.replay import judge_statuses, list_runs
from storage.reports import stale_reports
from storage.scores import latest_scorer
from storage.status import ingest_summary, run_counts, schema_revision, unscored, vector_counts

REWARD = "reward:"  # the prefix of reward scorers: `reward:<model id>`


def status(args: argparse.Namespace) -> dict[str, Any]:
    """The database's contents and the next commands to run. A missing database file is an
    error, as for `clusters`: a mistyped --db would otherwise be created empty."""
    engine = open_database(args.db, read_only=True)
    try:
        result = {
            "database": {
                "url": safe_url(args.db),
                "backend": engine.dialect.name,
                "schema_revision": schema_revision(engine),
                "file_bytes": file_bytes(database_file(resolve_url(args.db))),
            },
            "logs": table_counts(engine) | ingest_summary(engine),
            "embeddings": vector_counts(engine),
            "clusterings": [_clustering(engine, run) for run in latest_runs(engine)],
            "scoring": _scoring(engine),
            "replay": _replay(engine),
        }
    finally:
        engine.dispose()
    return result | {"next": next_steps(result)}


def _clustering(engine: Engine, run: dict[str, Any]) -> dict[str, Any]:
    """The latest clustering of one `on` field, with how much of the log it covers."""
    return {
        "on": run["on_field"],
        "run_id": run["id"],
        "created_at": run["created_at"],
        "embedder": run["embedder"],
        **run_counts(engine, run["id"]),
        "reports_stale": stale_reports(engine, run["id"]) is not None,
    }


def _scoring(engine: Engine) -> dict[str, Any]:
    """The reward scores the reports and the UI read (the newest reward scorer) and the model
    that gave them, with the exchanges it has not scored; the newest win predictor and routing
    table."""
    scorer = latest_scorer(engine, REWARD)
    model = model_info(engine, scorer.removeprefix(REWARD)) if scorer else None
    predictors, tables = model_ids(engine, "win_predictor"), model_ids(engine, "routing_table")
    return {
        "reward_scorer": scorer,
        "reward_model": None
        if model is None
        else {k: model[k] for k in ("id", "kind", "created_at", "metrics")},
        "unscored": unscored(engine, scorer) if scorer else None,
        "win_predictor": predictors[0] if predictors else None,
        "routing_table": tables[0] if tables else None,
    }


def _replay(engine: Engine) -> dict[str, Any]:
    """Replay and judge runs, and those not done: running in a live process, or stopped
    ("incomplete") and waiting to be resumed."""
    runs = list_runs(engine)
    judges = [
        (run["id"], judge, state)
        for run in runs
        for judge, state in judge_statuses(engine, run["id"]).items()
    ]
    return {
        "runs": len(runs),
        "judge_runs": len(judges),
        "open": [
            {"run_id": run["id"], "model": run["model"], "status": run["status"], **run["counts"]}
            for run in runs
            if run["status"] != "done"
        ],
        "open_judges": [
            {"run_id": run_id, "judge": judge, "status": state}
            for run_id, judge, state in judges
            if state != "done"
        ],
    }


def next_steps(status: dict[str, Any]) -> list[dict[str, str]]:
    """The commands that would bring the database up to date, in the order to run them, each
    with why."""
    steps: list[dict[str, str]] = []

    def add(command: str, why: str) -> None:
        if all(step["command"] != command for step in steps):
            steps.append({"command": command, "why": why})

    logs, scoring = status["logs"], status["scoring"]
    if not logs["exchanges"]:
        add("convoscope ingest FILE", "nothing is stored yet: read your chat logs in")
        add("convoscope demo", "or run the whole job on a ShareGPT sample")
        return steps
    if not status["clusterings"]:
        if not status["embeddings"]:
            add("convoscope embed", "no exchange is embedded yet")
        add("convoscope cluster", "nothing is clustered yet")
    for run in status["clusterings"]:
        if run["not_placed"]:
            add(
                f"convoscope assign{_on(run)}",
                f"{run['not_placed']} exchanges came after the {run['on']} clustering",
            )
    if scoring["reward_scorer"] is None:
        add("convoscope score", "nothing is scored yet")
    elif scoring["unscored"]:
        add("convoscope score reward apply", f"{scoring['unscored']} exchanges have no reward")
    for run in status["clusterings"] if scoring["reward_scorer"] else ():
        if run["reports_stale"]:
            add(f"convoscope score{_on(run)}", f"the {run['on']} reports predate the rewards")
        elif not run["reports"]:
            add(f"convoscope score{_on(run)}", f"the {run['on']} topics are not scored yet")
    return steps + _replay_steps(status["replay"])


def _replay_steps(replay: dict[str, Any]) -> list[dict[str, str]]:
    """Resume what a killed or interrupted replay or judge left; a running one is left be."""
    steps = [
        {
            "command": f"convoscope replay --resume {run['run_id']}",
            "why": f"replay {run['run_id']} stopped with {run['pending'] + run['failed']} "
            "inputs unanswered",
        }
        for run in replay["open"]
        if run["status"] == "incomplete"
    ]
    steps += [
        {
            "command": f"convoscope replay judge {j['run_id']} --model {j['judge']} --base-url URL",
            "why": f"judge {j['judge']} stopped before every verdict",
        }
        for j in replay["open_judges"]
        if j["status"] == "incomplete"
    ]
    return steps


def _on(run: dict[str, Any]) -> str:
    """The `--on` a command needs to act on this run's field ("" for the default)."""
    return "" if run["on"] == DEFAULT_ON else f" --on {run['on']}"
