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
    BattleExportResult,
    battles_bytes,
    export_battles,
    write_file,
    write_rows,
)
from storage.logs import BattleFilter
from storage.views import EXPORT_COLUMNS, ViewFilter, export_rows, score_names

__all__ = [
    "FORMATS",
    "battle_filter",
    "battles_download",
    "battles_to_path",
    "columns",
    "export_bytes",
    "export_to_path",
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
    """Write the export to `out` atomically; returns the row count."""
    names = columns(score_names(engine))
    batches = export_rows(
        engine, run_id, flt, cluster_ids=cluster_ids, with_metadata=format == "jsonl"
    )
    return write_file(batches, names, format, out, safe_for_spreadsheets=safe_for_spreadsheets)


def battle_filter(flt: ViewFilter) -> BattleFilter:
    """The sidebar's models (either answer's) and sources, as battles take them; its dates
    and tags select exchanges, not battles."""
    return BattleFilter(models=flt.models, sources=flt.sources)


def battles_download(engine: Engine, flt: ViewFilter) -> bytes:
    """The filtered battles as battles JSONL, in memory (for a download button)."""
    return battles_bytes(engine, where=battle_filter(flt))


def battles_to_path(engine: Engine, flt: ViewFilter, out: Path) -> BattleExportResult:
    """Write the filtered battles to `out` atomically, checking that they ingest back."""
    return export_battles(engine, out, where=battle_filter(flt))
