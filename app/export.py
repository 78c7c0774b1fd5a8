"""Export stored exchanges as CSV, Parquet, JSONL or OpenAI fine-tune JSONL.

Rows stream from storage in batches, so an export of millions of rows runs in bounded memory.
Every row carries the ids a user needs to join it back to their own data (`external_id`,
`conversation_id`, `turn_index`, `model`), every signal, its cluster (id and label, a
person's name winning), tags and reward score. The file is written next to its target and
renamed into place at the end, so a failed export never leaves half a file behind; a name
ending in `.gz` is gzipped.

JSONL rows are whole stored exchanges (context as a list, metadata as an object), and so
are Parquet rows (the metadata as JSON text, with where the file came from in the schema's
key-value metadata), so `convoscope ingest` reads them back under the same ids, metadata
included (ingest/exported.py); CSV rows leave the metadata out (`METADATA_COLUMNS`). Judged battles
are exported apart (`export_battles`), as the battles JSONL that ingest reads (ingest/battles.py).

The writers here serve the CLI and the UI (app/ui/exporting.py), whose rows differ only in
their columns (the UI carries one `score:<scorer>` column per scorer).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain, groupby
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy.engine import Engine

from ingest.battles import parse_battle
from ingest.exchanges import battle_exchanges
from ingest.exported import (
    SPREADSHEET_SAFE_COLUMN,
    runs_as_formula,
    spreadsheet_safe,
)
from ingest.files import DEFAULT_MAX_LINE_BYTES, unwritable_reason
from ingest.pipeline import Copies, battle_content_id
from ingest.records import Reject, repeat_id
from storage.clusters import (
    exchanges_in_clusters,
    latest_field_of,
    load_assignments,
    load_clusters,
    load_tags,
)
from storage.engine import database_file, with_journals
from storage.logs import (
    CONVERSATION_EXPORT_COLUMNS,
    BattleFilter,
    ExchangeFilter,
    add_conversation_fields,
    battle_options,
    iter_battles,
    iter_exchanges,
)
from storage.scores import latest_scorer, load_scores
from storage.views import EXCHANGE_EXPORT_COLUMNS, SIGNAL_NAMES, filter_options

# Format name → (label, MIME type, file suffix).
FORMATS: dict[str, tuple[str, str, str]] = {
    "csv": ("CSV", "text/csv", ".csv"),
    "parquet": ("Parquet", "application/vnd.apache.parquet", ".parquet"),
    "jsonl": ("JSONL", "application/jsonl", ".jsonl"),
    "openai": ("OpenAI fine-tune JSONL", "application/jsonl", ".jsonl"),
}
# Parquet types of the typed columns (explicit, so all-NULL batches type right); every other
# column is a string, and `score:<scorer>` columns are floats.
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
    "reward": pa.float64(),
}
TAG_SEPARATOR = "; "  # tags in CSV/Parquet cells; JSONL carries them as a list

# The CLI's column order: the exchange and its conversation's, then where it landed and its reward.
COLUMNS: tuple[str, ...] = (
    *EXCHANGE_EXPORT_COLUMNS,
    *CONVERSATION_EXPORT_COLUMNS,
    "cluster_id",
    "cluster_label",
    "parent_cluster_id",
    "tags",
    "reward",
    "reward_scorer",
)

# The stored metadata (the exchange's: tool steps, a CSV row's other columns; its
# conversation's other keys), as JSON text: a JSONL row carries it as objects, a Parquet row
# in these columns, so both ingest back whole. A CSV export leaves it out: it is the file
# people open in a spreadsheet, where JSON objects are noise and tool steps can pass a cell's
# 32,767 characters; JSONL or Parquet move data between databases.
METADATA_COLUMNS = ("metadata", "conversation_metadata")
# The Parquet schema's key-value metadata key holding where the file came from.
PARQUET_METADATA_KEY = b"convoscope"

Batches = Iterable[list[dict[str, Any]]]


def exchange_columns(format: str) -> tuple[str, ...] | None:
    """The stored exchange columns an export in `format` reads (None: the default set)."""
    return (*EXCHANGE_EXPORT_COLUMNS, "metadata") if format in ("jsonl", "parquet") else None


def file_columns(format: str) -> tuple[str, ...]:
    """The columns a tabular export writes, in order (JSONL writes every key of a row)."""
    return (*COLUMNS, *METADATA_COLUMNS) if format == "parquet" else COLUMNS


def provenance(engine: Engine, selection: ExportSelection) -> dict[str, Any]:
    """What a Parquet export says about itself in its schema metadata: the convoscope that
    wrote it and when, the clustering its clusters are of, the filters that chose its rows
    and the scorer of its rewards. The rows cannot say it: they are the same whichever
    filter chose them."""
    where = selection.where
    return {
        "convoscope_version": _version(),
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "clustering_run_id": selection.run_id,
        "reward_scorer": latest_scorer(engine, "reward:"),
        "filters": {
            "models": list(where.models),
            "sources": list(where.sources),
            "since": where.since.isoformat() if where.since else None,
            "until": where.until.isoformat() if where.until else None,
            "clusters": list(selection.clusters),
            "tags": list(selection.tags),
            "min_reward": selection.min_reward,
            "max_reward": selection.max_reward,
        },
    }


def _version() -> str | None:
    """This convoscope's version, None when it runs from a tree that is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("convoscope")
    except PackageNotFoundError:
        return None


