"""Guess a log file's format from its first bytes and its first records' keys.

Detection reads a bounded head of the file: the first records (up to `_SNIFF_LINES`) in turn,
until one fits a format, so a first record that is empty or incomplete (`{"messages": []}`, a
battle without a winner) does not decide for the whole file. Array items' keys are read as
parse events, so a huge or truncated item costs nothing (items yajl cannot decode, holding a
lone low surrogate escape, are parsed whole instead). When no record fits a known format
the error says what the first one held, so the user can pick `--format` or fix the file.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import ijson

from ingest.files import (
    DEFAULT_MAX_LINE_BYTES,
    READ_ERRORS,
    UTF8_BOM,
    Line,
    Record,
    first_json_byte,
    head,
    iter_json_records,
    iter_lines,
    looks_binary,
    open_binary,
    skip_bom,
)

_SNIFF_LINES = 20
_MESSAGE_LISTS = ("messages", "conversations", "conversation")
_CHAI_KEYS = frozenset({"bot_id", "bot_name"})
_CHAI_MESSAGE_KEYS = frozenset({"sender", "sent_date", "deleted", "sender_type", "is_user"})
_TABULAR_SUFFIXES = (".csv", ".tsv")
_CANONICAL_COLUMNS = frozenset({"prompt", "response", "conversation_id"})
# The keys of every row of `convoscope export` (ingest.exported.REQUIRED_KEYS), and the columns
# of its CSV and Parquet files.
EXPORT_KEYS = frozenset({"id", "conversation_id", "turn_index", "prompt", "response", "context"})


def detect_format(path: Path, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> str:
    """One of "openai", "sharegpt", "chai", "battles", "csv", "parquet", "convoscope" (our own
    export, JSONL, CSV or Parquet); ValueError otherwise."""
    path = Path(path)
    start = head(path)
    if start.startswith(b"PAR1"):
        return "convoscope" if set(_parquet_columns(path)) >= EXPORT_KEYS else "parquet"
    if not start.strip():
        raise ValueError(f"cannot detect the format of {path}: the file is empty")
    if looks_binary(start):
        raise ValueError(f"cannot detect the format of {path}: binary content, not a log")
    first = first_json_byte(path)
    if first in (b"[", b"{"):
        records = _array_item_keys(path) if first == b"[" else _jsonl_keys(path, max_line_bytes)
        first_keys: set[str] | None = None
        for keys, message_keys in records:
            found = classify(keys, message_keys)
            if found is not None:
                return found
            if first_keys is None:
                first_keys = keys
        body = start.removeprefix(UTF8_BOM).lstrip()
        if first == b"[" and body[1:].lstrip()[:1] == b"]":
            raise ValueError(f"{path} is an empty JSON array: no records to ingest")
        if first == b"{" and body.split(b"\n", 1)[0].strip() == b"{":
            # A pretty-printed object (a dataset's dict of splits): no --format reads it.
            raise ValueError(
                f"cannot read {path}: it is one JSON object spread over many lines, neither "
                "JSON lines (a record a line) nor a JSON array of records; write its records "
                "one a line (`jq -c '.KEY[]'` does) or as an array, and ingest that"
            )
        kind = "a JSON array whose first item" if first == b"[" else "JSON lines whose first record"
        seen = (
            f"{kind} is not a JSON object"
            if first_keys is None
            else f"{kind} has keys {sorted(first_keys)}"
        )
    else:
        tabular = _tabular_format(path, start)
        if tabular is not None:
            return tabular
        text = start[:80].decode("utf-8", errors="replace")
        seen = f"text starting {text!r}"
    raise ValueError(
        f"cannot detect the format of {path}: saw {seen}; expected OpenAI chat "
        "(messages), ShareGPT (conversations), Chai (messages with sender), battles "
        "(winner, model_a, response_a), a convoscope JSONL export (id, conversation_id, "
        "turn_index, prompt, response, context), CSV or Parquet. Pass --format to choose one."
    )


def classify(keys: set[str], message_keys: set[str]) -> str | None:
    """The format whose keys these are: a record's top-level keys and its first message's keys."""
    if keys >= EXPORT_KEYS:  # convoscope's own export: read back under the stored ids
        return "convoscope"
    if "winner" in keys and ({"response_a", "model_a"} & keys):
        return "battles"
    if "conversations" in keys and {"from", "value"} & message_keys:
        return "sharegpt"
    if not set(_MESSAGE_LISTS) & keys:
        return None
    if _CHAI_KEYS & keys or _CHAI_MESSAGE_KEYS & message_keys:
        return "chai"
    if "role" in message_keys:
        return "openai"
    if "thumbs_up" in keys:  # Chai's conversation-level feedback, messages not telling
        return "chai"
    if "conversations" in keys:
        return "sharegpt"
    return None


def _array_item_keys(path: Path) -> Iterator[tuple[set[str], set[str]]]:
    """Keys of each object among the first items and of its first message, from parse events
    (read lazily: the caller stops at the first item that fits a format)."""
    keys: set[str] = set()
    message_keys: set[str] = set()
    message_prefixes = {f"item.{name}.item" for name in _MESSAGE_LISTS}
    current: str | None = None  # the prefix of the first message while it is being read
    done = False
    items = 0
    with open_binary(path) as f:
        skip_bom(f)
        try:
            for prefix, event, value in ijson.parse(f):
                if prefix == "item" and event == "map_key":
                    keys.add(value)
                elif prefix == "item" and event not in ("start_map", "start_array"):
                    if event == "end_map":  # else a list or a scalar item: no keys
                        yield keys, message_keys
                    items += 1
                    if items == _SNIFF_LINES:
                        return
                    keys, message_keys, current, done = set(), set(), None, False
                elif done or prefix not in message_prefixes:
                    continue
                elif event == "start_map":
                    current = prefix
                elif event == "map_key" and prefix == current:
                    message_keys.add(value)
                elif event == "end_map" and prefix == current:
                    done = True
        except (ijson.JSONError, *READ_ERRORS):
            pass  # a truncated or broken item or file: classify what was seen of it
        except UnicodeDecodeError:  # yajl fails on a lone low surrogate escape ("\\udc00")
            yield from _parsed_item_keys(path)
            return
    if keys:
        yield keys, message_keys


def _parsed_item_keys(path: Path) -> Iterator[tuple[set[str], set[str]]]:
    """Keys of the first array items and of their first message, from the items parsed whole
    as ingest reads them (a record yajl cannot read is one the reader rejects, not the file)."""
    for record in islice(iter_json_records(path, source=str(path)), _SNIFF_LINES):
        if type(record) is not Record:
            return
        item = record.value
        if isinstance(item, dict):
            first = next((item[k] for k in item if k in _MESSAGE_LISTS), None)
            message = first[0] if isinstance(first, list) and first else None
            yield set(item), set(message) if isinstance(message, dict) else set()


def _jsonl_keys(path: Path, max_line_bytes: int) -> Iterator[tuple[set[str], set[str]]]:
    """Keys of each JSON object among the first lines (bad lines are passed over)."""
    lines = iter_lines(path, source=str(path), max_line_bytes=max_line_bytes)
    for line in islice(lines, _SNIFF_LINES):
        if not isinstance(line, Line):
            continue
        try:
            record = json.loads(line.text)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            yield set(record), _message_keys(record)


def _message_keys(record: dict) -> set[str]:
    for name in _MESSAGE_LISTS:
        messages = record.get(name)
        if isinstance(messages, list) and messages and isinstance(messages[0], dict):
            return set(messages[0])
    return set()


def _tabular_format(path: Path, start: bytes) -> str | None:
    """The format of a table: "convoscope" when its header line names our export's columns,
    "csv" for another (a .csv/.tsv name, or a header line naming canonical columns); None for
    text that is no table."""
    first_line = start.removeprefix(UTF8_BOM).split(b"\n", 1)[0].decode("utf-8", errors="replace")
    delimiters = (",", "\t", ";")
    headers = [next(csv.reader(io.StringIO(first_line), delimiter=d), []) for d in delimiters]
    if any(set(header) >= EXPORT_KEYS for header in headers):
        return "convoscope"
    if path.name.lower().removesuffix(".gz").endswith(_TABULAR_SUFFIXES):
        return "csv"
    for header in headers:
        if len(header) > 1 and _CANONICAL_COLUMNS & {h.strip().lower() for h in header}:
            return "csv"
    return None


def _parquet_columns(path: Path) -> list[str]:
    """The column names of a Parquet file (from its footer); none when it cannot be read (the
    Parquet reader rejects it with the reason)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path).names
    except (pa.ArrowException, OSError):
        return []
