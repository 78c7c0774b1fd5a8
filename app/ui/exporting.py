"""The UI's export: the same rows and columns as `convoscope export` (app/export.py's row
builder and writers: cluster, its display name, parent group, tags, the latest reward and its
scorer), selected by the sidebar filter and optionally some clusters, as bytes for a download
or atomically to a path. JSONL rows also carry the stored metadata, as the CLI's do, so a UI
export ingests back whole (ingest/exported.py). Judged battles export apart, as the battles
JSONL that ingest reads (`convoscope export --format battles`)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from sqlalchemy.engine import Engine

from app.export import (
    COLUMNS,
    FORMATS,
    ExportSelection,
    battles_bytes,
    exchange_columns,
    export_battles,
    export_exchanges,
    file_columns,
    iter_export_rows,
    no_battles_message,
    provenance,
    write_rows,
)
from app.ui.launch import LAUNCH_DIR_ENV
from storage.logs import BattleFilter, ExchangeFilter
from storage.views import ViewFilter

__all__ = [
    "COLUMNS",
    "FORMATS",
    "battle_filter",
    "battles_bytes",
    "export_battles",
    "export_bytes",
    "export_to_path",
    "no_battles_message",
    "resolve_target",
]


def selection(
    run_id: str | None, flt: ViewFilter, cluster_ids: tuple[str, ...] = ()
) -> ExportSelection:
    """The sidebar filter as the CLI's selection: models, sources and dates select stored
    fields; tags match an exchange tagged itself or through its topic or group, as the
    sidebar's do; `run_id` is the clustering the pages show, whose topics the rows carry and
    `cluster_ids` are of (None: nothing is clustered, so there is no cluster to restrict to)."""
    return ExportSelection(
        run_id=run_id,
        where=ExchangeFilter(
            models=flt.models, sources=flt.sources, since=flt.since, until=flt.until
        ),
        clusters=cluster_ids if run_id is not None else (),
        tags=flt.tags,
    )


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
    # As `export_exchanges` does: JSONL and Parquet carry the stored metadata, Parquet where
    # it came from too.
    chosen = selection(run_id, flt, cluster_ids)
    rows = iter_export_rows(engine, chosen, columns=exchange_columns(format))
    write_rows(
        rows,
        file_columns(format),
        format,
        buffer,
        safe_for_spreadsheets=safe_for_spreadsheets,
        about=provenance(engine, chosen),
    )
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
    result = export_exchanges(
        engine,
        out,
        format=format,
        selection=selection(run_id, flt, cluster_ids),
        safe_for_spreadsheets=safe_for_spreadsheets,
    )
    return result.rows


def resolve_target(typed: str) -> Path:
    """The absolute path a typed "write to a file" target means: `~` expanded, and a relative
    path taken from the folder `convoscope ui` was run from (the server itself runs in the
    install folder, see launch.py), else from this process's folder."""
    path = Path(typed).expanduser()
    return (Path(os.environ.get(LAUNCH_DIR_ENV) or os.getcwd()) / path).resolve()


def battle_filter(flt: ViewFilter, sources: tuple[str, ...] = ()) -> BattleFilter:
    """The sidebar's models (either answer's) and the battles' own `sources`: the sidebar's
    sources, dates and tags are the exchanges' (a replay judge's verdicts have a source of
    their own, `judge:<run>`, and the answers of a battles file may be stored from another)."""
    return BattleFilter(models=flt.models, sources=sources)
