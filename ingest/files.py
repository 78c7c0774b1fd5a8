"""Low-level file access shared by every reader: gzip, bounded lines, streamed JSON records.

Real log files are compressed, truncated, binary by mistake, or hold one 50 MB line. The
functions here turn each of those into a `Reject` or `Truncation` the caller can count, so a
reader only ever sees whole, decoded records and never holds more than one of them in memory.
"""

from __future__ import annotations

import codecs
import gzip
import json
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from ingest.records import Reject, Truncation

DEFAULT_MAX_LINE_BYTES = 8 * 1024 * 1024
GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"  # Excel's "CSV UTF-8" and Windows editors start files with it
SNIFF_BYTES = 64 * 1024
# What reading a cut or corrupt file raises: gzip's EOFError for a stream cut short,
# zlib.error for damaged compressed data (neither is an OSError).
READ_ERRORS = (OSError, EOFError, zlib.error)
_SKIP_CHUNK = 1024 * 1024
_EXCERPT_CHARS = 200
# Bytes that never appear in a text log; a few are tolerated (stray form feeds, escapes).
_CONTROL_BYTES = bytes(b for b in range(32) if b not in (9, 10, 12, 13, 27))
# What a folder given to `ingest` expands to: files named like a log, gzipped or not.
LOG_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet")
# The rejects files an ingest writes (in the working directory unless told otherwise).
REJECTS_PREFIX = "convoscope-rejects-"


@dataclass(frozen=True, slots=True)
class Line:
    """One non-blank line of a text file, decoded, with where it is."""

    number: int  # 1-based
    offset: int  # byte offset of its first byte (in the decompressed stream)
    text: str


@dataclass(frozen=True, slots=True)
class Record:
    """One parsed record: a JSONL line, an item of a top-level JSON array, or a table's row
    (its values by column name)."""

    number: int  # 1-based line (JSONL, CSV) or item number (JSON array) or row (Parquet)
    value: Any


def unwritable_reason(path: Path) -> str | None:
    """Why a file cannot be written at `path` (a folder is there, or a file stands where a
    folder of its path should be), or None; checked before work starts, not after it."""
    if path.is_dir():
        return "is a folder; give a file name"
    folder = next(p for p in path.expanduser().resolve().parents if p.exists())
    return None if folder.is_dir() else f"cannot be created: {folder} is a file, not a folder"


def log_files_in(directory: Path) -> list[Path]:
    """The log files below a folder, in name order: those named like a log (`LOG_SUFFIXES`,
    optionally `.gz`), leaving out hidden files and folders and convoscope's own rejects files.

    So `convoscope ingest logs/` takes a folder of daily exports, and running it again after
    more days arrive stores only the new ones (the others are duplicates by content).
    """
    found = []
    for path in sorted(directory.rglob("*")):
        parts = path.relative_to(directory).parts
        name = path.name.lower().removesuffix(".gz")
        if (
            path.is_file()
            and name.endswith(LOG_SUFFIXES)
            and not path.name.startswith(REJECTS_PREFIX)
            and not any(part.startswith(".") for part in parts)
        ):
            found.append(path)
    return found


def is_gzip(path: Path) -> bool:
    """True when the file starts with gzip's magic bytes, whatever its name says."""
    with open(path, "rb") as raw:
        return raw.read(2) == GZIP_MAGIC


@contextmanager
def open_binary(path: Path) -> Iterator[BinaryIO]:
    """Open a file for binary reading, decompressing gzip transparently (by magic bytes)."""
    if is_gzip(path):
        with gzip.open(path, "rb") as gz:
            yield gz  # type: ignore[misc]
    else:
        with open(path, "rb", buffering=1024 * 1024) as f:
            yield f


def skip_bom(f: BinaryIO) -> int:
    """Read past a UTF-8 BOM at the start of `f` (peeked, so other files lose nothing);
    return how many bytes were skipped, for byte offsets.

    A BOM is no part of the first record: left in, it made that line invalid JSON, hid a JSON
    array from ijson and renamed a CSV's first column.
    """
    try:
        start = f.peek(len(UTF8_BOM))[: len(UTF8_BOM)]  # type: ignore[attr-defined]
    except READ_ERRORS:  # a corrupt gzip stream: the caller's own read reports it
        return 0
    return len(f.read(len(UTF8_BOM))) if start == UTF8_BOM else 0


def head(path: Path, size: int = SNIFF_BYTES) -> bytes:
    """The first `size` bytes of the (decompressed) file, for sniffing: as much as could be
    read of a cut or corrupt gzip stream."""
    with open_binary(path) as f:
        return read_up_to(f, size)[0]


