"""Export stored exchanges as CSV, Parquet, JSONL or OpenAI fine-tune JSONL.

Rows stream from storage in batches, so an export of millions of rows runs in bounded memory.
Every row carries the ids a user needs to join it back to their own data (`external_id`,
`conversation_id`, `turn_index`, `model`), every signal, its cluster (id and label, a
person's name winning), tags and reward score. The file is written next to its target and
renamed into place at the end, so a failed export never leaves half a file behind.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy.engine import Engine

from storage.clusters import (
    exchanges_in_clusters,
    latest_run,
    load_assignments,
    load_clusters,
    load_tags,
)
from storage.logs import ExchangeFilter, iter_exchanges
from storage.scores import latest_scorer, load_scores

ExportFormat = Literal["csv", "parquet", "jsonl", "openai"]
FORMATS: tuple[str, ...] = ("csv", "parquet", "jsonl", "openai")

# Column order and Parquet types of every export (explicit, so all-NULL batches type right).
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("external_id", pa.string()),
        ("conversation_id", pa.string()),
        ("turn_index", pa.int64()),
        ("model", pa.string()),
        ("source", pa.string()),
        ("created_at", pa.timestamp("us")),
        ("instruction", pa.string()),
        ("context", pa.string()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("retried", pa.bool_()),
        ("edited", pa.bool_()),
        ("deleted", pa.bool_()),
        ("rating", pa.float64()),
        ("thumbs", pa.int64()),
        ("user_turns_after", pa.int64()),
        ("ended_conversation", pa.bool_()),
        ("seconds_to_next_user_message", pa.float64()),
        ("cluster_id", pa.string()),
        ("cluster_label", pa.string()),
        ("parent_cluster_id", pa.string()),
        ("tags", pa.string()),  # comma-separated: the exchange's own and its cluster's
        ("reward", pa.float64()),
        ("reward_scorer", pa.string()),
    ]
)
EXCHANGE_COLUMNS: tuple[str, ...] = tuple(SCHEMA.names[: SCHEMA.get_field_index("cluster_id")])
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)


@dataclass(frozen=True, slots=True)
class ExportSelection:
    """Which exchanges to export: stored-field filters plus cluster, tag and reward bounds."""

    where: ExchangeFilter = field(default_factory=ExchangeFilter)
    clusters: tuple[str, ...] = ()  # topic or parent ids of the latest clustering
    tags: tuple[str, ...] = ()
    min_reward: float | None = None
    max_reward: float | None = None


@dataclass(frozen=True, slots=True)
class ExportResult:
    path: str
    format: str
    rows: int


def guess_format(path: Path) -> str:
    """The export format a file name implies (`.parquet`, `.csv`, `.jsonl`), else jsonl."""
    suffix = path.suffix.lower().lstrip(".")
    return suffix if suffix in {"csv", "parquet", "jsonl"} else "jsonl"


def export_exchanges(
    engine: Engine,
    out: Path,
    *,
    format: str | None = None,
    selection: ExportSelection | None = None,
) -> ExportResult:
    """Write the selected exchanges to `out` in `format`; returns how many rows were written."""
    chosen = format or guess_format(out)
    if chosen not in FORMATS:
        raise ValueError(f"unknown export format {chosen!r}: choose one of {', '.join(FORMATS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    batches = iter_export_rows(engine, selection or ExportSelection())
    writer = {"csv": _write_csv, "parquet": _write_parquet, "jsonl": _write_jsonl}.get(
        chosen, _write_openai
    )
    try:
        rows = writer(batches, partial)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return ExportResult(path=str(out), format=chosen, rows=rows)


def iter_export_rows(engine: Engine, selection: ExportSelection) -> Iterator[list[dict[str, Any]]]:
    """Selected exchanges in batches, each row carrying its cluster, tags and reward."""
    run = latest_run(engine)
    assignment = load_assignments(engine, run["id"]) if run else {}
    clusters = {c["id"]: c for c in load_clusters(engine, run["id"])} if run else {}
    exchange_tags = load_tags(engine, "exchange")
    scorer = latest_scorer(engine, "reward:")
    rewards = load_scores(engine, scorer) if scorer else {}
    wanted = _selected_ids(engine, run["id"] if run else None, selection, exchange_tags)
    for batch in iter_exchanges(engine, where=selection.where, columns=EXCHANGE_COLUMNS):
        rows = []
        for row in batch:
            if wanted is not None and row["id"] not in wanted:
                continue
            reward = rewards.get(row["id"])
            if selection.min_reward is not None and (
                reward is None or reward < selection.min_reward
            ):
                continue
            if selection.max_reward is not None and (
                reward is None or reward > selection.max_reward
            ):
                continue
            cluster = clusters.get(assignment.get(row["id"]) or "")
            tags = set(exchange_tags.get(row["id"], ())) | set(cluster["tags"] if cluster else ())
            rows.append(
                {
                    **row,
                    "cluster_id": cluster["id"] if cluster else None,
                    "cluster_label": cluster["name"] if cluster else None,
                    "parent_cluster_id": cluster["parent_id"] if cluster else None,
                    "tags": ",".join(sorted(tags)) or None,
                    "reward": reward,
                    "reward_scorer": scorer if reward is not None else None,
                }
            )
        if rows:
            yield rows


def _selected_ids(
    engine: Engine,
    run_id: str | None,
    selection: ExportSelection,
    exchange_tags: dict[str, list[str]],
) -> set[str] | None:
    """Ids allowed by the cluster and tag filters (both must hold), or None for no filter."""
    wanted: set[str] | None = None
    if selection.clusters:
        wanted = set()
        for cluster_id in selection.clusters:
            if run_id:
                wanted.update(exchanges_in_clusters(engine, run_id, cluster_id=cluster_id))
    if selection.tags:
        tagged = {i for i, tags in exchange_tags.items() if set(tags) & set(selection.tags)}
        for tag in selection.tags:
            if run_id:
                tagged.update(exchanges_in_clusters(engine, run_id, tag=tag))
        wanted = tagged if wanted is None else wanted & tagged
    return wanted


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready values: timestamps as ISO strings, context as a list."""
    plain = dict(row)
    if plain.get("created_at") is not None:
        plain["created_at"] = plain["created_at"].isoformat()
    plain["context"] = json.loads(plain["context"]) if plain.get("context") else []
    return plain


def _write_csv(batches: Iterator[list[dict[str, Any]]], path: Path) -> int:
    count = 0
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for batch in batches:
            writer.writerows(batch)
            count += len(batch)
    return count


def _write_jsonl(batches: Iterator[list[dict[str, Any]]], path: Path) -> int:
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for batch in batches:
            for row in batch:
                handle.write(json.dumps(_plain(row), ensure_ascii=False) + "\n")
            count += len(batch)
    return count


def _write_parquet(batches: Iterator[list[dict[str, Any]]], path: Path) -> int:
    count = 0
    with pq.ParquetWriter(path, SCHEMA) as writer:
        for batch in batches:
            writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))
            count += len(batch)
    return count


def _write_openai(batches: Iterator[list[dict[str, Any]]], path: Path) -> int:
    """OpenAI fine-tune JSONL: one {"messages": [...]} per exchange with a non-empty answer."""
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for batch in batches:
            for row in batch:
                if not row["response"]:
                    continue
                messages = json.loads(row["context"]) if row["context"] else []
                if row["instruction"] and not any(m["role"] == "system" for m in messages):
                    messages.insert(0, {"role": "system", "content": row["instruction"]})
                messages.append({"role": "user", "content": row["prompt"]})
                messages.append({"role": "assistant", "content": row["response"]})
                handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
                count += 1
    return count
