"""`ingest` and `export`: logs into the database and exchanges or battles out of it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from app.commands.common import (
    NothingDone,
    UserError,
    checked_window,
    clustering_used,
    no_clustering,
    note,
    safe_url,
    warn,
)
from app.export import (
    BATTLES,
    ExportSelection,
    check_battles_out_path,
    check_spreadsheet_safe,
    export_battles,
    export_exchanges,
    guess_format,
    matching_sources,
    no_battles_message,
    why_empty,
    why_no_battles,
)
from ingest.files import LOG_SUFFIXES, log_files_in
from ingest.pipeline import IngestConfig, ingest_paths
from storage.clusters import latest_run, latest_runs
from storage.engine import open_database
from storage.logs import BattleFilter, ExchangeFilter, battle_options


def ingest(args: argparse.Namespace) -> dict[str, Any]:
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    config = ingest_config(args, batch_size=args.batch_size)
    paths = log_paths(args.paths, args.rejects)
    engine = open_database(args.db)
    try:
        summary = ingest_paths(paths, engine=engine, config=config)
    finally:
        engine.dispose()
    result = {"db": safe_url(args.db), **summary.as_dict()}
    warn_ingest(result)
    if summary.unread_files == summary.files and not summary.read:
        raise NothingDone("no file could be read (see the warnings above)", result)
    return result


def warn_ingest(summary: dict[str, Any]) -> None:
    """The summary's warnings on stderr: a file rejected whole would otherwise be a count."""
    for message in summary["warnings"]:
        warn(message)


def log_paths(paths: list[Path], rejects: Path | None) -> list[Path]:
    """The files to ingest: each file as given, each folder as the log files below it but the
    `--rejects` file (the same command run again found its own rejects file among them)."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UserError(f"no such file: {', '.join(missing)}")
    files: list[Path] = []
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        found = log_files_in(path)
        if rejects is not None:
            found = [f for f in found if f.resolve() != rejects.expanduser().resolve()]
        if not found:
            names = ", ".join(f"*{s}" for s in LOG_SUFFIXES)
            raise UserError(f"no log files in folder {path} (looked for {names}, also .gz)")
        files += found
    return files


def ingest_config(args: argparse.Namespace, **extra: Any) -> IngestConfig:
    return IngestConfig(
        format=args.format,
        mapping=args.map,
        max_line_bytes=int(args.max_line_mb * 1024 * 1024),
        rejects_path=args.rejects,
        merge_history=args.merge_history,
        **extra,
    )


def export(args: argparse.Namespace) -> dict[str, Any]:
    if args.format == BATTLES:
        return _export_battles(args)
    format = args.format or guess_format(args.out)
    check_spreadsheet_safe(format, args.spreadsheet_safe)  # before the database is opened
    since, until = checked_window(args.since, args.until)
    engine = open_database(args.db, read_only=True)  # export only reads: no write lock
    try:
        sources = matching_sources(engine, args.source)
        run = latest_run(engine, args.on)
        unclustered = None if run else no_clustering(engine, args.on)
        elsewhere = run is None and bool(latest_runs(engine))  # another field is clustered
        selection = ExportSelection(
            run_id=run["id"] if run else None,
            where=ExchangeFilter(
                models=tuple(args.model), sources=sources, since=since, until=until
            ),
            clusters=tuple(args.cluster),
            tags=tuple(args.tag),
            min_reward=args.min_reward,
            max_reward=args.max_reward,
        )
        result = export_exchanges(
            engine,
            args.out,
            format=format,
            selection=selection,
            safe_for_spreadsheets=args.spreadsheet_safe,
        )
        if not result.rows:
            for reason in why_empty(engine, selection, unclustered or ""):
                warn(f"no rows exported: {reason}")
    finally:
        engine.dispose()
    summary: dict[str, Any] = {
        "path": result.path,
        "format": result.format,
        "rows": result.rows,
        "clustering": clustering_used(args.on, run),
    }
    if elsewhere and result.rows:
        note(f"the rows carry no cluster: {unclustered}")
    if format == "openai":
        summary["without_answer"] = result.without_answer
        if result.without_answer:
            note(
                f"{result.without_answer} selected exchanges are saved inputs without an answer "
                "(replay them to get one) and were left out: a fine-tune record needs its answer"
            )
    if not result.rows:
        raise NothingDone(_nothing_written(args.out), summary)
    if format == "csv":
        summary["formula_cells"] = result.formula_cells
        summary["spreadsheet_safe"] = args.spreadsheet_safe
        if result.formula_cells and not args.spreadsheet_safe:
            note(
                f"{result.formula_cells} cells start with =, +, -, @, a tab or a carriage "
                "return and would run as formulas in a spreadsheet; --spreadsheet-safe "
                "prefixes them with ' (written as stored for pandas and other readers)"
            )
    return summary


def _nothing_written(out: Path) -> str:
    kept = "; the file already there is left as it was" if out.exists() else ""
    return f"nothing matched the filters, so nothing was written to {out}{kept}"


def _export_battles(args: argparse.Namespace) -> dict[str, Any]:
    """`export --format battles`: the judged battles as battles JSONL, which ingest reads."""
    exchange_only = {
        "--cluster": args.cluster,
        "--tag": args.tag,
        "--min-reward": args.min_reward is not None,
        "--max-reward": args.max_reward is not None,
        "--spreadsheet-safe": args.spreadsheet_safe,
        "--since": args.since is not None,
        "--until": args.until is not None,
    }
    given = [flag for flag, value in exchange_only.items() if value]
    if given:
        verb = "selects" if len(given) == 1 else "select"
        raise UserError(
            f"{', '.join(given)} {verb} exchanges: a battles export takes --model (either "
            "answer's) and --source"
        )
    check_battles_out_path(args.out)  # before the database is opened
    engine = open_database(args.db, read_only=True)  # export only reads: no write lock
    try:
        options = battle_options(engine)
        if not options["battles"]:
            raise UserError(no_battles_message())
        where = BattleFilter(
            models=tuple(args.model),
            sources=matching_sources(engine, args.source, stored=options["sources"]),
        )
        result = export_battles(engine, args.out, where=where)
        if not result.rows:
            for reason in why_no_battles(engine, where):
                warn(f"no battles exported: {reason}")
    finally:
        engine.dispose()
    if not result.rows:
        summary = {"path": result.path, "format": result.format, "rows": 0, "not_round_trip": 0}
        raise NothingDone(_nothing_written(args.out), {**summary, "not_round_trip_reasons": {}})
    for reason, count in result.not_round_trip.items():
        warn(
            f"{count} of {result.rows} battles will not ingest back under their own ids "
            f"(battle {result.examples[reason]} is one): {reason}"
        )
    return {
        "path": result.path,
        "format": result.format,
        "rows": result.rows,
        "not_round_trip": sum(result.not_round_trip.values()),
        "not_round_trip_reasons": result.not_round_trip,
    }
