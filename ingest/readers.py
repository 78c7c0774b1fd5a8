"""One entry point for every log format, plus the value checks all readers share.

`read_file` detects the format (or takes `--format`) and hands the file to the reader of that
format. Every reader turns a bad record into a `Reject` naming its line and field and keeps
going, so one broken record never costs the good ones around it. The coercion helpers here
are strict on purpose: a rating of "abc" is a reject, never a silent 0.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ingest.detect import detect_format
from ingest.files import (
    DEFAULT_MAX_LINE_BYTES,
    Record,
    excerpt,
    iter_json_records,
    whole_file_reject,
)
from ingest.records import Conversation, Parsed, Reject, UnknownRole

FORMATS = ("openai", "sharegpt", "chai", "battles", "csv", "parquet", "convoscope")


@dataclass(frozen=True)
class ReadOptions:
    """How to read a file: the longest line accepted, a tabular column mapping, a source label,
    whether to merge a gateway's repeated histories.

    `mapping` maps canonical field names to column names (`{"prompt": "question"}`); `source`
    replaces the file path as the label stored with every record (e.g. for a replay run).
    """

    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    mapping: Mapping[str, str] = field(default_factory=dict)
    source: str | None = None
    merge_history: bool = False  # OpenAI chat: lines that repeat a chat's history merge

    def source_for(self, path: Path) -> str:
        return self.source if self.source is not None else str(path)


def read_file(
    path: Path, *, format: str | None = None, options: ReadOptions | None = None
) -> Iterator[Parsed]:
    """Every record of one file, in file order; `format` overrides detection.

    Raises ValueError for an unknown `format` or a file whose format cannot be detected; an
    empty or binary file is not an error but a single Reject at line 0.
    """
    path = Path(path)
    options = options or ReadOptions()
    if format is None:
        problem = whole_file_reject(path, options.source_for(path))
        if problem is not None:
            yield problem
            return
        format = detect_format(path)
    yield from _reader(format)(path, options=options)


def _reader(format: str) -> Callable[..., Iterator[Parsed]]:
    """The reader function of a format name (imported here: the readers import this module)."""
    from ingest import battles, chai, exported, openai_chat, sharegpt, tabular

    readers: dict[str, Callable[..., Iterator[Parsed]]] = {
        "openai": openai_chat.read_openai,
        "sharegpt": sharegpt.read_sharegpt,
        "chai": chai.read_chai,
        "battles": battles.read_battles,
        "csv": tabular.read_csv,
        "parquet": tabular.read_parquet,
        "convoscope": exported.read_exported,  # convoscope's own JSONL export
    }
    if format not in readers:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    return readers[format]


ConvertRecord = Callable[[Any, int, str, list[UnknownRole]], Conversation | Reject]


def read_json_conversations(
    path: Path, options: ReadOptions, convert: ConvertRecord
) -> Iterator[Parsed]:
    """The loop every JSON conversation format shares: records → `convert` → conversations,
    with file-level problems (Rejects, a Truncation) and unknown roles passed through."""
    source = options.source_for(path)
    for item in iter_json_records(path, source=source, max_line_bytes=options.max_line_bytes):
        if type(item) is not Record:
            yield item
            continue
        unknown: list[UnknownRole] = []
        parsed = convert(item.value, item.number, source, unknown)
        yield from unknown
        yield parsed


class FieldError(ValueError):
    """A field of a record has a missing or wrong value; becomes a Reject naming the field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def field_reject(source: str, line: int, err: FieldError, record: Any) -> Reject:
    """The Reject for a record with a bad field, with an excerpt of the record."""
    raw = record if isinstance(record, str) else json.dumps(record, ensure_ascii=False, default=str)
    return Reject(
        source=source, line=line, reason=err.reason, field=excerpt(err.field), excerpt=excerpt(raw)
    )