@dataclass(frozen=True, slots=True)
class ExportSelection:
    """Which exchanges to export: stored-field filters plus cluster, tag and reward bounds,
    and the clustering whose topics the rows carry and `clusters`/`tags` select from: the
    latest clustering of the export's --on field (`storage.clusters.latest_run`; None when
    it has none), resolved by the caller so that what it reports is what was written."""

    run_id: str | None
    where: ExchangeFilter = field(default_factory=ExchangeFilter)
    clusters: tuple[str, ...] = ()  # topic or parent ids of that clustering
    tags: tuple[str, ...] = ()
    min_reward: float | None = None
    max_reward: float | None = None


@dataclass(frozen=True, slots=True)
class ExportResult:
    path: str
    format: str
    rows: int
    formula_cells: int = 0  # CSV cells a spreadsheet runs as formulas (prefixed when safe)
    without_answer: int = 0  # saved inputs the openai format left out


@dataclass(slots=True)
class WriteStats:
    """What a writer saw besides its rows: the CSV cells a spreadsheet would run as formulas,
    counted so a default export can say so (it leaves them as they are), and the saved inputs
    the openai format leaves out (a fine-tune record needs its answer)."""

    formula_cells: int = 0
    without_answer: int = 0


def guess_format(path: Path) -> str:
    """The export format a file name implies (`.parquet`, `.csv`, `.jsonl`, each optionally
    `.gz`); jsonl for a name without a suffix. Another suffix is an error: `out.xlsx` was
    written as JSONL under that name, which a spreadsheet then failed to open."""
    suffix = _suffix(path)
    if suffix in {"csv", "parquet", "jsonl"}:
        return suffix
    if suffix in {"", "ndjson"}:
        return "jsonl"
    raise ValueError(
        f"--out {path}: .{suffix} names no export format: name the file .csv, .parquet or "
        ".jsonl (each may end in .gz), or choose one with --format"
    )


def _suffix(path: Path) -> str:
    """The suffix a file name gives its format, lower case, without the dot or a `.gz`."""
    return Path(path.name.lower().removesuffix(".gz")).suffix.lstrip(".")


def check_out_path(out: Path, format: str) -> None:
    """Refuse an output path that cannot be written, before any row is read."""
    problem = unwritable_reason(out)
    if problem is not None:
        raise ValueError(f"--out {out} {problem}")
    if format == "parquet" and _gzipped(out):
        raise ValueError(f"--out {out}: Parquet files are compressed already; drop the .gz")