def read_up_to(f: BinaryIO, size: int) -> tuple[bytes, bool]:
    """Up to `size` bytes (fewer at the end of the data) and whether the stream broke there.

    A piece at a time: one `read(size)` of a gzip stream cut short or corrupt raises and
    drops every byte it had decompressed, so a small cut `.jsonl.gz` was rejected whole as
    an empty file, and a cut JSON array lost the items of its last chunk."""
    data = bytearray()
    try:
        while len(data) < size:
            piece = f.read1(size - len(data))  # type: ignore[attr-defined]
            if not piece:
                break
            data += piece
    except READ_ERRORS:
        return bytes(data), True
    return bytes(data), False


def looks_binary(data: bytes) -> bool:
    """True for content that is not a text log: NUL bytes or many control bytes."""
    if b"\x00" in data:
        return True
    if not data:
        return False
    controls = len(data) - len(data.translate(None, _CONTROL_BYTES))
    return controls / len(data) > 0.05


def whole_file_reject(path: Path, source: str) -> Reject | None:
    """A reject for a file that holds no log at all (empty or binary), else None."""
    with open_binary(path) as f:
        start, broke = read_up_to(f, SNIFF_BYTES)
    if broke and not start:
        return Reject(source=source, line=0, reason="nothing readable: damaged or cut gzip data")
    if not start.removeprefix(UTF8_BOM).strip():
        return Reject(source=source, line=0, reason="empty file")
    if looks_binary(start) and not start.startswith(b"PAR1"):
        return Reject(source=source, line=0, reason="binary file, not a log")
    return None


def excerpt(raw: bytes | str) -> str:
    """The first characters of a record, decoded leniently, for a human to find it.

    A lone surrogate is written as its escape (`\\ud83d`): the rejects file is UTF-8, which
    cannot hold one, and the record that held it is often the very reject being written.
    """
    if isinstance(raw, bytes):
        raw = raw[: _EXCERPT_CHARS * 4].decode("utf-8", errors="replace")
    text = raw[:_EXCERPT_CHARS]
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def iter_lines(
    path: Path,
    *,
    source: str,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    keep_blank: bool = False,
) -> Iterator[Line | Reject | Truncation]:
    """Decoded lines; an over-long or non-UTF-8 line becomes a Reject and is skipped.

    Blank lines are skipped unless `keep_blank` (CSV needs them inside quoted cells).

    `readline(limit)` never returns more than `limit` bytes, so a 50 MB line costs one bounded
    read plus chunked skipping, not 50 MB of memory. A file with no non-blank line (or an empty,
    binary file) yields a single whole-file Reject at line 0.
    """
    problem = whole_file_reject(path, source)
    if problem is not None:
        yield problem
        return
    number = 0
    with open_binary(path) as f:
        offset = skip_bom(f)
        while True:
            try:
                raw = f.readline(max_line_bytes + 1)
            except READ_ERRORS:  # a cut or corrupt gzip stream: the data ends here
                yield Truncation(
                    source=source, line=number + 1, byte_offset=offset, records_kept=number
                )
                return
            if not raw:
                return
            number += 1
            start = offset
            offset += len(raw)
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                skipped = _skip_rest_of_line(f)
                offset += skipped
                yield Reject(
                    source=source,
                    line=number,
                    reason=f"line longer than {max_line_bytes} bytes "
                    f"({len(raw) + skipped} bytes), skipped",
                    excerpt=excerpt(raw),
                )
                continue
            if not keep_blank and not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield Reject(
                    source=source,
                    line=number,
                    reason=f"invalid UTF-8 at byte {err.start} of the line",
                    excerpt=excerpt(raw),
                )
                continue
            yield Line(number=number, offset=start, text=text)


def _skip_rest_of_line(f: BinaryIO) -> int:
    """Read and drop bytes up to and including the next newline; return how many."""
    skipped = 0
    while True:
        chunk = f.readline(_SKIP_CHUNK)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped


def first_json_byte(path: Path) -> bytes:
    """The first non-whitespace byte of the (decompressed) file, BOM skipped; b"" if none."""
    start = head(path).removeprefix(UTF8_BOM).lstrip()
    return start[:1]