def not_an_object(source: str, line: int, record: Any) -> Reject:
    return field_reject(
        source, line, FieldError("record", f"expected a JSON object, got {_kind(record)}"), record
    )


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _blank(value: Any) -> bool:
    """None, an empty cell, or NaN (how pandas/pyarrow spell a missing float)."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, float) and math.isnan(value)


def as_text(value: Any, name: str) -> str:
    """A required string."""
    if not isinstance(value, str):
        raise FieldError(name, f"expected a string, got {_kind(value)}")
    return value


def as_optional_text(value: Any, name: str) -> str | None:
    """An optional identifier-like string; numbers are accepted and kept verbatim."""
    if _blank(value):
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise FieldError(name, f"expected a string, got {_kind(value)}")
    return value if isinstance(value, str) else str(value)


_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


def as_bool(value: Any, name: str) -> bool | None:
    """true/false, 1/0, "yes"/"no"; blank is unknown (None)."""
    if _blank(value):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise FieldError(name, f"expected a boolean, got {value!r}")


def as_float(value: Any, name: str) -> float | None:
    """A number (or numeric string); blank is unknown (None)."""
    if _blank(value):
        return None
    if isinstance(value, bool):
        raise FieldError(name, f"expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FieldError(name, f"expected a number, got {value!r}") from None
    if math.isnan(number) or math.isinf(number):
        raise FieldError(name, f"expected a finite number, got {value!r}")
    return number


def as_int(value: Any, name: str) -> int | None:
    """A whole number (3, 3.0 or "3"); blank is unknown (None)."""
    number = as_float(value, name)
    if number is None:
        return None
    if not number.is_integer():
        raise FieldError(name, f"expected a whole number, got {value!r}")
    return int(number)


_UP = {"up", "+1", "1", "thumbs_up", "like", "good", "positive"}
_DOWN = {"down", "-1", "thumbs_down", "dislike", "bad", "negative"}


def as_thumbs(value: Any, name: str) -> int | None:
    """A thumbs signal: +1 / -1, True / False, "up" / "down"; 0 and blank mean none given.
    Another number is refused, not read by its sign: 0.5 or 3 is a score on some scale (it
    was stored as a thumbs up), and a score belongs in `rating`."""
    if _blank(value):
        return None
    if isinstance(value, bool):
        return 1 if value else -1
    if isinstance(value, int | float) and value in (-1, 0, 1):
        return None if value == 0 else int(value)
    if isinstance(value, int | float):
        raise FieldError(
            name,
            f"expected thumbs up/down (+1/-1, true/false, 0 for none), got {value!r}: a score "
            "on another scale is a rating (a `rating` field, or --map rating=COLUMN)",
        )
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _UP:
            return 1
        if text in _DOWN:
            return -1
        if text == "0":
            return None
    raise FieldError(name, f"expected thumbs up/down (+1/-1, true/false), got {value!r}")


def as_thumbs_up(value: Any, name: str) -> int | None:
    """A `thumbs_up` flag: true → +1, false → -1 (false means thumbs down, not "no feedback")."""
    flag = as_bool(value, name)
    return None if flag is None else (1 if flag else -1)


def as_datetime(value: Any, name: str) -> datetime | None:
    """ISO 8601 text or a Unix epoch (seconds, or milliseconds when too large for seconds).

    Naive times are taken as UTC, so differences between messages are always defined; aware
    times are converted to UTC, so every database stores the same instant (SQLite's column is
    naive and would otherwise keep the local wall-clock time).
    """
    if _blank(value):
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        moment = _from_epoch(float(value), name, value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            moment = _from_epoch(float(text), name, value)
        except ValueError:
            try:
                moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise FieldError(
                    name, f"expected an ISO date-time or epoch, got {value!r}"
                ) from None
    else:
        raise FieldError(name, f"expected an ISO date-time or epoch, got {_kind(value)}")
    if hasattr(moment, "to_pydatetime"):  # pandas.Timestamp
        moment = moment.to_pydatetime()
    return moment.astimezone(UTC) if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _from_epoch(seconds: float, name: str, raw: Any) -> datetime:
    if math.isnan(seconds) or math.isinf(seconds):
        raise FieldError(name, f"expected an ISO date-time or epoch, got {raw!r}")
    if abs(seconds) > 1e11:  # milliseconds (1e11 s is the year 5138)
        seconds /= 1000.0
    try:
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        raise FieldError(name, f"epoch out of range: {raw!r}") from None


# Content part types that hold text (a refusal's is under "refusal"): an assistant's answer
# logged as `output_text` or `refusal` parts is its response, not an empty one.
_TEXT_PARTS = ("text", "input_text", "output_text", "refusal")


def content_text(value: Any, name: str) -> str:
    """Message content: a string, or a list of parts whose text parts are joined.

    Non-text parts (images, audio) are dropped; a null content (a tool call) is empty text.
    """
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict):
                kind = part.get("type", "text")
                text = part.get("refusal" if kind == "refusal" else "text")
                if isinstance(text, str) and kind in _TEXT_PARTS:
                    texts.append(text)
            else:
                raise FieldError(f"{name}[{i}]", f"expected a content part, got {_kind(part)}")
        return "\n".join(texts)
    raise FieldError(name, f"expected a string or a list of parts, got {_kind(value)}")


def checked_conversation(
    conversation: Conversation, record: Any, field_name: str = "messages"
) -> Conversation | Reject:
    """The conversation, or a Reject when it has nothing to judge (no user message with text:
    an answer to an empty one is not stored, `ingest.pipeline`) or holds text no database can
    store (`unstorable_text`)."""
    if not conversation.messages:
        err = FieldError(field_name, "no messages")
    elif not any(m.role == "user" for m in conversation.messages):
        err = FieldError(field_name, "no user message (missing prompt)")
    elif not any(m.role == "user" and m.content.strip() for m in conversation.messages):
        err = FieldError(
            field_name, "no user message (missing prompt): every user message is empty"
        )
    else:
        unstorable = unstorable_text(record)
        if unstorable is None:
            return conversation
        err = unstorable
    return field_reject(conversation.source, conversation.line, err, record)


# Characters no database stores: a lone UTF-16 surrogate (JSON's "\ud83d" escape without its
# pair: not Unicode, so not UTF-8 either) and NUL (PostgreSQL refuses it in text; a CSV export
# holding one looks binary).
_UNSTORABLE = re.compile("[\ud800-\udfff\x00]")


def unstorable_text(value: Any, name: str = "") -> FieldError | None:
    """The error for the first string in a record (texts, model names, metadata, keys) that no
    database can store, naming where it is (`messages[0].content`); None when there is none.

    One such string used to fail the database write of the whole batch; as a reject it costs
    only its record. Every string of every record passes here, so the path is built only on a
    find, and an ASCII string without NUL (most of them) costs two C scans.
    """
    found = _find_unstorable(value)
    if found is None:
        return None
    path, char = found
    for part in reversed(path):
        if isinstance(part, int):
            name = f"{name}[{part}]"
        elif name:
            name = f"{name}.{part}"
        else:
            name = part
    if char == "\x00":
        return FieldError(name, "contains a NUL character (\\u0000), which databases cannot store")
    return FieldError(name, f"contains an unpaired surrogate \\u{ord(char):04x}, not valid Unicode")


def _find_unstorable(value: Any) -> tuple[list[str | int], str] | None:
    """The path (innermost step first) to the first unstorable string in `value`, and its bad
    character. Strings are tested inline, not by a call each: this runs on every record."""
    kind = type(value)
    if kind is str:
        if "\x00" not in value:
            try:  # a C scan and copy: four times faster than the regex on non-ASCII text
                value.encode("utf-8")
                return None
            except UnicodeEncodeError:
                pass
        bad = _UNSTORABLE.search(value)
        return None if bad is None else ([], bad.group())
    if kind is dict:
        steps: Iterable[tuple[str | int, Any]] = value.items()
    elif kind is list:
        steps = enumerate(value)
    else:
        return None
    for step, item in steps:
        if type(step) is str and not (step.isascii() and "\x00" not in step):
            found = _find_unstorable(step)
            if found is not None:
                return [step], found[1]
        if type(item) is str and item.isascii() and "\x00" not in item:
            continue
        found = _find_unstorable(item)
        if found is not None:
            found[0].append(step)
            return found
    return None


def leftover(record: Mapping[str, Any], used: set[str] | frozenset[str]) -> dict[str, Any]:
    """The keys a reader did not map to a canonical field: kept as metadata, never dropped."""
    return {k: v for k, v in record.items() if k not in used}


# Keys a log may give a message's (or a conversation's) time under, first match wins.
TIME_KEYS: tuple[str, ...] = ("created_at", "timestamp", "created", "sent_date", "time")


def spelled_time_keys() -> str:
    """TIME_KEYS as a message names them: "`created_at`, ... or `time`"."""
    quoted = [f"`{key}`" for key in TIME_KEYS]
    return f"{', '.join(quoted[:-1])} or {quoted[-1]}"


# Keys a log may use for each per-message signal, first match wins.
_SIGNAL_KEYS: dict[str, tuple[str, ...]] = {
    "created_at": TIME_KEYS,
    "model": ("model", "model_name"),
    "external_id": ("id", "message_id"),
    "retried": ("retried", "regenerated"),
    "edited": ("edited",),
    "deleted": ("deleted",),
    "rating": ("rating",),
    "thumbs": ("thumbs", "thumbs_up"),
}
_COERCE: dict[str, Callable[[Any, str], Any]] = {
    "created_at": as_datetime,
    "model": as_optional_text,
    "external_id": as_optional_text,
    "retried": as_bool,
    "edited": as_bool,
    "deleted": as_bool,
    "rating": as_float,
}


def read_signals(
    record: Mapping[str, Any], name: str, wanted: tuple[str, ...]
) -> tuple[dict[str, Any], set[str]]:
    """The `wanted` signals found in a record (as Message/Conversation kwargs) and the keys used.

    `name` prefixes field names in errors (e.g. "messages[2]"), so a reject points at the value.
    """
    found: dict[str, Any] = {}
    used: set[str] = set()
    for signal in wanted:
        for key in _SIGNAL_KEYS[signal]:
            if key not in record:
                continue
            label = f"{name}.{key}" if name else key
            if key == "thumbs_up":
                value = as_thumbs_up(record[key], label)
            elif signal == "thumbs":
                value = as_thumbs(record[key], label)
            else:
                value = _COERCE[signal](record[key], label)
            used.add(key)
            if value is not None:
                found[signal] = value
            break
    return found, used
