"""Write the UI's export rows (`storage.views.export_rows`) as CSV, Parquet, JSONL or OpenAI
fine-tune JSONL, to a path or to bytes for a download.

Kept apart from app/export.py because the UI's rows carry the cluster, its display name, tags
and one column per scorer, whose set depends on the database. A file written to a path goes
to a `.partial` sibling first and is renamed into place, so a failed export leaves nothing.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy.engine import Engine

from storage.views import EXPORT_COLUMNS, ViewFilter, export_rows, score_names

FORMATS = {
    "csv": ("CSV", "text/csv", ".csv"),
    "parquet": ("Parquet", "application/vnd.apache.parquet", ".parquet"),
    "jsonl": ("JSONL", "application/jsonl", ".jsonl"),
    "openai": ("OpenAI fine-tune JSONL", "application/jsonl", ".jsonl"),
}
_TYPES: dict[str, pa.DataType] = {
    "turn_index": pa.int64(),
    "created_at": pa.timestamp("us"),
    "retried": pa.bool_(),
    "edited": pa.bool_(),
    "deleted": pa.bool_(),
    "rating": pa.float64(),
    "thumbs": pa.int64(),
    "user_turns_after": pa.int64(),
    "ended_conversation": pa.bool_(),
    "seconds_to_next_user_message": pa.float64(),
}

Batches = Iterable[list[dict[str, Any]]]


def columns(scorers: Iterable[str]) -> list[str]:
    return [*EXPORT_COLUMNS, *(f"score:{s}" for s in scorers)]


def arrow_schema(names: list[str]) -> pa.Schema:
    return pa.schema(
        [(n, pa.float64() if n.startswith("score:") else _TYPES.get(n, pa.string())) for n in names]
    )


def write(batches: Batches, names: list[str], format: str, handle: IO[bytes]) -> int:
    """Write rows to a binary handle; returns how many were written."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
    if format == "parquet":
        return _parquet(batches, names, handle)
    text = io.TextIOWrapper(handle, encoding="utf-8", newline="", write_through=True)
    try:
        if format == "csv":
            return _csv(batches, names, text)
        if format == "jsonl":
            return _jsonl(batches, text)
        return _openai(batches, text)
    finally:
        text.detach()


def export_bytes(
    engine: Engine,
    run_id: str | None,
    flt: ViewFilter,
    *,
    format: str,
    cluster_ids: tuple[str, ...] = (),
) -> bytes:
    """The whole export in memory (for a download button)."""
    buffer = io.BytesIO()
    names = columns(score_names(engine))
    write(export_rows(engine, run_id, flt, cluster_ids=cluster_ids), names, format, buffer)
    return buffer.getvalue()


def export_to_path(
    engine: Engine,
    run_id: str | None,
    flt: ViewFilter,
    out: Path,
    *,
    format: str,
    cluster_ids: tuple[str, ...] = (),
) -> int:
    """Write the export to `out` atomically; returns the row count."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    names = columns(score_names(engine))
    try:
        with partial.open("wb") as handle:
            rows = write(
                export_rows(engine, run_id, flt, cluster_ids=cluster_ids), names, format, handle
            )
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return rows


def _csv(batches: Batches, names: list[str], text: IO[str]) -> int:
    writer = csv.DictWriter(text, fieldnames=names)
    writer.writeheader()
    count = 0
    for batch in batches:
        writer.writerows(batch)
        count += len(batch)
    return count


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    plain = dict(row)
    if plain.get("created_at") is not None:
        plain["created_at"] = plain["created_at"].isoformat()
    plain["context"] = json.loads(plain["context"]) if plain.get("context") else []
    plain["tags"] = plain["tags"].split("; ") if plain.get("tags") else []
    return plain


def _jsonl(batches: Batches, text: IO[str]) -> int:
    count = 0
    for batch in batches:
        for row in batch:
            text.write(json.dumps(_plain(row), ensure_ascii=False) + "\n")
        count += len(batch)
    return count


def _openai(batches: Batches, text: IO[str]) -> int:
    """One {"messages": [...]} per exchange with an answer; the cluster and tags ride along
    as metadata, which OpenAI's fine-tuning ignores."""
    count = 0
    for batch in batches:
        for row in batch:
            if not row["response"]:
                continue
            messages = json.loads(row["context"]) if row["context"] else []
            if row["instruction"] and not any(m.get("role") == "system" for m in messages):
                messages.insert(0, {"role": "system", "content": row["instruction"]})
            messages.append({"role": "user", "content": row["prompt"]})
            messages.append({"role": "assistant", "content": row["response"]})
            record = {
                "messages": messages,
                "metadata": {
                    "exchange_id": row["id"],
                    "cluster_id": row["cluster_id"],
                    "cluster_label": row["cluster_label"],
                    "tags": row["tags"],
                },
            }
            text.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def _parquet(batches: Batches, names: list[str], handle: IO[bytes]) -> int:
    schema = arrow_schema(names)
    count = 0
    with pq.ParquetWriter(handle, schema) as writer:
        for batch in batches:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            count += len(batch)
    return count
