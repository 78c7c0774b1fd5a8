"""CSV and Parquet logs: one exchange per row, columns mapped to canonical fields.

`options.mapping` maps canonical names to column names (`{"prompt": "question"}`); columns
already named canonically need no mapping; every other column is kept as the row's metadata.
Rows that share a `conversation_id` become one multi-turn conversation, ordered by
`turn_index` (then file order); their rows must be contiguous, as any export sorted or grouped
by conversation writes them, so a conversation can be emitted as soon as the next begins and
memory stays at one conversation. A row's `created_at` dates both its prompt and its response,
so `seconds_to_next_user_message` is the time between one row and the next. `context`, when
given, is a JSON list of `{role, content}` messages that precede the conversation's first row.
A row that repeats the prompt of a row whose answer was `retried` is that request answered
again (as an export writes a regenerated answer), not a new user turn.

The row streams (`csv_records`, `parquet_records`) also feed ingest.exported, which reads
convoscope's own CSV and Parquet exports back under their stored ids.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.files import Line, Record, iter_lines
from ingest.readers import (
    FieldError,
    as_bool,
    as_datetime,
    as_float,
    as_int,
    as_optional_text,
    as_thumbs,
    field_reject,
    unstorable_text,
)
from ingest.records import (
    Conversation,
    Message,
    Notice,
    Parsed,
    Reject,
    Truncation,
    canonical_role,
)

if TYPE_CHECKING:
    from ingest.readers import ReadOptions

CANONICAL_COLUMNS = (
    "prompt",
    "response",
    "model",
    "context",
    "instruction",
    "conversation_id",
    "turn_index",
    "external_id",
    "created_at",
    "retried",
    "edited",
    "deleted",
    "rating",
    "thumbs",
)
_BATCH_ROWS = 8192


@dataclass(frozen=True, slots=True)
class _Row:
    """One well-typed row: the canonical fields it had, and its other columns."""

    line: int
    values: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)


def read_csv(path: Path, *, options: ReadOptions) -> Iterator[Parsed]:
    """Conversations and Rejects from a CSV/TSV file (gzip allowed), streamed row by row."""
    source = options.source_for(path)
    records = csv_records(path, source=source, options=options)
    yield from _conversations(_typed_rows(records, path, source, options), source=source)


def read_parquet(path: Path, *, options: ReadOptions) -> Iterator[Parsed]:
    """Conversations and Rejects from a Parquet file, streamed batch by batch."""
    source = options.source_for(path)
    records = parquet_records(path, source=source)
    yield from _conversations(_typed_rows(records, path, source, options), source=source)


@dataclass(frozen=True, slots=True)
class Header:
    """A table's column names, which come before its rows."""

    names: list[str]


TableItem = Header | Record | Reject | Truncation


def _typed_rows(
    records: Iterable[TableItem], path: Path, source: str, options: ReadOptions
) -> Iterator[_Row | Reject | Truncation | Notice]:
    """The rows with their cells mapped to canonical fields (`options.mapping`) and typed."""
    columns: dict[str, str] = {}
    for item in records:
        if isinstance(item, Header):
            columns = _column_map(item.names, options.mapping, path)
            if notice := _no_response(columns, item.names, source):
                yield notice
        elif type(item) is Record:
            yield _typed_row(item.value, item.number, columns, source)
        else:
            yield item