def check_not_the_database(engine: Engine, out: Path) -> None:
    """Refuse to write over the database being exported, or the journal beside it: the
    export's rename into place would replace the database with the export."""
    file = database_file(engine.url.render_as_string(hide_password=False))
    if file is None:
        return
    if out.expanduser().resolve() in with_journals(file.expanduser().resolve()):
        raise ValueError(
            f"--out {out} is the database being exported (or its journal): "
            "writing there would replace it; choose another file"
        )


def _gzipped(out: Path) -> bool:
    return out.name.lower().endswith(".gz")


def matching_sources(
    engine: Engine, requested: Sequence[str], *, stored: Sequence[str] | None = None
) -> tuple[str, ...]:
    """The stored sources each `--source` means: the path as typed at ingest, the same file
    by its absolute path, the one relative source it ends with (a source is stored as typed,
    relative to the folder the ingest ran in, which may not be this one), or its bare file
    name when one stored source has that name. The sources are the exchanges' unless `stored`
    names others (the battles')."""
    if stored is None:
        stored = filter_options(engine)["sources"]
    found: list[str] = []
    for text in requested:
        wanted = Path(text).expanduser().resolve()
        same_file = [s for s in stored if s == text or Path(s).expanduser().resolve() == wanted]
        tail = _longest_tail(stored, wanted)
        named = [s for s in stored if Path(s).name == text]
        found += same_file or tail or (named if len(named) == 1 else [text])
    return tuple(dict.fromkeys(found))


def _longest_tail(stored: Sequence[str], wanted: Path) -> list[str]:
    """The relative stored source that `wanted` ends with in the most path parts, if only one
    does: `in/qa.jsonl` for /home/me/project/in/qa.jsonl."""
    tails = [
        s
        for s in stored
        if not Path(s).is_absolute() and wanted.parts[-len(Path(s).parts) :] == Path(s).parts
    ]
    longest = max((len(Path(s).parts) for s in tails), default=0)
    best = [s for s in tails if len(Path(s).parts) == longest]
    return best if len(best) == 1 else []


def why_empty(engine: Engine, selection: ExportSelection, no_clustering: str) -> list[str]:
    """Which filters of an export that wrote no rows match nothing, for a warning;
    `no_clustering` says why the selection has no clustering, when it has none."""
    options = filter_options(engine)
    reasons = unmatched_models_and_sources(selection.where, options)
    run_id = selection.run_id
    cluster_ids = {c["id"] for c in load_clusters(engine, run_id)} if run_id else set()
    reasons += [
        _not_in_clustering(engine, c, None if run_id else no_clustering)
        for c in selection.clusters
        if c not in cluster_ids
    ]
    reasons += [
        f"--tag {t} is on no exchange or cluster ({_some(options['tags'])})"
        for t in selection.tags
        if t not in options["tags"]
    ]
    reasons += unmatched_window(selection.where, options)
    bounded = selection.min_reward is not None or selection.max_reward is not None
    if bounded and latest_scorer(engine, "reward:") is None:
        reasons.append("--min-reward/--max-reward: no reward scores yet (run `convoscope score`)")
    if not options["sources"]:
        reasons.append("the database holds no exchanges")
    return reasons or ["each filter matches rows, but no row matches them all"]


def unmatched_window(
    where: ExchangeFilter, options: Mapping[str, Any], spelled: str = "--since/--until"
) -> list[str]:
    """Why a time window selected nothing: no stored exchange has a logged time, or the window
    misses the times the logs span. `options` is `filter_options`; `spelled` names the
    window's options as the command takes them."""
    if where.since is None and where.until is None:
        return []
    first, last = options["first"], options["last"]
    if first is None:
        return [f"{spelled}: no stored exchange has a logged time"]
    if (where.since is not None and where.since > last) or (
        where.until is not None and where.until <= first
    ):
        return [f"{spelled}: the logs run from {first:%Y-%m-%d %H:%M} to {last:%Y-%m-%d %H:%M}"]
    return []


