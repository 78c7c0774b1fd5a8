"""The ingest step: files in any supported format → canonical rows in storage.

Readers stream records; whole conversations are split into exchanges and written in batches,
each batch one transaction that skips what is already stored. A batch is written on a thread
while the next one is read (the databases release the GIL while they insert and commit), with
one batch in flight at most, so memory stays bounded; its rows are made ready for the database
on the reading thread (`storage.logs.prepare_batch`), so the writer seldom holds the GIL.
So a re-run stores nothing new, a killed run resumes by running it again, and a bad record
costs only itself: it goes to the rejects file with its file, line, field and reason while the
records around it are stored.
A file rejected whole (line 0: empty, binary, an unknown mapped field) is also a warning in
the summary, since a user would otherwise see only a count. So is an answer to a user message
with no text (empty, whitespace, or images only), which is not stored as an exchange: with no
prompt there is nothing to judge it against or replay. The message and its answer stay in later
turns' context, and the conversation's other exchanges keep their ids.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy.engine import Engine
from tqdm import tqdm

from ingest.detect import detect_format
from ingest.exchanges import battle_exchanges, split_conversation
from ingest.files import REJECTS_PREFIX, unwritable_reason
from ingest.readers import ReadOptions, read_file
from ingest.records import (
    BattleRecord,
    Conversation,
    Exchange,
    Message,
    Notice,
    Reject,
    StoredExchanges,
    Truncation,
    UnknownRole,
    content_hash,
    repeat_id,
)
from storage.contexts import encode_context
from storage.engine import checkpoint
from storage.logs import (
    PreparedBatch,
    finish_ingest_run,
    prepare_batch,
    start_ingest_run,
    store_prepared,
    utcnow,
)


@dataclass(frozen=True, slots=True)
class IngestConfig:
    """How to read: the format (None = detect), the column mapping, batch size, rejects file."""

    format: str | None = None
    mapping: Mapping[str, str] = field(default_factory=dict)
    batch_size: int = 10_000  # fewer, larger DuckDB commits: 1.7x faster than 2,000
    max_line_bytes: int = 8 * 1024 * 1024
    rejects_path: Path | None = None
    progress: bool = True
    limit: int | None = None  # stop after this many conversations/battles per file (samples)
    merge_history: bool = False  # merge OpenAI chat lines that repeat a chat's history


@dataclass(slots=True)
class IngestSummary:
    """What an ingest did, as printed by `convoscope ingest --json`."""

    files: int = 0
    read: int = 0  # exchanges read (each battle contributes two)
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    conversations: int = 0
    battles: int = 0
    battles_stored: int = 0
    rejects_file: str | None = None
    truncated: list[dict[str, Any]] = field(default_factory=list)
    unknown_roles: dict[str, int] = field(default_factory=dict)
    unread_files: int = 0  # files rejected whole (line 0): nothing of them was read
    empty_prompts: int = 0  # exchanges left out: the user message they answer has no text
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_TABULAR_FORMATS = {"csv", "parquet"}  # the formats a --map column mapping applies to


def default_rejects_path() -> Path:
    """A rejects file per run in the working directory; `_RejectsFile` creates it exclusively
    (adding -2, -3... when the name is taken), so runs never overwrite each other."""
    return Path.cwd() / f"{REJECTS_PREFIX}{datetime.now():%Y%m%d-%H%M%S}.jsonl"


def check_rejects_path(rejects: Path, inputs: Sequence[Path]) -> None:
    """Refuse a rejects file that would overwrite an input log or cannot be a file, before
    anything is read (a given rejects file is appended to, never truncated)."""
    target = rejects.expanduser().resolve()
    if any(target == Path(p).expanduser().resolve() for p in inputs):
        raise ValueError(f"--rejects {rejects} is one of the files to ingest; choose another file")
    problem = unwritable_reason(target)
    if problem is not None:
        raise ValueError(f"--rejects {rejects} {problem}")


def ingest_paths(paths: Sequence[Path], *, engine: Engine, config: IngestConfig) -> IngestSummary:
    """Ingest every file in `paths` into the database behind `engine`."""
    if config.rejects_path is not None:
        check_rejects_path(config.rejects_path, paths)
    summary = IngestSummary()
    rejects = _RejectsFile(config.rejects_path)
    unknown_roles: Counter[str] = Counter()
    writer = _BatchWriter(engine, summary)
    try:
        for path in paths:
            _ingest_file(Path(path), engine, config, summary, rejects, unknown_roles, writer)
    finally:
        writer.close()
        rejects.close()
        checkpoint(engine)  # what was stored, kept, in the file rather than in memory
    summary.rejects_file = str(rejects.path) if rejects.count else None
    summary.unknown_roles = dict(unknown_roles)
    return summary


def _ingest_file(
    path: Path,
    engine: Engine,
    config: IngestConfig,
    summary: IngestSummary,
    rejects: _RejectsFile,
    unknown_roles: Counter[str],
    writer: _BatchWriter,
) -> None:
    options = ReadOptions(
        max_line_bytes=config.max_line_bytes,
        mapping=dict(config.mapping),
        source=str(path),
        merge_history=config.merge_history,
    )
    format = _format_name(path, config)
    if config.mapping and format not in _TABULAR_FORMATS | {"unknown"}:
        export = format == "convoscope"
        as_log = "; --format csv or parquet reads an export as a log" if export else ""
        summary.warnings.append(
            f"{path}: --map ignored: the {format} format names its own fields "
            f"(a column mapping is for CSV and Parquet logs{as_log})"
        )
    if config.merge_history and format not in {"openai", "unknown"}:
        summary.warnings.append(
            f"{path}: --merge-history ignored: it merges OpenAI chat logs' lines (this file "
            f"is {format})"
        )
    run_id = start_ingest_run(engine, path=str(path), format=format)
    before = (summary.read, summary.stored, summary.duplicates, summary.rejected)
    batch = _Batch()
    copies = Copies()
    summary.files += 1
    records = read_file(path, format=config.format, options=options)
    bar = tqdm(
        records,
        desc=f"ingest {path.name}",
        unit=" rec",
        disable=None if config.progress else True,
    )
    taken = 0
    empty_prompts = 0
    try:
        for record in bar:
            if config.limit is not None and taken >= config.limit:
                break
            if isinstance(record, Conversation | BattleRecord | StoredExchanges):
                taken += 1
            if isinstance(record, Conversation):
                summary.conversations += 1
                conversation_id = copies.conversation_id(record)
                parts = split_conversation(record, conversation_id)
                prompted = [part for part in parts if part.prompt.strip()]
                empty_prompts += len(parts) - len(prompted)
                batch.add_conversation(record, conversation_id, prompted)
            elif isinstance(record, StoredExchanges):
                summary.conversations += 1
                batch.add_stored(record)
            elif isinstance(record, BattleRecord):
                summary.battles += 1
                pair = battle_exchanges(record)
                batch.add_battle(record, pair, copies.battle_id(record, pair))
            elif isinstance(record, Reject):
                _reject(record, summary, rejects)
            elif isinstance(record, Truncation):
                summary.truncated.append(asdict(record))
            elif isinstance(record, UnknownRole):
                unknown_roles[record.role] += 1
            elif isinstance(record, Notice):
                summary.warnings.append(f"{record.source}: {record.message}")
            if batch.size >= config.batch_size:
                writer.submit(batch.take(engine))
    except (ValueError, OSError) as error:
        # The file as a whole cannot be read (format not recognised, a mapped column that
        # does not exist, no permission to read it): reject the file and go on with the next.
        _reject(Reject(source=str(path), line=0, reason=str(error)), summary, rejects)
    finally:
        bar.close()
        writer.drain()  # the batch in flight is committed even when reading failed
    _store(batch.take(engine), engine, summary)
    if empty_prompts:
        summary.empty_prompts += empty_prompts
        summary.warnings.append(
            f"{path}: {empty_prompts} exchanges left out: the user message each answers has no "
            "text (empty, whitespace, or only images); it stays in later turns' context"
        )
    if summary.read == before[0] and summary.rejected > before[3]:
        _check_forced_format(path, config, summary)
    finish_ingest_run(
        engine,
        run_id,
        read=summary.read - before[0],
        stored=summary.stored - before[1],
        duplicates=summary.duplicates - before[2],
        rejected=summary.rejected - before[3],
        truncated=any(t["source"] == str(path) for t in summary.truncated),
    )


def _reject(reject: Reject, summary: IngestSummary, rejects: _RejectsFile) -> None:
    """Count and write a reject; one of a whole file (line 0) is also a warning."""
    summary.rejected += 1
    rejects.write(reject)
    if reject.line == 0:
        summary.unread_files += 1
        reason = reject.reason.removeprefix(f"{reject.source}: ")  # named once is enough
        summary.warnings.append(f"{reject.source}: not ingested: {reason}")


def _check_forced_format(path: Path, config: IngestConfig, summary: IngestSummary) -> None:
    """Warn when --format made every record of a file a reject and the file reads as another
    format: the rejects would otherwise be the only sign that --format was wrong."""
    if config.format is None:
        return
    try:
        detected = detect_format(path, max_line_bytes=config.max_line_bytes)
    except (ValueError, OSError):
        return  # no other format fits either: the rejects say why
    if detected != config.format:
        summary.warnings.append(
            f"{path}: every record was rejected as {config.format}, and the file looks like "
            f"{detected}: use --format {detected}, or leave --format out"
        )


def _format_name(path: Path, config: IngestConfig) -> str:
    """The format the run records: the one asked for, else the detected one."""
    if config.format:
        return config.format
    try:
        return detect_format(path, max_line_bytes=config.max_line_bytes)
    except (ValueError, OSError):
        return "unknown"  # read_file rejects the file with the reason


def _store(batch: PreparedBatch, engine: Engine, summary: IngestSummary) -> None:
    """Write one batch in one transaction and count what it added."""
    if not batch.read:
        return
    counts = store_prepared(engine, batch)
    summary.read += batch.read
    summary.stored += counts.stored
    summary.duplicates += counts.duplicates
    summary.battles_stored += counts.battles_stored


def battle_content_id(exchange_a: str, exchange_b: str, winner: str, judge: str | None) -> str:
    """A battle's id before the copies of one verdict in a file are numbered (`Copies`): its
    two answers' ids, the winner and the judge."""
    return content_hash("battle", exchange_a, exchange_b, winner, judge)


