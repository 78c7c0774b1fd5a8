"""convoscope's own export read back: the exchanges it holds, under their original ids.

An export row is an exchange as stored (`convoscope export --format jsonl`): its id, the
conversation id and turn index it was stored under, its whole context, prompt, response,
model, instruction, time, source, external id, signals and metadata. Reading it as a log would
split the rows into new conversations with new ids, so every re-ingest of a moved subset
would double it. Instead each row becomes the `Exchange` it was, carrying its conversation id
and turn index, so its content hash is the original id: ingesting an export into the database
it came from stores nothing, and into another one stores the same ids.

The structural signals (`user_turns_after`, `ended_conversation`,
`seconds_to_next_user_message`) are taken as logged values, not derived again: an export often
holds a few turns of a conversation (a cluster, a tag), and the turns left out are what those
signals were read from. The source is the row's own (the log it was first ingested from), not
the export file: the reward labels judge "the user left" per source, so a mixed export must not
merge sources. Where the row came from in the other database (cluster, tags, reward, scores)
belongs to that database's runs and is not imported. A row whose `id` does not match its
content (an edited prompt, a changed model) is rejected: stored under its claimed id it would
be a different exchange, stored under a new one it would no longer join back.

The file is untrusted like any log: every field is type-checked, and a bad row is a reject
naming its line and field while the rows around it are stored.

A CSV or Parquet export (`--format csv|parquet`) has the same columns; a Parquet export also
carries the metadata as JSON text (`metadata`, `conversation_metadata`), a CSV export none of
it. Read as a log, it was split into new conversations with new ids (doubling
the data in the database it came from) and new structural signals. Its rows come from the
tabular readers' row streams and are turned into the record the JSONL export writes (JSON text
parsed; in CSV, where every cell is text, signals read as booleans and numbers and an empty
cell null, as the export writes a NULL), then read by the same code as a JSONL row.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.detect import EXPORT_KEYS
from ingest.files import Record, first_json_byte, head, iter_json_records
from ingest.readers import (
    FieldError,
    as_bool,
    as_datetime,
    as_float,
    as_int,
    field_reject,
    not_an_object,
    unstorable_text,
)
from ingest.records import Exchange, Message, Parsed, Reject, StoredExchanges, canonical_role
from ingest.tabular import Header, TableItem, csv_records, parquet_records

if TYPE_CHECKING:
    from ingest.readers import ReadOptions

# The keys that make a record an export row (detection recognises the format by them).
REQUIRED_KEYS = EXPORT_KEYS
# The export's columns about the other database's runs: read past, never imported or rejected.
NOT_IMPORTED = frozenset(
    {"cluster_id", "cluster_label", "parent_cluster_id", "tags", "reward", "reward_scorer"}
)
_SCORE_PREFIX = "score:"  # the UI export's per-scorer columns
_OPTIONAL_TEXT = ("model", "instruction", "source", "external_id")
# The conversation's own fields each row repeats (storage.logs.CONVERSATION_EXPORT_COLUMNS).
_CONVERSATION_TEXT = ("conversation_external_id", "feedback_text")
_BOOLEANS = ("retried", "edited", "deleted", "ended_conversation")
_NUMBERS = ("rating", "seconds_to_next_user_message")
_KNOWN = REQUIRED_KEYS | {
    *_OPTIONAL_TEXT,
    *_CONVERSATION_TEXT,
    *_BOOLEANS,
    *_NUMBERS,
    "created_at",
    "thumbs",
    "user_turns_after",
    "metadata",
    "conversation_metadata",
}
# Ids are 32 hex digits (records.content_hash); the column is 32 characters wide.
_ID = re.compile(r"[0-9a-f]{32}")

# What a cell starts with when a spreadsheet (Excel, LibreOffice, Google Sheets) runs it as a
# formula, per OWASP's CSV injection guidance: log text is untrusted, so a prompt such as
# `=HYPERLINK("http://evil","click")` must not become a live link in an analyst's sheet.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# The column a spreadsheet-safe CSV export marks itself with ("true" in every row), so that
# reading it back takes off the quotes it added; a reader that does not know it keeps it as
# one more column, and detection goes by the export's other columns.
SPREADSHEET_SAFE_COLUMN = "spreadsheet_safe"


def runs_as_formula(value: Any) -> bool:
    """Whether a spreadsheet opening this CSV cell would run it as a formula. Only text
    counts: a number (a thumbs-down -1, a negative reward) is written and read as a number."""
    return isinstance(value, str) and value.startswith(FORMULA_STARTS)


def spreadsheet_safe(value: Any) -> Any:
    """OWASP's neutralisation: a leading single quote makes a formula cell text in a
    spreadsheet (which hides the quote). A cell of quotes then a formula (`'=x` as stored)
    takes one more, so that taking one quote off (`spreadsheet_unsafe`) gives back every cell
    as stored, and a spreadsheet shows it as stored too."""
    return "'" + value if _quoted_when_safe(value) else value


def spreadsheet_unsafe(value: Any) -> Any:
    """The cell `spreadsheet_safe` wrote, as it was: the one quote it added taken off."""
    added = isinstance(value, str) and value.startswith("'") and _quoted_when_safe(value[1:])
    return value[1:] if added else value


def _quoted_when_safe(value: Any) -> bool:
    return isinstance(value, str) and runs_as_formula(value.lstrip("'"))


def read_exported(path: Path, *, options: ReadOptions) -> Iterator[Parsed]:
    """`StoredExchanges` per run of rows of one conversation, and Rejects, in file order, from
    a JSONL, CSV or Parquet export (told apart by content).

    The export writes a conversation's rows together, in turn order; rows of one conversation
    that are not contiguous (two exports joined) are read as two groups, which is harmless:
    their ids are carried, not derived from the group.
    """
    source = options.source_for(path)
    records, kind = _records(path, source, options)
    group: list[_Row] = []
    line = 0
    for item in records:
        if isinstance(item, Header):
            _check_columns(item.names, path, kind)
            continue
        if type(item) is not Record:
            yield item
            continue
        parsed = _exchange(item.value, item.number, source, kind)
        if isinstance(parsed, Reject):
            yield parsed
            continue
        if group and parsed.exchange.conversation_id != group[0].exchange.conversation_id:
            yield _group(group, source, line)
            group = []
        if not group:
            line = item.number
        group.append(parsed)
    if group:
        yield _group(group, source, line)


def _records(path: Path, source: str, options: ReadOptions) -> tuple[Iterable[TableItem], str]:
    """The file's records, and the export format holding them: "jsonl" (JSON lines or a JSON
    array), "csv" or "parquet"."""
    if head(path, 4) == b"PAR1":
        return parquet_records(path, source=source), "parquet"
    if first_json_byte(path) in (b"{", b"[", b""):
        lines = iter_json_records(path, source=source, max_line_bytes=options.max_line_bytes)
        return lines, "jsonl"
    return csv_records(path, source=source, options=options), "csv"


def _check_columns(names: list[str], path: Path, kind: str) -> None:
    """Refuse a table without an export's columns as a whole: each row would be a reject."""
    missing = sorted(REQUIRED_KEYS - {"id"} - set(names))
    if missing:
        raise ValueError(
            f"{path}: not a convoscope export: no column {', '.join(missing)} (columns: "
            f"{names}); to read it as a log, pass --format {kind}"
        )