def unmatched_models_and_sources(
    where: ExchangeFilter,
    options: Mapping[str, Any],
    model: str = "--model {}",
    source: str = "--source {}",
) -> list[str]:
    """Which of a selection's models and sources no stored exchange has, each with the stored
    ones beside it: a mistyped name is the usual reason a selection comes out empty, and
    "nothing matched" does not say which name. `options` is `filter_options`; `model` and
    `source` spell the option as the command takes it (`--filter model={}` for replay)."""
    reasons = [
        f"{model.format(m)} matches no stored model ({_some(options['models'])})"
        for m in where.models
        if m not in options["models"]
    ]
    reasons += [
        _unmatched_source(s, options["sources"], "stored source", source)
        for s in where.sources
        if s not in options["sources"]
    ]
    return reasons


def _not_in_clustering(engine: Engine, cluster_id: str, no_clustering: str | None) -> str:
    """Why `--cluster cluster_id` selected nothing: the export's --on field has no clustering
    (`no_clustering` says so), or the id is another field's (named with its --on), or none's."""
    said = f"--cluster {cluster_id} is not in the latest clustering"
    if no_clustering:
        return f"{said} ({no_clustering})"
    elsewhere = latest_field_of(engine, cluster_id)
    if elsewhere is None:
        return said
    return f"{said} of this --on: it is in the clustering on {elsewhere}, pass --on {elsewhere}"


def _unmatched_source(
    text: str, stored: Sequence[str], what: str, option: str = "--source {}"
) -> str:
    """Why `--source text` selected nothing: no such source, or a bare file name that several
    stored sources share (which one is meant only a path can say)."""
    named = [s for s in stored if Path(s).name == text]
    given = option.format(text)
    if len(named) > 1:
        return f"{given} names {len(named)} files ({_some(named)}): give its path"
    return f"{given} matches no {what} ({_some(stored)})"


def _some(names: Sequence[str], shown: int = 5) -> str:
    """A few stored names for a hint."""
    if not names:
        return "none stored"
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return "stored: " + ", ".join(names[:shown]) + more


def export_exchanges(
    engine: Engine,
    out: Path,
    *,
    format: str | None = None,
    selection: ExportSelection,
    safe_for_spreadsheets: bool = False,
) -> ExportResult:
    """Write the selected exchanges to `out` in `format`: how many rows were written, and how
    many CSV cells a spreadsheet would run as formulas (`safe_for_spreadsheets`: prefixed)."""
    chosen = format or guess_format(out)
    check_spreadsheet_safe(chosen, safe_for_spreadsheets)
    check_out_path(out, chosen)
    check_not_the_database(engine, out)
    batches = iter_export_rows(engine, selection, columns=exchange_columns(chosen))
    stats = WriteStats()
    rows = write_file(
        batches,
        file_columns(chosen),
        chosen,
        out,
        safe_for_spreadsheets=safe_for_spreadsheets,
        stats=stats,
        about=provenance(engine, selection),
    )
    return ExportResult(
        path=str(out),
        format=chosen,
        rows=rows,
        formula_cells=stats.formula_cells,
        without_answer=stats.without_answer,
    )


def check_spreadsheet_safe(format: str, safe_for_spreadsheets: bool) -> None:
    """Refuse spreadsheet-safe output for a format other than CSV: spreadsheets run formulas
    from CSV cells, while a quote added to a JSONL or Parquet value would only corrupt it."""
    if safe_for_spreadsheets and format != "csv":
        raise ValueError(
            f"--spreadsheet-safe is for CSV exports only (this export is {format}): "
            "spreadsheets open CSV, and a quote added to other formats would change the data; "
            "use --format csv or drop the flag"
        )