class Copies:
    """Numbers the copies of each record in one file, so identical chats from different users
    (or identical votes on the same two answers) are each stored (`repeat_id`), not merged.

    Counted per file, from its first record on every run: the numbering, and with it every id,
    is the same each time the file is read, so a re-run (or the run after a killed one) stores
    only what is missing. Records that carry the same source id are one record, the same copy.
    Keeps 32-hex ids (and source ids where given), never content.
    """

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}  # copies so far, per first id
        self._named: dict[tuple[str, str], int] = {}  # the copy each source id was given

    def conversation_id(self, conv: Conversation) -> str:
        """The id to store `conv` under: `conv.id` for its first copy, a derived one after."""
        if conv.external_id is not None:
            return conv.id  # the id tells records apart; the same id and content is one record
        return self.id_for(conv.id)

    def id_for(self, first: str, source_id: str | None = None) -> str:
        """`first` for the first copy of a content in this file, `repeat_id(first, k)` for the
        k-th; a source id seen before with this content gets the copy it got then."""
        if source_id is None:
            n = self._seen[first] = self._seen.get(first, 0) + 1
        else:
            n = self._named.get((first, source_id), 0)
            if not n:
                n = self._seen[first] = self._seen.get(first, 0) + 1
                self._named[first, source_id] = n
        return first if n == 1 else repeat_id(first, n)

    def battle_id(self, record: BattleRecord, pair: tuple[Exchange, Exchange]) -> str:
        """The id to store a battle under, `pair` being its answers (`battle_exchanges`)."""
        first = battle_content_id(pair[0].id, pair[1].id, record.winner, record.judge)
        return self.id_for(first, record.external_id)