def parquet_records(path: Path, *, source: str) -> Iterator[TableItem]:
    """A Parquet file's `Header`, then each row as a Record of its values by column name
    (numbered from 1), streamed batch by batch; an unreadable file or batch is a Reject."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        yield Reject(source=source, line=0, reason=f"unreadable Parquet file: {err}")
        return
    yield Header(parquet.schema_arrow.names)
    number = 0
    batches = parquet.iter_batches(batch_size=_BATCH_ROWS)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as err:  # damaged data: keep the rows before
            reason = f"unreadable Parquet data after row {number}, the rest skipped: {err}"
            yield Reject(source=source, line=number + 1, reason=reason)
            return
        if batch is None:
            return
        for record in batch.to_pylist():
            number += 1
            yield Record(number=number, value=record)


def _column_map(header: Iterable[str], mapping: Mapping[str, str], path: Path) -> dict[str, str]:
    """Column name → canonical field, for the columns that hold one.

    Spreadsheets write `Prompt` or ` response`, so a column named like a field up to case and
    surrounding spaces holds it (an exact name wins). A mapped column is looked up exactly,
    then by its stripped name, so `--map` finds a column whose name has stray spaces.
    """
    names = list(header)
    unknown = set(mapping) - set(CANONICAL_COLUMNS)
    if unknown:
        raise ValueError(
            f"unknown field(s) in the column mapping: {sorted(unknown)}; "
            f"canonical fields are {', '.join(CANONICAL_COLUMNS)}"
        )
    found = {canonical: _find_column(column, names) for canonical, column in mapping.items()}
    missing = {f"{k}={v}" for k, v in mapping.items() if found[k] is None}
    if missing:
        raise ValueError(f"{path}: mapped column(s) {sorted(missing)} not found; columns: {names}")
    fields_of: dict[str, list[str]] = {}
    for canonical, column in found.items():
        fields_of.setdefault(str(column), []).append(canonical)
    twice = {column: fields for column, fields in fields_of.items() if len(fields) > 1}
    if twice:
        column, fields = next(iter(twice.items()))
        raise ValueError(
            f"{path}: column {column!r} is mapped to {' and '.join(fields)}; a column holds "
            "one field: map each field to its own column"
        )
    columns = {column: canonical for canonical, column in found.items() if column is not None}
    taken = set(mapping)
    for exact in (True, False):
        for name in names:
            canonical = name if exact else name.strip().lower()
            if canonical in CANONICAL_COLUMNS and name not in columns and canonical not in taken:
                columns[name] = canonical
                taken.add(canonical)
    if "prompt" not in columns.values():
        raise ValueError(
            f"{path}: no prompt column (columns: {names}); map one, e.g. --map prompt=question"
        )
    return columns


# Column names that usually hold a model's answers, to name in the hint when no column is
# mapped to `response`.
_ANSWER_NAMES = ("answer", "answers", "completion", "output", "reply", "assistant", "bot")


def _no_response(columns: Mapping[str, str], names: list[str], source: str) -> Notice | None:
    """A warning when no column holds the responses: the rows are stored as saved inputs
    (prompts to replay), which is right for such a file, but a file whose answers sit in an
    unmapped column (`answer`) was stored with every response empty and nothing said."""
    if "response" in columns.values():
        return None
    likely = next((n for n in names if n.strip().lower() in _ANSWER_NAMES), "COLUMN")
    return Notice(
        source,
        f"no response column (columns: {names}): its rows are stored as saved inputs, prompts "
        f"without answers, to replay; if a column holds the answers, map it: "
        f"--map response={likely}",
    )


def _find_column(wanted: str, names: list[str]) -> str | None:
    """The column a mapping names: by its exact name, else by its name without stray spaces."""
    if wanted in names:
        return wanted
    return next((name for name in names if name.strip() == wanted.strip()), None)


def csv_records(path: Path, *, source: str, options: ReadOptions) -> Iterator[TableItem]:
    """A CSV file's `Header`, then each row as a Record of its cells by column name, numbered
    by its first physical line; bad lines and bad rows come out as Rejects in their place."""
    csv.field_size_limit(max(csv.field_size_limit(), options.max_line_bytes))
    pending: list[Reject | Truncation] = []
    first_line: list[int] = []  # the first physical line of the row being read
    broken: list[int] = []  # that row lost a line (a Reject): it is skipped

    def texts() -> Iterator[str]:
        lines = iter_lines(
            path, source=source, max_line_bytes=options.max_line_bytes, keep_blank=True
        )
        for line in lines:
            if isinstance(line, Line):
                if not first_line:
                    first_line.append(line.number)
                yield line.text
            elif isinstance(line, Reject) and first_line:
                # A bad line inside a quoted cell: the row read on would lack it, so the
                # whole row is rejected, not stored with part of a cell cut out.
                broken.append(first_line[0])
                pending.append(
                    replace(
                        line,
                        reason=f"{line.reason}, inside the row from line "
                        f"{first_line[0]}: the row is skipped",
                    )
                )
            else:
                pending.append(line)

    stream = texts()
    try:
        header_text = next(stream)
    except StopIteration:
        yield from pending
        return
    first_line.clear()
    delimiter = (
        "\t" if path.name.lower().removesuffix(".gz").endswith(".tsv") else _delimiter(header_text)
    )
    header = next(csv.reader([header_text], delimiter=delimiter))
    yield Header(header)
    # strict: a quote left open at the end of the file is an error, not a cell that silently
    # swallows every row after it; a stray quote after a closing one is an error too.
    reader = csv.reader(stream, delimiter=delimiter, strict=True)
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            line = first_line[0] if first_line else 0
            reason = (
                "unterminated quoted field: the file ends inside its quotes"
                if str(err) == "unexpected end of data"
                else f"unreadable CSV row: {err}"
            )
            pending.append(Reject(source=source, line=line, reason=reason))
            cells = None
        yield from pending
        pending.clear()
        line = first_line[0] if first_line else 0
        first_line.clear()
        if broken:
            broken.clear()
            continue
        if not cells:
            continue
        if len(cells) > len(header):
            yield Reject(
                source=source,
                line=line,
                reason=f"{len(cells)} cells for {len(header)} columns",
                excerpt=delimiter.join(cells)[:200],
            )
            continue
        yield Record(number=line, value=dict(zip(header, cells, strict=False)))
    yield from pending


def _delimiter(header: str) -> str:
    counts = {d: header.count(d) for d in (",", "\t", ";", "|")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


_COERCE = {
    "model": as_optional_text,
    "instruction": as_optional_text,
    "conversation_id": as_optional_text,
    "external_id": as_optional_text,
    "turn_index": as_int,
    "created_at": as_datetime,
    "retried": as_bool,
    "edited": as_bool,
    "deleted": as_bool,
    "rating": as_float,
    "thumbs": as_thumbs,
}


def _typed_row(
    record: dict[str, Any], line: int, columns: dict[str, str], source: str
) -> _Row | Reject:
    values: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    try:
        unstorable = unstorable_text(record)
        if unstorable is not None:
            raise unstorable
        for column, value in record.items():
            canonical = columns.get(column)
            if canonical is None:
                if value not in (None, ""):
                    metadata[column] = value
            elif canonical == "prompt":
                values["prompt"] = _text(value, column, required=True)
            elif canonical == "response":
                values["response"] = _text(value, column, required=False)
            elif canonical == "context":
                values["context"] = _context(value, column)
            else:
                values[canonical] = _COERCE[canonical](value, column)
    except FieldError as err:
        return field_reject(source, line, err, record)
    return _Row(line=line, values=values, metadata=metadata)


def _text(value: Any, column: str, *, required: bool) -> str:
    if value is None or (isinstance(value, float) and value != value):
        value = ""
    if not isinstance(value, str):
        raise FieldError(column, f"expected text, got {type(value).__name__}")
    if required and not value.strip():
        raise FieldError(column, "missing prompt")
    return value


def _context(value: Any, column: str) -> tuple[Message, ...]:
    """Earlier messages: a JSON list of {role, content} (or {from, value}) objects."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise FieldError(column, "expected a JSON list of {role, content} messages") from None
    if not isinstance(value, list):
        raise FieldError(column, "expected a JSON list of {role, content} messages")
    unstorable = unstorable_text(value, column)  # JSON escapes may spell what the cell cannot
    if unstorable is not None:
        raise unstorable
    messages = []
    for i, raw in enumerate(value):
        role_name = raw.get("role", raw.get("from")) if isinstance(raw, dict) else None
        content = raw.get("content", raw.get("value")) if isinstance(raw, dict) else None
        role = canonical_role(role_name) if isinstance(role_name, str) else None
        if role is None or not isinstance(content, str):
            raise FieldError(f"{column}[{i}]", "expected {role, content} with a known role")
        messages.append(Message(role=role, content=content))
    return tuple(messages)