def iter_export_rows(
    engine: Engine, selection: ExportSelection, *, columns: Sequence[str] | None = None
) -> Iterator[list[dict[str, Any]]]:
    """Selected exchanges in batches, each row carrying its cluster, tags and reward; the
    exchange columns are `columns` (default EXCHANGE_EXPORT_COLUMNS)."""
    run_id = selection.run_id
    assignment = load_assignments(engine, run_id) if run_id else {}
    clusters = {c["id"]: c for c in load_clusters(engine, run_id)} if run_id else {}
    exchange_tags = load_tags(engine, "exchange")
    scorer = latest_scorer(engine, "reward:")
    rewards = load_scores(engine, scorer) if scorer else {}
    wanted = _selected_ids(engine, run_id, selection, exchange_tags)
    columns = columns or EXCHANGE_EXPORT_COLUMNS
    for batch in iter_exchanges(engine, where=selection.where, columns=columns):
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
            group = clusters.get(cluster["parent_id"] or "") if cluster else None
            tags = set(exchange_tags.get(row["id"], ()))
            for tagged in (cluster, group):  # a topic's tags, and its group's
                tags.update(tagged["tags"] if tagged else ())
            rows.append(
                {
                    **row,
                    "cluster_id": cluster["id"] if cluster else None,
                    "cluster_label": cluster["name"] if cluster else None,
                    "parent_cluster_id": cluster["parent_id"] if cluster else None,
                    "tags": TAG_SEPARATOR.join(sorted(tags)) or None,
                    "reward": reward,
                    "reward_scorer": scorer if reward is not None else None,
                }
            )
        if rows:
            add_conversation_fields(engine, rows, with_metadata="metadata" in columns)
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


def arrow_schema(names: Sequence[str]) -> pa.Schema:
    return pa.schema(
        [(n, pa.float64() if n.startswith("score:") else _TYPES.get(n, pa.string())) for n in names]
    )


def write_file(
    batches: Batches,
    names: Sequence[str],
    format: str,
    out: Path,
    *,
    safe_for_spreadsheets: bool = False,
    stats: WriteStats | None = None,
    about: dict[str, Any] | None = None,
) -> int:
    """Write rows to `out` atomically (a `.partial` sibling renamed into place), gzipped when
    its name ends in `.gz`; the count. See write_rows for the CSV options and `about`."""
    _check_format(format)
    check_spreadsheet_safe(format, safe_for_spreadsheets)

    def write(handle: IO[bytes]) -> int:
        return write_rows(
            batches,
            names,
            format,
            handle,
            safe_for_spreadsheets=safe_for_spreadsheets,
            stats=stats,
            about=about,
        )

    return _write_atomically(out, write)


def _write_atomically(out: Path, write: Callable[[IO[bytes]], int]) -> int:
    """Run `write` on a `.partial` sibling of `out` (gzipped when `out` ends in `.gz`) and
    rename it into place when it is done: a failed export leaves no half file. The count.

    An export of nothing writes nothing: a filter typed wrong must not replace yesterday's
    export at that path with an empty file (the callers say why nothing matched)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        with partial.open("wb") as raw:
            if _gzipped(out):
                with gzip.GzipFile(filename=out.name[:-3], mode="wb", fileobj=raw) as handle:
                    rows = write(handle)  # type: ignore[arg-type]
            else:
                rows = write(raw)
        if rows:
            os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return rows


def write_rows(
    batches: Batches,
    names: Sequence[str],
    format: str,
    handle: IO[bytes],
    *,
    safe_for_spreadsheets: bool = False,
    stats: WriteStats | None = None,
    about: dict[str, Any] | None = None,
) -> int:
    """Write rows to a binary handle in `format`; returns how many were written.

    CSV cells are written as stored (what pandas and other readers expect) unless
    `safe_for_spreadsheets`, which prefixes those a spreadsheet would run as formulas with a
    quote; either way `stats` counts them. A Parquet file carries `about` (`provenance`) as
    JSON in its schema's key-value metadata, under `convoscope`.
    """
    _check_format(format)
    check_spreadsheet_safe(format, safe_for_spreadsheets)
    if format == "parquet":
        return _parquet(batches, names, handle, about)
    text = io.TextIOWrapper(handle, encoding="utf-8", newline="", write_through=True)
    try:
        if format == "csv":
            return _csv(batches, names, text, safe_for_spreadsheets, stats or WriteStats())
        if format == "jsonl":
            return _jsonl(batches, text)
        return _openai(batches, text, stats or WriteStats())
    finally:
        text.detach()


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready values: timestamps as ISO strings, context and tags as lists, the exchange's
    and its conversation's metadata (when selected) as objects."""
    plain = dict(row)
    if plain.get("created_at") is not None:
        plain["created_at"] = plain["created_at"].isoformat()
    plain["context"] = json.loads(plain["context"]) if plain.get("context") else []
    plain["tags"] = plain["tags"].split(TAG_SEPARATOR) if plain.get("tags") else []
    for name in ("metadata", "conversation_metadata"):
        if name in plain:
            plain[name] = json.loads(plain[name]) if plain[name] else None
    return plain


