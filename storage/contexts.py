"""Exchange contexts stored once per conversation, not once per turn.

An exchange's context is every earlier message of its conversation, so storing each context
whole stores a conversation of n turns n times over: two thirds of ShareGPT's stored text, and
quadratic in a long chat. So an exchange whose context continues an earlier exchange of the
same conversation stores only a reference to it (`context_parent`) and the messages that came
after that exchange's prompt and response (`context`, usually `[]`):

    context(e) = context(parent) + [user: parent.prompt, assistant: parent.response] + tail(e)

Rows stored whole (battles, replays, databases from before this column) have no parent. The
readers in storage resolve contexts before anything else sees them, so outside storage a
context is always the whole JSON list of {role, content}, byte for byte what it was.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence

# json's C encoder for a str with ensure_ascii=False (the Python fallback when it is absent).
from json.encoder import encode_basestring as _quoted  # type: ignore[attr-defined]
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from storage.schema import exchanges

Row = dict[str, Any]

_CHUNK = 5000  # ids per IN (...) probe: under SQLite's bound-parameter limit


def message_json(role: str, content: str) -> str:
    """One context message as JSON, exactly as `json.dumps(..., ensure_ascii=False)` writes
    it inside a list; the C string encoder alone is several times faster than dumps."""
    return '{"role": ' + _quoted(role) + ', "content": ' + _quoted(content) + "}"


def encode_context(messages: Iterable[tuple[str, str]]) -> str:
    """A context (or a tail) as stored: the JSON list of {role, content}."""
    return "[" + ", ".join(message_json(role, content) for role, content in messages) + "]"


# What resolving a context needs of a row besides its stored context.
_NEEDED = ("id", "conversation_id", "context_parent", "prompt", "response")


def context_columns(
    columns: Sequence[sa.ColumnElement[Any]],
) -> tuple[list[Any], frozenset[str]]:
    """The columns to select when `columns` include the context: those asked for plus what
    resolving needs, and the names added (a ContextResolver drops them again)."""
    selected = list(columns)
    names = {getattr(c, "name", None) for c in selected}
    if "context" not in names:
        return selected, frozenset()
    added = [name for name in _NEEDED if name not in names]
    return selected + [exchanges.c[name] for name in added], frozenset(added)


class ContextResolver:
    """Replaces stored contexts with whole ones, in place, batch after batch.

    Rows streamed in (conversation, turn) order find their parent among the rows before them
    for free; a parent outside the stream (filtered out, or rows in another order) is read
    with one query per batch on `lookup`, which must not be the connection that streams
    (DuckDB runs one result at a time per connection).
    """

    def __init__(self, lookup: Connection, added: frozenset[str]) -> None:
        self._lookup = lookup
        self._added = added
        # id -> its context, prompt and response as message JSON: what a child's context
        # starts with. Built only when a child asks (most rows have none), and carried
        # from one batch to the next for the conversation the batch ended in.
        self._after: dict[str, list[str]] = {}

    def resolve(self, rows: Sequence[Row]) -> None:
        if not rows or "context_parent" not in rows[0]:
            return
        self._look_up_missing(rows)
        batch: dict[str, tuple[Row, list[str] | None]] = {}  # id -> (row, whole context)
        for row in rows:
            parent = row["context_parent"]
            whole = None
            if parent is not None:
                whole = self._messages_after(parent, batch) + _pieces(row["context"])
                row["context"] = "[" + ", ".join(whole) + "]"
            batch[row["id"]] = (row, whole)
        # A later batch can only continue the conversation this one ended in.
        last = rows[-1]["conversation_id"]
        self._after = {
            exchange_id: self._messages_after(exchange_id, batch)
            for exchange_id, (row, _) in batch.items()
            if row["conversation_id"] == last
        }
        for row in rows:
            for name in self._added:
                del row[name]
            row.pop("context_parent", None)

    def _messages_after(
        self, exchange_id: str, batch: dict[str, tuple[Row, list[str] | None]]
    ) -> list[str]:
        if exchange_id not in self._after:
            row, whole = batch[exchange_id]
            self._after[exchange_id] = _with_turn(
                whole if whole is not None else _pieces(row["context"]), row
            )
        return self._after[exchange_id]

    def _look_up_missing(self, rows: Sequence[Row]) -> None:
        """Read the parents that are neither carried over nor earlier in this batch."""
        seen: set[str] = set()
        missing: set[str] = set()
        for row in rows:
            parent = row["context_parent"]
            if parent is not None and parent not in self._after and parent not in seen:
                missing.add(parent)
            seen.add(row["id"])
        if missing:
            chains = _Chains(self._lookup, missing)
            for parent in missing:
                self._after[parent] = chains.messages_after(parent)


def read_with_contexts(conn: Connection, query: sa.Select, added: frozenset[str]) -> list[Row]:
    """A query's rows read at once, each context whole (`added` from context_columns)."""
    rows = [dict(row) for row in conn.execute(query).mappings()]
    ContextResolver(conn, added).resolve(rows)
    return rows


