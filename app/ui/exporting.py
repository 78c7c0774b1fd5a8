"""The UI's export: the filtered rows of `storage.views.export_rows` (cluster, its display name,
tags and one `score:<scorer>` column per scorer) through the writers of app/export.py, as bytes
for a download or atomically to a path. JSONL rows also carry the stored metadata, as the
CLI's do, so a UI export ingests back whole (ingest/exported.py). Judged battles export
apart, as the battles JSONL that ingest reads (`convoscope export --format battles`)."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy.engine import Engine

from app.export import (
    FORMATS,
    battles_bytes,
    check_not_the_database,
    check_out_path,
    export_battles,
    no_battles_message,
    write_file,
    write_rows,
)
from storage.logs import BattleFilter
from storage.views import EXPORT_COLUMNS, ViewFilter, export_rows, score_names

__all__ = [
    "FORMATS",
    "battle_filter",
    "battles_bytes",
    "columns",
    "export_battles",
    "export_bytes",
    "export_to_path",
    "no_battles_message",
]


def columns(scorers: Iterable[str]) -> list[str]:
    return [*EXPORT_COLUMNS, *(f"score:{s}" for s in scorers)]


def export_bytes(
    engine: Engine,
    run_id: str | None,
    flt: ViewFilter,
    *,
    format: str,
    cluster_ids: tuple[str, ...] = (),
    safe_for_spreadsheets: bool = False,
) -> bytes:
    """The whole export in memory (for a download button)."""
    buffer = io.BytesIO()
    names = columns(score_names(engine))
    rows = export_rows(
        engine, run_id, flt, cluster_ids=cluster_ids, with_metadata=format == "jsonl"
    )
    write_rows(rows, names, format, buffer, safe_for_spreadsheets=safe_for_spreadsheets)
    return buffer.getvalue()


def export_to_path(
    engine: Engine,
    run_id: str | None,
    flt: ViewFilter,
    out: Path,
    *,
    format: str,
    cluster_ids: tuple[str, ...] = (),
    safe_for_spreadsheets: bool = False,
) -> int:
    """Write the export to `out` atomically; returns the row count. ValueError for a path
    that cannot be written or is the database itself."""
    check_out_path(out, format)
    check_not_the_database(engine, out)
    names = columns(score_names(engine))
    batches = export_rows(
        engine, run_id, flt, cluster_ids=cluster_ids, with_metadata=format == "jsonl"
    )
    return write_file(batches, names, format, out, safe_for_spreadsheets=safe_for_spreadsheets)


def battle_filter(flt: ViewFilter, sources: tuple[str, ...] = ()) -> BattleFilter:
    """The sidebar's models (either answer's) and the battles' own `sources`: the sidebar's
    sources, dates and tags are the exchanges' (a replay judge's verdicts have a source of
    their own, `judge:<run>`, and the answers of a battles file may be stored from another)."""
    return BattleFilter(models=flt.models, sources=sources)