def _csv(
    batches: Batches, names: Sequence[str], text: IO[str], safe: bool, stats: WriteStats
) -> int:
    # A safe file says so in a column of its own, so that ingest takes the quotes off again.
    marker = [SPREADSHEET_SAFE_COLUMN] if safe else []
    writer = csv.DictWriter(text, fieldnames=[*names, *marker])
    writer.writeheader()
    count = 0
    for batch in batches:
        stats.formula_cells += sum(runs_as_formula(v) for row in batch for v in row.values())
        if safe:
            batch = [
                {
                    **{k: spreadsheet_safe(v) for k, v in row.items()},
                    SPREADSHEET_SAFE_COLUMN: "true",
                }
                for row in batch
            ]
        writer.writerows(batch)
        count += len(batch)
    return count


def _jsonl(batches: Batches, text: IO[str]) -> int:
    count = 0
    for batch in batches:
        for row in batch:
            text.write(json.dumps(_plain(row), ensure_ascii=False) + "\n")
        count += len(batch)
    return count


def _openai(batches: Batches, text: IO[str], stats: WriteStats) -> int:
    """One {"messages": [...], "model"} per exchange with an answer (the model where known,
    read back by the openai reader); the ids, signals, cluster and tags ride along as
    metadata, which OpenAI's fine-tuning ignores. Fine-tune data: each record repeats its
    conversation's history, so re-ingesting it is not a round trip."""
    count = 0
    for batch in batches:
        for row in batch:
            if not row["response"]:
                stats.without_answer += 1
                continue
            messages = _without_tool_steps(json.loads(row["context"]) if row["context"] else [])
            instruction = row["instruction"]
            as_message = _instruction_text(instruction) and not any(
                m.get("role") == "system" for m in messages
            )
            if as_message:
                messages.insert(0, {"role": "system", "content": instruction})
            messages.append({"role": "user", "content": row["prompt"]})
            messages.append({"role": "assistant", "content": row["response"]})
            record: dict[str, Any] = {"messages": messages}
            if row["model"]:
                record["model"] = row["model"]
            record["metadata"] = {
                "exchange_id": row["id"],
                "external_id": row["external_id"],
                **{name: row[name] for name in CONVERSATION_EXPORT_COLUMNS},
                **{name: row[name] for name in SIGNAL_NAMES},
                # An id (or text already in the messages) is kept here, never made a message.
                "instruction": None if as_message else instruction,
                "cluster_id": row["cluster_id"],
                "cluster_label": row["cluster_label"],
                "tags": row["tags"],
            }
            text.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def _without_tool_steps(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The context less its tool use (a tool's result and the assistant message that called
    it): only its text is stored, and fine-tuning refuses a tool message without its call."""
    kept: list[dict[str, Any]] = []
    for m in messages:
        if m.get("role") == "tool":
            if kept and kept[-1].get("role") == "assistant":
                kept.pop()
            continue
        kept.append(m)
    return kept


def _instruction_text(instruction: str | None) -> bool:
    """Whether a stored instruction is a system prompt's text rather than its id: logs give
    either (`instruction` or `instruction_id`/`system_prompt_id`) and only the value is kept,
    so a single short token (`sp-42`, `v3`) is taken for an id."""
    if not instruction:
        return False
    return len(instruction.split()) > 1 or len(instruction) > 64


def _parquet(
    batches: Batches, names: Sequence[str], handle: IO[bytes], about: dict[str, Any] | None
) -> int:
    schema = arrow_schema(names)
    if about is not None:
        schema = schema.with_metadata({PARQUET_METADATA_KEY: json.dumps(about).encode()})
    count = 0
    with pq.ParquetWriter(handle, schema) as writer:
        for batch in batches:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            count += len(batch)
    return count


# ---------------------------------------------------------------------------------- battles

BATTLES = "battles"  # `export --format battles`: judged battles, not exchanges
_WINNER_NAMES = {"a": "model_a", "b": "model_b", "tie": "tie"}
# Why a written battle would not ingest back as itself (the counts go in the summary).
OTHER_ANSWERS = (
    "its answers were not stored from a battles line (a replay judge's verdict, or answers "
    "with earlier turns or to different prompts): the format carries one prompt and two "
    "answers, so they would come back as new one-turn answers under other ids, and the "
    "battle under another id"
)
OTHER_COPY = (
    "it repeats another stored verdict (the same answers, winner and judge) and not every "
    "copy is in the file (--source left some out), so it would be numbered as another copy"
)
OTHER_FIELDS = "a field would read back changed"


@dataclass(frozen=True, slots=True)
class BattleExportResult:
    path: str
    rows: int
    # Why some battles would not ingest back under their own ids → how many, and one of them.
    not_round_trip: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    format: str = BATTLES


def check_battles_out_path(out: Path) -> None:
    """Refuse a path that cannot be written, or a CSV/Parquet name for what is JSONL."""
    problem = unwritable_reason(out)
    if problem is not None:
        raise ValueError(f"--out {out} {problem}")
    if _suffix(out) not in ("", "jsonl", "ndjson"):
        raise ValueError(
            f"--out {out}: a battles export is JSONL: name it .jsonl (or .jsonl.gz), "
            "which ingest reads back"
        )


def no_battles_message() -> str:
    return (
        "the database holds no battles to export: ingest judged battles first "
        "(`convoscope ingest battles.jsonl`, lines with prompt, model_a, response_a, model_b, "
        "response_b and winner) or judge a replay (`convoscope replay judge RUN --model JUDGE "
        "--base-url URL`)"
    )


def export_battles(
    engine: Engine, out: Path, *, where: BattleFilter | None = None
) -> BattleExportResult:
    """Write the stored battles `where` selects to `out` as battles JSONL, one line each, and
    check that each line ingests back as the battle it was (the ids the ingest would derive
    from it, its winner, judge, preference and metadata); those that would not are counted by
    reason. ValueError for a path that cannot be written or is the database itself."""
    check_battles_out_path(out)
    check_not_the_database(engine, out)
    check = _RoundTrip(str(out))
    rows = _write_atomically(out, lambda handle: _write_battles(engine, handle, where, check))
    return BattleExportResult(
        path=str(out), rows=rows, not_round_trip=dict(check.reasons), examples=check.examples
    )


def battles_bytes(engine: Engine, *, where: BattleFilter | None = None) -> bytes:
    """The lines `export_battles` writes, in memory (for the UI's download button, which has
    nowhere to report the round-trip check: writing to a path does)."""
    buffer = io.BytesIO()
    _write_battles(engine, buffer, where, None)
    return buffer.getvalue()


def _write_battles(
    engine: Engine, handle: IO[bytes], where: BattleFilter | None, check: _RoundTrip | None
) -> int:
    """Write the selected battles as battles JSONL lines, each checked by `check` if given;
    the count."""
    count = 0
    for row in _in_copy_order(chain.from_iterable(iter_battles(engine, where=where))):
        record = battle_record(row)
        line = json.dumps(record, ensure_ascii=False).encode("utf-8")
        count += 1
        if check is not None:
            check(row, record, count, len(line))
        handle.write(line + b"\n")
    return count


def battle_record(row: dict[str, Any]) -> dict[str, Any]:
    """A stored battle (a row of storage.logs.iter_battles) as a line of the battles format:
    the source's id, the prompt, both answers and their models, the winner as
    `model_a|model_b|tie`, the judge's preference and name, then the stored metadata's keys,
    which were the line's other keys (and are read back as metadata)."""
    record: dict[str, Any] = {
        "battle_id": row["external_id"],
        "prompt": row["prompt_a"],
        "model_a": row["model_a"],
        "response_a": row["response_a"],
        "model_b": row["model_b"],
        "response_b": row["response_b"],
        "winner": _WINNER_NAMES.get(row["winner"], row["winner"]),
        "judge_preference": row["judge_preference"],
        "judge": row["judge"],
    }
    for key, value in _metadata(row).items():
        record.setdefault(key, value)  # a key the format reads is never overwritten
    return record


def _metadata(row: dict[str, Any]) -> dict[str, Any]:
    return json.loads(row["metadata"]) if row["metadata"] else {}


def _in_copy_order(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Battles (ordered so the copies of one verdict come together) with each verdict's
    copies in the order an ingest numbers them: the first keeps the content id, the k-th gets
    `repeat_id(first, k)`, so a re-ingest gives each copy its own id again. A copy whose
    number is not found (a replay judge's verdict, whose id is its own) goes last."""
    for (a, b, winner, judge), copies in groupby(
        rows, key=lambda r: (r["exchange_a"], r["exchange_b"], r["winner"], r["judge"])
    ):
        group = list(copies)
        if len(group) == 1:
            yield group[0]
            continue
        first = battle_content_id(a, b, winner, judge)
        number = {first: 1} | {repeat_id(first, k): k for k in range(2, len(group) + 1)}
        yield from sorted(group, key=lambda r: (number.get(r["id"], len(group) + 1), r["id"]))


class _RoundTrip:
    """Reads each written line as `convoscope ingest` would (parse, derive the answers' ids,
    number the copies) and counts, by reason, the battles that would not come back as
    themselves: an ingest of the file into a fresh database then stores every other battle
    and its answers under their own ids, and into the database they came from, nothing."""

    def __init__(self, source: str) -> None:
        self._source = source
        self._copies = Copies()
        self.reasons: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def __call__(self, row: dict[str, Any], record: dict[str, Any], line: int, size: int) -> None:
        reason: str | None
        if size > DEFAULT_MAX_LINE_BYTES:  # read as a reject, taking no copy number
            mb = DEFAULT_MAX_LINE_BYTES // 2**20
            reason = f"its line is longer than ingest reads by default (--max-line-mb {mb})"
        else:
            reason = self._why_not(row, record, line)
        if reason is not None:
            self.reasons[reason] += 1
            self.examples.setdefault(reason, row["id"])

    def _why_not(self, row: dict[str, Any], record: dict[str, Any], line: int) -> str | None:
        parsed = parse_battle(record, line, self._source)
        if isinstance(parsed, Reject):  # no copy number is taken, as in the ingest
            where = f"{parsed.field}: " if parsed.field else ""
            return f"ingest would reject it ({where}{parsed.reason})"
        pair = battle_exchanges(parsed)
        battle_id = self._copies.battle_id(parsed, pair)
        if (pair[0].id, pair[1].id) != (row["exchange_a"], row["exchange_b"]):
            return OTHER_ANSWERS
        if battle_id != row["id"]:
            return OTHER_COPY
        stored = (row["winner"], row["judge"], row["judge_preference"], row["external_id"])
        read = (parsed.winner, parsed.judge, parsed.judge_preference, parsed.external_id)
        if read != stored or parsed.metadata != _metadata(row):
            return OTHER_FIELDS
        return None


def why_no_battles(engine: Engine, where: BattleFilter) -> list[str]:
    """Which filters of a battles export that wrote nothing match no battle, for a warning."""
    options = battle_options(engine)
    reasons = [
        f"--model {m} is the model of no battle's answer ({_some(options['models'])})"
        for m in where.models
        if m not in options["models"]
    ]
    reasons += [
        _unmatched_source(s, options["sources"], "battle's source")
        for s in where.sources
        if s not in options["sources"]
    ]
    return reasons or ["each filter matches battles, but no battle matches them all"]
