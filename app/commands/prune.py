"""`prune`: remove stored models, score rows and superseded clustering runs that nothing reads
any more, so a database scored and clustered again and again does not grow without bound
(storage/prune.py says what is kept)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from app.commands.common import file_bytes, note, safe_url
from storage.engine import database_file, open_database, resolve_url

# Versions of each kind, and clustering runs of each field: the newest, and two to look back at.
DEFAULT_KEEP = 3


def prune(args: argparse.Namespace) -> dict[str, Any]:
    """Plan the prune; unless `--dry-run`, delete in one transaction and give the space back
    where the engine can in place. The summary lists what went (or would go): artefacts with
    their bytes, clustering runs with their rows, and the database file's size before and
    after."""
    from storage.prune import plan_prune, prune_stored, reclaim_space

    path = database_file(resolve_url(args.db))
    before = file_bytes(path)
    engine = open_database(args.db, existing=True)
    try:
        plan = plan_prune(engine, keep=args.keep)
        removing = not args.dry_run and not plan.empty
        if removing:
            prune_stored(engine, plan)
            reclaim_space(engine)
        backend = engine.dialect.name
    finally:
        engine.dispose()  # DuckDB writes its last checkpoint here: measure after it
    if removing and backend == "duckdb" and path is not None:
        note(_duckdb_compaction(path))
    return {
        "db": safe_url(args.db),
        "backend": backend,
        "dry_run": args.dry_run,
        "keep": args.keep,
        "removed": [
            {
                "id": a.id,
                "kind": a.kind,
                "created_at": a.created_at,
                "bytes": a.bytes,
                "score_rows": plan.score_rows.get(f"reward:{a.id}", 0),
            }
            for a in plan.remove
        ],
        "kept": [{"id": a.id, "kind": a.kind, "created_at": a.created_at} for a in plan.keep],
        "scorers_in_use": list(plan.scorers_in_use),
        "bytes": plan.bytes,
        "score_rows": sum(plan.score_rows.values()),
        "scorers": plan.score_rows,
        "removed_runs": [
            {
                "id": r.id,
                "on": r.on_field,
                "created_at": r.created_at,
                "clusters": r.clusters,
                "rows": r.rows,
            }
            for r in plan.remove_runs
        ],
        "kept_runs": [
            {"id": r.id, "on": r.on_field, "created_at": r.created_at} for r in plan.keep_runs
        ],
        "run_rows": plan.run_rows,
        "retired_cluster_ids": list(plan.retire),
        "file_bytes_before": before,
        "file_bytes_after": file_bytes(path) if removing else before,
    }


def _duckdb_compaction(path: Path) -> str:
    """How to shrink a DuckDB file after a prune: DuckDB reuses a deleted row's space only
    once its whole row group is gone, and VACUUM reclaims nothing, so the way to get the disk
    back is a copy (tables, keys, indexes and the schema version come along). The command
    runs this Python, which has duckdb: a bare `python` outside the venv may not."""
    new = path.with_name(path.stem + "-compact" + path.suffix)
    sql = (
        f"ATTACH '{path}' AS old (READ_ONLY); ATTACH '{new}' AS new; COPY FROM DATABASE old TO new"
    )
    script = f"import duckdb; duckdb.connect().execute({sql!r})"
    return (
        "DuckDB keeps most of the removed rows' space inside the file; to shrink it, stop "
        "other convoscope commands on it and copy it to a new file, then replace the old one: "
        f"{shlex.quote(sys.executable)} -c {shlex.quote(script)} && "
        f"mv {shlex.quote(str(new))} {shlex.quote(str(path))}"
    )
