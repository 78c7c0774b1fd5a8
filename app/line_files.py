"""The small input files `convoscope reward --file` and `route --file` score, line by line.

A bad line costs only itself, as in ingest: it is reported with its file, line, field and
reason, and the lines around it are still scored, so one stray line in a file of thousands
never throws the rest away. Each result keeps its line number so callers can join it back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ingest.files import READ_ERRORS, UTF8_BOM, open_binary


@dataclass(frozen=True, slots=True)
class LineRecord:
    """The fields read from one good line."""

    line: int
    fields: dict[str, str]


@dataclass(frozen=True, slots=True)
class LineReject:
    """Why one line was skipped."""

    file: str
    line: int
    field: str | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        field = f"field {self.field!r}: " if self.field else ""
        return f"{where}: {field}{self.reason}"


class NotLineDelimited(ValueError):
    """The file is one JSON document spread over many lines (pretty-printed), not a record a
    line: read line by line, its every line would be a bad line or, as plain text, a prompt."""


def read_line_file(
    path: Path,
    fields: Sequence[str],
    *,
    plain_field: str | None = None,
    alternative: Sequence[str] = (),
    optional: Sequence[str] = (),
    checks: Mapping[str, Callable[[str], str | None]] | None = None,
) -> tuple[list[LineRecord], list[LineReject]]:
    """JSONL objects whose `fields` are strings; with `plain_field`, a line that does not start
    with `{` is that field's text as it stands. Blank lines are skipped silently.

    A line that has one of the `alternative` fields the main shape lacks must have all of
    them instead (a battle's two answers where a pair has one), and is named by that shape
    when one is missing. `optional` fields are kept when they are strings and may be null or
    left out; another value (`"winner": 1`) is a bad line, not a battle silently unjudged.
    `checks` maps a field to a function that says what is wrong with its value (None when
    nothing is). A first line that only opens a JSON document (`{` or `[`, as `json.dump`
    with an indent and `jq` write one) is NotLineDelimited: its lines are no records, and
    `route --file` routed each of them (`"intent": [`, `],`) as a prompt."""
    records: list[LineRecord] = []
    rejects: list[LineReject] = []
    opened = False
    with open_binary(path) as handle:  # gzipped or not, as `ingest` reads files
        for number, raw in _numbered_lines(handle, path, rejects):
            if number == 1:  # a Windows editor's BOM is no part of the first line, as in ingest
                raw = raw.removeprefix(UTF8_BOM)
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as error:
                reason = f"not valid UTF-8 (byte {error.start})"
                rejects.append(LineReject(str(path), number, None, reason))
                continue
            if not text:
                continue
            if not opened and text in ("{", "["):
                raise NotLineDelimited(
                    f"{path}:{number}: the file is one JSON document spread over many lines, "
                    "not a record a line: write one JSON object a line (JSONL; `jq -c '.[]'` "
                    "turns an array into one)"
                    + (" or one plain-text prompt a line" if plain_field else "")
                )
            opened = True
            if plain_field is not None and not text.startswith("{"):
                records.append(LineRecord(number, {plain_field: text}))
                continue
            outcome = _parse(text, fields, alternative, optional, checks or {})
            if isinstance(outcome, tuple):
                rejects.append(LineReject(str(path), number, *outcome))
            else:
                records.append(LineRecord(number, outcome))
    return records, rejects


def _numbered_lines(
    handle: BinaryIO, path: Path, rejects: list[LineReject]
) -> Iterator[tuple[int, bytes]]:
    """The file's lines, numbered from 1; a gzip stream cut short or damaged ends them with a
    reject at the line it could not read, keeping the lines before it."""
    number = 0
    try:
        for number, raw in enumerate(handle, 1):
            yield number, raw
    except READ_ERRORS as error:
        reason = f"the file could not be read past here ({type(error).__name__}: {error})"
        rejects.append(LineReject(str(path), number + 1, None, reason))


def _parse(
    text: str,
    fields: Sequence[str],
    alternative: Sequence[str],
    optional: Sequence[str],
    checks: Mapping[str, Callable[[str], str | None]],
) -> dict[str, str] | tuple[str | None, str]:
    """The line's fields, or (field, reason) when it cannot be used."""
    try:
        value = json.loads(text)
    except ValueError as error:
        return None, f"not JSON ({error})"
    if not isinstance(value, dict):
        return None, f"expected a JSON object with {', '.join(fields)}"
    others = [name for name in alternative if name not in fields and name in value]
    if others:
        mine = [name for name in fields if name not in alternative and name in value]
        if mine:  # which shape was meant is a guess: the field the guess dropped was lost
            return mine[0], (
                f"given with {', '.join(others)}: a line holds {', '.join(fields)} or "
                f"{', '.join(alternative)}, not both"
            )
        fields = alternative
    for name in fields:
        if name not in value:
            return name, "missing"
        if not isinstance(value[name], str):
            return name, f"must be a string, not {type(value[name]).__name__}"
    for name in optional:  # null is "not given"; a number is no verdict or name to drop
        if value.get(name) is not None and not isinstance(value[name], str):
            return name, f"must be a string or null, not {type(value[name]).__name__}"
    kept = {name: value[name] for name in optional if isinstance(value.get(name), str)}
    kept |= {name: value[name] for name in fields}
    for name, check in checks.items():
        if name in kept and (problem := check(kept[name])) is not None:
            return name, problem
    return kept