def stream_with_contexts(
    engine: Engine, query: sa.Select, added: frozenset[str], batch_size: int
) -> Iterator[list[Row]]:
    """A query's rows in batches, each context whole: the stream runs on one connection and
    parents it lacks are read on a second. Order the query by (conversation, turn)."""
    with engine.connect() as conn, engine.connect() as lookup:
        resolver = ContextResolver(lookup, added)
        for piece in sortable_pieces(conn, query):
            result = conn.execution_options(stream_results=True, yield_per=batch_size).execute(
                piece
            )
            for part in result.mappings().partitions(batch_size):
                rows = [dict(row) for row in part]
                resolver.resolve(rows)
                yield rows


# DuckDB (1.5) sorts in memory: past its cap (`storage.engine.DUCKDB_MEMORY`) an ORDER BY
# whose rows carry long texts fails instead of spilling to disk (100K ShareGPT-sized
# exchanges did). A large stream is therefore sorted one range of conversations at a time,
# each holding about this much text.
SORT_PIECE_BYTES = 64 * 2**20


def sortable_pieces(conn: Connection, query: sa.Select) -> list[sa.Select]:
    """`query` (ordered by conversation first) as queries that, read one after another, give
    its rows in its order: itself, or on DuckDB when its rows hold more text than
    SORT_PIECE_BYTES, itself restricted to consecutive ranges of conversation ids (a
    conversation is never split, so a parent stays in its child's piece)."""
    if conn.dialect.name != "duckdb":
        return [query]
    conversation = exchanges.c.conversation_id
    text = (
        sa.func.length(exchanges.c.prompt)
        + sa.func.length(exchanges.c.response)
        + sa.func.length(exchanges.c.context)
    )
    sizes = (
        query.with_only_columns(conversation, sa.func.sum(text), maintain_column_froms=True)
        .group_by(conversation)
        .order_by(None)
        .order_by(conversation)
    )
    ranges: list[tuple[str, str]] = []
    first, total = None, 0
    for conversation_id, size in conn.execution_options(yield_per=50_000).execute(sizes):
        first = first or conversation_id
        total += int(size or 0)
        if total >= SORT_PIECE_BYTES:
            ranges.append((first, conversation_id))
            first, total = None, 0
    if first is not None:
        ranges.append((first, conversation_id))
    if len(ranges) <= 1:
        return [query]
    return [query.where(conversation.between(lo, hi)) for lo, hi in ranges]


def _pieces(stored: str | None) -> list[str]:
    """The messages of a stored context as their JSON strings."""
    if not stored or stored == "[]":
        return []
    return [message_json(m["role"], m["content"]) for m in json.loads(stored)]


def _with_turn(pieces: list[str], row: Row) -> list[str]:
    """A context followed by the row's prompt and response: what a child's starts with."""
    return [
        *pieces,
        message_json("user", row["prompt"]),
        message_json("assistant", row["response"]),
    ]


class _Chains:
    """The exchanges of the conversations a set of parents belongs to, read once, and the
    whole message list up to and including each one's response, built once per exchange."""

    def __init__(self, conn: Connection, ids: set[str]) -> None:
        self._rows: dict[str, Row] = {}
        wanted = sorted(ids)
        columns = (
            exchanges.c.id,
            exchanges.c.context_parent,
            exchanges.c.context,
            exchanges.c.prompt,
            exchanges.c.response,
        )
        for start in range(0, len(wanted), _CHUNK):
            conversations = sa.select(exchanges.c.conversation_id).where(
                exchanges.c.id.in_(wanted[start : start + _CHUNK])
            )
            query = sa.select(*columns).where(exchanges.c.conversation_id.in_(conversations))
            self._rows.update((r["id"], dict(r)) for r in conn.execute(query).mappings())
        self._done: dict[str, list[str]] = {}

    def messages_after(self, exchange_id: str) -> list[str]:
        """Context, prompt and response of `exchange_id`: what a child's context starts with."""
        chain: list[str] = []  # the unresolved ancestors, nearest first
        current: str | None = exchange_id
        while current is not None and current not in self._done:
            if current not in self._rows:
                raise LookupError(f"exchange {current} is referenced as a context but missing")
            chain.append(current)
            current = self._rows[current]["context_parent"]
        for node in reversed(chain):
            row = self._rows[node]
            parent = row["context_parent"]
            before = self._done[parent] if parent is not None else []
            self._done[node] = _with_turn(before + _pieces(row["context"]), row)
        return list(self._done[exchange_id])