def iter_json_records(
    path: Path, *, source: str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> Iterator[Record | Reject | Truncation]:
    """JSON records from a JSONL file or a top-level JSON array, whichever the file holds."""
    if first_json_byte(path) == b"[":
        problem = whole_file_reject(path, source)
        if problem is not None:
            yield problem
            return
        yield from _iter_json_array(path, source=source, max_item_bytes=max_line_bytes)
    else:
        yield from _iter_jsonl(path, source=source, max_line_bytes=max_line_bytes)


def _iter_jsonl(
    path: Path, *, source: str, max_line_bytes: int
) -> Iterator[Record | Reject | Truncation]:
    """Parse each line; a last line cut mid-record is a Truncation, any other bad line a Reject."""
    kept = 0
    pending: tuple[Line, str] | None = None  # the latest unparsable line: maybe the cut
    for item in iter_lines(path, source=source, max_line_bytes=max_line_bytes):
        if pending is not None:
            yield _bad_line(source, *pending)
            pending = None
        if isinstance(item, Reject):
            yield item
            continue
        if isinstance(item, Truncation):
            yield replace(item, records_kept=kept)
            return
        try:
            value = json.loads(item.text)
        except json.JSONDecodeError as err:
            pending = (item, f"invalid JSON: {err.msg} at column {err.colno}")
            continue
        except RecursionError:
            yield _bad_line(source, item, _TOO_DEEP)
            continue
        kept += 1
        yield Record(number=item.number, value=value)
    if pending is not None:
        line, reason = pending
        if line.text.endswith("\n"):
            yield _bad_line(source, line, reason)
        else:  # the file stops inside this line: it was cut, not written wrong
            yield Truncation(
                source=source, line=line.number, byte_offset=line.offset, records_kept=kept
            )


def _bad_line(source: str, line: Line, reason: str) -> Reject:
    return Reject(source=source, line=line.number, reason=reason, excerpt=excerpt(line.text))


def _iter_json_array(
    path: Path, *, source: str, max_item_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> Iterator[Record | Reject | Truncation]:
    """Stream the items of a top-level array: never the whole file, one item at a time.

    Each item is parsed by the json module, as a JSONL line is, so a record means the same in
    either layout: a lone surrogate escape (`"\\ud83d"`) stays in the text, for
    `unstorable_text` to reject its record by field. ijson's C backend (yajl) turned it into
    "?" unseen, merged it with a next escape into another character, and failed the file on a
    lone low surrogate. Parsing is as fast as ijson's.

    The first syntax error ends the file (after a broken item, where the next one starts cannot
    be known): at the end of the data it is a Truncation (every whole item before it was
    yielded), elsewhere a Reject. `byte_offset` is where the data stops, in decompressed bytes.
    An item longer than `max_item_bytes` is rejected as a JSONL line that long is
    (`--max-line-mb`), so a record is kept or not whichever layout holds it.
    """
    number = 0
    with open_binary(path) as f:
        data = _ArrayText(f)
        pos = data.skip_space(0)
        if not data.text.startswith("[", pos):  # a form feed before it, say: not JSON
            yield _array_stop(number, source, f"expected '[' at byte {data.byte_offset(pos)}")
            return
        pos = data.skip_space(pos + 1)
        closed = data.text.startswith("]", pos)
        if closed:
            pos = data.skip_space(pos + 1)
        while not closed and pos < len(data.text):
            pos = data.forget(pos)
            text = data.text
            try:
                value, end = _JSON.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                if not data.done and _ran_out(err, text, exact=False):
                    data.more(pos)
                    pos = 0
                    continue
                if _ran_out(err, text, exact=True):
                    break  # the data stops inside this item
                why = f"{err.msg.removesuffix(' at')} at byte {data.byte_offset(err.pos)}"
                yield _array_stop(number, source, data.problem or f"invalid JSON ({why})")
                return
            except RecursionError:  # where this item ends is not known: as a syntax error
                yield _array_stop(number, source, _TOO_DEEP)
                return
            after = _SPACE.match(text, end).end()
            if after == len(text) or text[after] not in ",]":
                if not data.done and len(text) - after <= _NEAR_END:
                    data.more(pos)  # what follows tells where the item ends: `1` may go on
                    pos = 0
                    continue
                if type(value) in (int, float) and _NUMBER_TAIL.fullmatch(text[after:].rstrip()):
                    break  # the data stops inside a number (`1.`, or `12` of 123)
                number += 1
                yield _item(source, number, value, text, pos, end, max_item_bytes)
                if after == len(text):
                    break  # the data stops after this item, the array still open
                why = f"expected ',' or ']' at byte {data.byte_offset(after)}"
                yield _array_stop(number, source, data.problem or f"invalid JSON ({why})")
                return
            number += 1
            yield _item(source, number, value, text, pos, end, max_item_bytes)
            closed = text[after] == "]"
            pos = data.skip_space(after + 1)
        if data.problem is not None:
            yield _array_stop(number, source, data.problem)
        elif not closed:  # the data stops before the array is closed: the file was cut
            yield Truncation(
                source=source, line=number + 1, byte_offset=data.consumed, records_kept=number
            )
        elif pos < len(data.text):  # only whitespace may follow the array
            why = f"data after the closing ']' at byte {data.byte_offset(pos)}"
            yield _array_stop(number, source, f"invalid JSON ({why})")


def _item(
    source: str, number: int, value: Any, text: str, start: int, end: int, max_bytes: int
) -> Record | Reject:
    """The array item (`text[start:end]`) as a Record, or a Reject when its JSON is over the
    line limit."""
    if (end - start) * 4 > max_bytes:  # a character is at most 4 bytes: encode only then
        raw = text[start:end]
        size = len(raw.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            return Reject(
                source=source,
                line=number,
                reason=f"array item longer than {max_bytes} bytes ({size} bytes), skipped",
                excerpt=excerpt(raw),
            )
    return Record(number=number, value=value)


# Measured on the ShareGPT file: as fast as ijson; 1 MB chunks (and the copies `forget`
# makes of them) parsed 50% slower.
_READ_CHUNK = 256 * 1024
_JSON = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace (str.isspace takes more)
# What a value can stop within at the end of the data, besides an open string: a literal or
# a number's fraction or exponent begun (`tru`, `-`, `1.`, `2e+`).
_LITERALS = ("true", "false", "null", "NaN", "Infinity", "-Infinity")
_NUMBER_TAIL = re.compile(r"|\.|[eE][-+]?")
_TOO_DEEP = "JSON nested too deeply to read (about 1,000 levels of arrays and objects)"
_NEAR_END = 32  # errors this close to the end of the text read may be the text running out


class _ArrayText:
    """The decoded text of a JSON array file, read a chunk at a time as the parse needs it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self.consumed = skip_bom(f)  # bytes read, BOM included: where a cut file's data stops
        self.text = ""
        self.done = False  # no more text: the file, its readable gzip stream or its UTF-8 ends
        self.problem: str | None = None  # why the text ended before the file, as a reason

    def more(self, keep: int) -> None:
        """Drop the text before `keep` and read on: at least as much again as is kept, so an
        item spanning many chunks is parsed a few times over, not once per chunk."""
        data, broke = read_up_to(self._f, max(_READ_CHUNK, len(self.text) - keep))
        start = self.consumed
        self.consumed += len(data)
        self.done = not data or broke  # a cut or corrupt gzip stream: the data ends here
        try:
            decoded = self._utf8.decode(data, final=self.done)
        except UnicodeDecodeError as err:  # keep the text before the bad byte, stop there
            decoded = err.object[: err.start].decode("utf-8")
            if not (self.done and err.reason == "unexpected end of data"):  # not a cut
                held = len(err.object) - len(data)  # bytes of a character begun before
                self.problem = f"invalid UTF-8 at byte {start - held + err.start}"
            self.done = True
        self.text = self.text[keep:] + decoded

    def forget(self, pos: int) -> int:
        """Drop the text before `pos` once that is most of it; return where `pos` is now.

        A parse that runs out of text at the end of a chunk raises an error whose line number
        json counts from the start of the text: with the whole chunk kept, that counting cost
        a fifth of the parse. Dropping half of the text or more at a time copies less than a
        chunk per chunk.
        """
        if pos <= len(self.text) >> 1:
            return pos
        self.text = self.text[pos:]
        return 0

    def skip_space(self, pos: int) -> int:
        """Where the next non-whitespace character is, reading on as needed; len(text) when the
        data ends first. The text before `pos` may be dropped: use the position returned."""
        while True:
            pos = _SPACE.match(self.text, pos).end()  # type: ignore[union-attr]
            if pos < len(self.text) or self.done:
                return pos
            self.more(pos)
            pos = 0

    def byte_offset(self, pos: int) -> int:
        """The file offset of character `pos` of the text (for a reject: only on errors)."""
        held = len(self._utf8.getstate()[0])
        return self.consumed - held - len(self.text[pos:].encode("utf-8", "surrogatepass"))


def _ran_out(err: json.JSONDecodeError, text: str, *, exact: bool) -> bool:
    """Whether parsing failed because the text stops, not on a mistake: more data may complete
    the item, or, at the end of the data, the file was cut inside it.

    The json module reports an open string where it starts, any other stop within a literal's
    length of the end. With no more data (`exact`), what is left must begin a value.
    """
    if err.msg.startswith("Unterminated string"):
        return True
    if len(text) - err.pos > _NEAR_END:
        return False
    if not exact:
        return True
    rest = text[err.pos :].rstrip(" \t\n\r")
    return (
        not rest
        or any(word.startswith(rest) for word in _LITERALS)
        or _NUMBER_TAIL.fullmatch(rest) is not None
        or (err.msg.startswith("Invalid \\uXXXX") and '"' not in rest)
    )


def _array_stop(number: int, source: str, why: str) -> Reject:
    """The Reject that ends an array file at the item after `number`."""
    return Reject(
        source=source,
        line=number + 1,
        reason=f"{why} in array item {number + 1}; the rest of the file could not be read",
    )