def _conversations(
    rows: Iterable[_Row | Reject | Truncation | Notice], *, source: str
) -> Iterator[Parsed]:
    """Group contiguous rows of one conversation_id; a row without one is its own conversation."""
    group: list[_Row] = []
    finished: set[str] = set()
    for row in rows:
        if not isinstance(row, _Row):
            yield row
            continue
        key = row.values.get("conversation_id")
        if group and (key is None or key != group[0].values.get("conversation_id")):
            yield _conversation(group, source)
            if (done := group[0].values.get("conversation_id")) is not None:
                finished.add(done)
            group = []
        if key is not None and key in finished:
            yield Reject(
                source=source,
                line=row.line,
                field="conversation_id",
                reason=f"rows of conversation {key!r} are not contiguous; "
                "sort the file by conversation_id",
            )
            continue
        group.append(row)
    if group:
        yield _conversation(group, source)


def _conversation(rows: list[_Row], source: str) -> Conversation:
    ordered = sorted(
        enumerate(rows),
        key=lambda pair: (
            pair[1].values.get("turn_index") is None,
            pair[1].values.get("turn_index") or 0,
            pair[0],
        ),
    )
    first = rows[0].values
    messages: list[Message] = list(first.get("context", ()))
    regenerated: str | None = None  # the prompt of the row before, when its answer was retried
    for _, row in ordered:
        v = row.values
        response = v.get("response", "")
        if v["prompt"] != regenerated:  # else the same request answered again: one user turn
            messages.append(
                Message(
                    role="user",
                    content=v["prompt"],
                    created_at=v.get("created_at"),
                    # An unanswered row is a saved input: it keeps the model it was meant for.
                    model=None if response else v.get("model"),
                    external_id=None if response else v.get("external_id"),
                    metadata=None if response else (row.metadata or None),
                )
            )
        regenerated = v["prompt"] if response and v.get("retried") else None
        if response:
            messages.append(
                Message(
                    role="assistant",
                    content=response,
                    created_at=v.get("created_at"),
                    model=v.get("model"),
                    external_id=v.get("external_id"),
                    retried=v.get("retried"),
                    edited=v.get("edited"),
                    deleted=v.get("deleted"),
                    rating=v.get("rating"),
                    thumbs=v.get("thumbs"),
                    metadata=row.metadata or None,
                )
            )
    single = len(rows) == 1
    # A conversation's time stands in for its messages' own (ingest.exchanges): set it only
    # when every row has one, so a row without a time is stored without one, not the first's.
    every_row_timed = all(r.values.get("created_at") for r in rows)
    return Conversation(
        messages=tuple(messages),
        source=source,
        line=rows[0].line,
        external_id=first.get("conversation_id") or (first.get("external_id") if single else None),
        instruction=next(
            (r.values["instruction"] for r in rows if r.values.get("instruction")), None
        ),
        created_at=first.get("created_at") if every_row_timed else None,
    )