@dataclass(frozen=True, slots=True)
class _Row:
    """An export row: its exchange, and the fields of its conversation it repeats."""

    exchange: Exchange
    conversation_external_id: str | None
    feedback_text: str | None
    conversation_metadata: dict[str, Any] | None


def _group(rows: list[_Row], source: str, line: int) -> StoredExchanges:
    ordered = sorted((row.exchange for row in rows), key=lambda e: e.turn_index)  # stable
    return StoredExchanges(
        exchanges=tuple(ordered),
        source=source,
        line=line,
        external_id=next(
            (r.conversation_external_id for r in rows if r.conversation_external_id is not None),
            None,
        ),
        feedback_text=next((r.feedback_text for r in rows if r.feedback_text is not None), None),
        metadata=next((r.conversation_metadata for r in rows if r.conversation_metadata), {}),
    )


def _exchange(record: Any, number: int, source: str, kind: str = "jsonl") -> _Row | Reject:
    """The exchange one export row holds with its conversation's fields, or the Reject naming
    its first bad field; `kind` is the export's format ("jsonl", "csv", "parquet")."""
    if not isinstance(record, dict):
        return not_an_object(source, number, record)
    try:
        if kind == "csv":
            record = _unquoted(record)
        if kind != "jsonl":
            record = _from_table(record, text_cells=kind == "csv")
        missing = sorted(REQUIRED_KEYS - set(record) - {"id"})
        if missing:
            raise FieldError(missing[0], "missing: an export row names its exchange by it")
        unstorable = unstorable_text(record)
        if unstorable is not None:
            raise unstorable
        names = (*_OPTIONAL_TEXT, *_CONVERSATION_TEXT)
        text = {name: _optional_text(record.get(name), name) for name in names}
        exchange = Exchange(
            conversation_id=_id(record["conversation_id"], "conversation_id"),
            turn_index=_count(record["turn_index"], "turn_index", required=True),
            context=_context(record["context"]),
            prompt=_text(record["prompt"], "prompt"),
            response=_text(record["response"], "response"),
            model=text["model"],
            instruction=text["instruction"],
            created_at=_time(record.get("created_at")),
            source=text["source"] or source,
            external_id=text["external_id"],
            retried=_bool(record.get("retried"), "retried"),
            edited=_bool(record.get("edited"), "edited"),
            deleted=_bool(record.get("deleted"), "deleted"),
            rating=_number(record.get("rating"), "rating"),
            thumbs=_thumbs(record.get("thumbs")),
            user_turns_after=_count(record.get("user_turns_after"), "user_turns_after"),
            ended_conversation=_bool(record.get("ended_conversation"), "ended_conversation"),
            seconds_to_next_user_message=_number(
                record.get("seconds_to_next_user_message"), "seconds_to_next_user_message"
            ),
            metadata=_metadata(record),
        )
        if "id" in record and _id(record["id"], "id") != exchange.id:
            raise FieldError(
                "id",
                "does not match the row's conversation_id, turn_index, prompt, response and "
                "model: the row was edited after export",
            )
    except FieldError as err:
        return field_reject(source, number, err, record)
    return _Row(
        exchange,
        text["conversation_external_id"],
        text["feedback_text"],
        _object(record.get("conversation_metadata"), "conversation_metadata"),
    )