class _BatchWriter:
    """Stores batches on one background thread, in order, one in flight at most."""

    def __init__(self, engine: Engine, summary: IngestSummary) -> None:
        self._engine = engine
        self._summary = summary
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convoscope-writer")
        self._pending: Future[None] | None = None

    def submit(self, batch: PreparedBatch) -> None:
        self.drain()  # a write error surfaces here, before more is read
        self._pending = self._pool.submit(_store, batch, self._engine, self._summary)

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._pool.shutdown()

    def drain(self) -> None:
        """Wait for the batch in flight (raising its error, if it failed)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()


class _Batch:
    """Rows waiting to be written together in one transaction."""

    def __init__(self) -> None:
        self.conversations: list[dict[str, Any]] = []
        self.exchanges: list[dict[str, Any]] = []
        self.battles: list[dict[str, Any]] = []

    @property
    def size(self) -> int:
        return len(self.exchanges)

    def take(self, engine: Engine) -> PreparedBatch:
        """The rows gathered so far, ready to store; the batch starts empty again."""
        rows = prepare_batch(
            engine,
            conversation_rows=self.conversations,
            exchange_rows=self.exchanges,
            battle_rows=self.battles,
        )
        self.conversations, self.exchanges, self.battles = [], [], []
        return rows

    def add_conversation(
        self, conv: Conversation, conversation_id: str, parts: list[Exchange]
    ) -> None:
        now = utcnow()
        self.conversations.append(
            {
                "id": conversation_id,
                "external_id": conv.external_id,
                "source": conv.source,
                "created_at": conv.created_at,
                "n_messages": len(conv.messages),
                "thumbs": conv.thumbs,
                "rating": conv.rating,
                "feedback_text": conv.feedback_text,
                "metadata": _json_or_none(conv.metadata),
                "ingested_at": now,
            }
        )
        self._add_exchanges(parts, now)

    def add_stored(self, record: StoredExchanges) -> None:
        """Exchanges read back from an export, under the conversation id they carry.

        The conversation row is what the rows tell (a row per conversation is needed, and an
        existing one is kept as it is): its length is the longest context plus that turn,
        its time the earliest, its external id, free-text feedback and metadata as exported;
        its thumbs and rating are on the exchanges already.
        """
        now = utcnow()
        parts = record.exchanges
        times = [e.created_at for e in parts if e.created_at is not None]
        self.conversations.append(
            {
                "id": parts[0].conversation_id,
                "external_id": record.external_id,
                "source": parts[0].source,
                "created_at": min(times) if len(times) == len(parts) else None,
                "n_messages": max(len(e.context) for e in parts) + 2,
                "thumbs": None,
                "rating": None,
                "feedback_text": record.feedback_text,
                "metadata": _json_or_none(record.metadata),
                "ingested_at": now,
            }
        )
        self._add_exchanges(parts, now)

    def _add_exchanges(self, parts: Sequence[Exchange], now: datetime) -> None:
        """One conversation's exchange rows. Each context repeats the turns before it: store a
        reference to the exchange it continues and only what came after (storage/contexts.py)."""
        ids = [part.id for part in parts]
        for k, part in enumerate(parts):
            parent, tail = _context_parent(parts, ids, k)
            self.exchanges.append(
                exchange_row(part, now, exchange_id=ids[k], context=tail, context_parent=parent)
            )

    def add_battle(
        self, record: BattleRecord, pair: tuple[Exchange, Exchange], battle_id: str
    ) -> None:
        now = utcnow()
        a, b = pair
        for part in pair:
            self.conversations.append(
                {
                    "id": part.conversation_id,
                    "external_id": record.external_id,
                    "source": record.source,
                    "created_at": None,
                    "n_messages": len(part.context) + 2,
                    "thumbs": None,
                    "rating": None,
                    "feedback_text": None,
                    "metadata": None,
                    "ingested_at": now,
                }
            )
            self.exchanges.append(exchange_row(part, now))
        self.battles.append(
            {
                "id": battle_id,
                "exchange_a": a.id,
                "exchange_b": b.id,
                "winner": record.winner,
                "judge": record.judge,
                "judge_preference": record.judge_preference,
                "source": record.source,
                "external_id": record.external_id,
                "metadata": _json_or_none(record.metadata),
                "ingested_at": now,
            }
        )


def exchange_row(
    exchange: Exchange,
    ingested_at: datetime,
    *,
    exchange_id: str | None = None,
    context: Sequence[Message] | None = None,
    context_parent: str | None = None,
) -> dict[str, Any]:
    """The storage row for an exchange (context and metadata as JSON text): its whole
    context, or `context_parent` and the messages after it; `exchange_id` when known."""
    messages = exchange.context if context is None else context
    return {
        "id": exchange.id if exchange_id is None else exchange_id,
        "conversation_id": exchange.conversation_id,
        "turn_index": exchange.turn_index,
        "context": encode_context((m.role, m.content) for m in messages),
        "context_parent": context_parent,
        "prompt": exchange.prompt,
        "response": exchange.response,
        "model": exchange.model,
        "instruction": exchange.instruction,
        "created_at": exchange.created_at,
        "source": exchange.source,
        "external_id": exchange.external_id,
        "retried": exchange.retried,
        "edited": exchange.edited,
        "deleted": exchange.deleted,
        "rating": exchange.rating,
        "thumbs": exchange.thumbs,
        "user_turns_after": exchange.user_turns_after,
        "ended_conversation": exchange.ended_conversation,
        "seconds_to_next_user_message": exchange.seconds_to_next_user_message,
        "metadata": _json_or_none(exchange.metadata),
        "ingested_at": ingested_at,
    }


def _context_parent(
    parts: Sequence[Exchange], ids: Sequence[str], k: int
) -> tuple[str | None, tuple[Message, ...]]:
    """The nearest earlier exchange whose context, prompt and response begin exchange k's
    context, and the messages after them; (None, whole context) when there is none.

    A few steps back suffice: the one before is the parent unless it was regenerated (then
    its response is not in later contexts) or several responses answered one prompt.
    """
    context = parts[k].context
    for j in range(k - 1, max(k - 4, -1), -1):
        earlier = parts[j]
        n = len(earlier.context)
        if (
            len(context) >= n + 2
            and context[n].role == "user"
            and context[n].content == earlier.prompt
            and context[n + 1].role == "assistant"
            and context[n + 1].content == earlier.response
            and context[:n] == earlier.context
        ):
            return ids[j], context[n + 2 :]
    return None, context


def _json_or_none(value: Mapping[str, Any] | None) -> str | None:
    return json.dumps(value, ensure_ascii=False, default=str) if value else None


class _RejectsFile:
    """Rejects as JSONL (file, line, field, reason, excerpt), opened on the first reject: a
    given file is appended to (nothing in it is lost), the default one created exclusively."""

    def __init__(self, path: Path | None) -> None:
        self.path = path or default_rejects_path()
        self._exclusive = path is None
        self.count = 0
        self._handle: IO[str] | None = None

    def _open(self) -> IO[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._exclusive:
            return self.path.open("a", encoding="utf-8")
        first, n = self.path, 1
        while True:
            try:
                return self.path.open("x", encoding="utf-8")
            except FileExistsError:  # another run started in the same second
                n += 1
                self.path = first.with_name(f"{first.stem}-{n}{first.suffix}")

    def write(self, reject: Reject) -> None:
        if self._handle is None:
            self._handle = self._open()
        record = {
            "file": reject.source,
            "line": reject.line,
            "field": reject.field,
            "reason": reject.reason,
            "excerpt": reject.excerpt,
        }
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