def _json_text(value: Any, name: str) -> Any:
    """A value a table holds as JSON text (a list, an object)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise FieldError(name, f"expected JSON text, got {value!r}"[:200]) from None


# How a CSV or Parquet export's cell becomes what the JSONL export writes: counts are floats in
# a Parquet file rewritten by pandas, and every CSV cell is text.
_FROM_TABLE: dict[str, Callable[[Any, str], Any]] = {
    **dict.fromkeys(_BOOLEANS, as_bool),
    **dict.fromkeys(_NUMBERS, as_float),
    **dict.fromkeys(("turn_index", "thumbs", "user_turns_after"), as_int),
    **dict.fromkeys(("context", "metadata", "conversation_metadata"), _json_text),
}


def _unquoted(record: dict[str, Any]) -> dict[str, Any]:
    """A CSV export row without its spreadsheet-safe marker, and when the row carries it, its
    cells as stored (the quote `--spreadsheet-safe` added taken off: with it a quoted prompt
    no longer matched its id, and a quoted instruction was stored with the quote)."""
    row = dict(record)
    if row.pop(SPREADSHEET_SAFE_COLUMN, None) != "true":
        return row
    return {name: spreadsheet_unsafe(value) for name, value in row.items()}


def _from_table(record: dict[str, Any], *, text_cells: bool) -> dict[str, Any]:
    """A CSV or Parquet export row as the JSONL export writes it. With `text_cells` (CSV) an
    empty cell is null, as the export writes a NULL, but for the prompt and response, where it
    is empty text (a saved input's response)."""
    row = {}
    for name, value in record.items():
        if text_cells and value == "" and name not in ("prompt", "response"):
            value = None
        elif name in _FROM_TABLE:
            value = _FROM_TABLE[name](value, name)
        row[name] = value
    return row


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _id(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        shown = repr(value) if isinstance(value, str) else _kind(value)
        raise FieldError(name, f"expected a convoscope id (32 hex digits), got {shown[:60]}")
    return value


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise FieldError(name, f"expected a string, got {_kind(value)}")
    return value


def _optional_text(value: Any, name: str) -> str | None:
    return None if value is None else _text(value, name)


def _bool(value: Any, name: str) -> bool | None:
    """true, false or null: the export writes JSON booleans, so anything else was edited."""
    if value is None or isinstance(value, bool):
        return value
    raise FieldError(name, f"expected true, false or null, got {value!r}"[:200])


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FieldError(name, f"expected a finite number or null, got {value!r}"[:200])
    return float(value)


def _count(value: Any, name: str, *, required: bool = False) -> int | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FieldError(name, f"expected a whole number of at least 0, got {value!r}"[:200])
    return value


def _thumbs(value: Any) -> int | None:
    if value is None or (value in (1, -1) and not isinstance(value, bool)):
        return value
    raise FieldError("thumbs", f"expected 1, -1 or null, got {value!r}"[:200])


def _time(value: Any) -> datetime | None:
    """ISO text (JSONL, CSV) or a timestamp (Parquet)."""
    if value is not None and not isinstance(value, str | datetime):
        raise FieldError("created_at", f"expected an ISO date-time or null, got {_kind(value)}")
    return as_datetime(value, "created_at")


def _context(value: Any) -> tuple[Message, ...]:
    """The whole context, as the export writes it: a list of {role, content}."""
    if not isinstance(value, list):
        raise FieldError("context", f"expected a list of {{role, content}}, got {_kind(value)}")
    messages = []
    for i, raw in enumerate(value):
        role_name = raw.get("role") if isinstance(raw, dict) else None
        role = canonical_role(role_name) if isinstance(role_name, str) else None
        content = raw.get("content") if isinstance(raw, dict) else None
        if role is None or not isinstance(content, str):
            raise FieldError(f"context[{i}]", "expected {role, content} with a known role")
        messages.append(Message(role=role, content=content))
    return tuple(messages)


def _object(value: Any, name: str) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        raise FieldError(name, f"expected a JSON object or null, got {_kind(value)}")
    return value


def _metadata(record: dict[str, Any]) -> dict[str, Any]:
    """The exchange's stored metadata (`metadata`), plus any key the export does not write,
    kept as every reader keeps unknown fields; the other database's runs are left out."""
    stored = _object(record.get("metadata"), "metadata")
    extra = {
        key: value
        for key, value in record.items()
        if key not in _KNOWN and key not in NOT_IMPORTED and not key.startswith(_SCORE_PREFIX)
    }
    return {**(stored or {}), **extra}
