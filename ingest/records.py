"""The canonical records every reader produces and every later step consumes.

Readers turn a log format into `Conversation`s (ordered messages with per-message signals),
`BattleRecord`s (two answers to one prompt, judged) or `Reject`s (a record that could not be
read, with where and why). `ingest.exchanges` then splits conversations into `Exchange`s: one
model response with everything needed to judge it. Unknown signals stay `None`, never 0.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]
Winner = Literal["a", "b", "tie"]

# Roles seen in real logs, mapped to the four the rest of the tool knows. A tool message (a
# function's result fed back to the model) is part of a turn, never a prompt or an answer.
ROLE_ALIASES: dict[str, Role] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
}


def canonical_role(raw: str) -> Role | None:
    """The canonical role for a role name as logged, or None when it is unknown."""
    return ROLE_ALIASES.get(raw) or ROLE_ALIASES.get(raw.strip().lower())


def content_hash(*parts: str | int | float | bool | None) -> str:
    """A stable 32-hex-digit id from content, so re-ingesting the same data stores nothing new.

    Each part goes into the hash with a type tag and a length prefix (unambiguous). The parts
    are joined and hashed in one call: a conversation has thousands of small parts, and one
    `update` per part cost more than the hashing itself (same digest either way).
    """
    chunks: list[bytes] = []
    append = chunks.append
    for part in parts:
        if isinstance(part, str):
            data = part.encode("utf-8", "surrogatepass")
            append(b"s%d:" % len(data))
        elif part is None:  # the commonest non-text part (a message with no model)
            append(b"r4:None")
            continue
        else:
            data = repr(part).encode()
            append(b"r%d:" % len(data))
        append(data)
    return hashlib.sha256(b"".join(chunks)).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Message:
    """One message as logged, with the signals a log may attach to it."""

    role: Role
    content: str
    created_at: datetime | None = None
    model: str | None = None
    external_id: str | None = None
    retried: bool | None = None  # the user regenerated this response (Chai's `deleted`)
    edited: bool | None = None
    rating: float | None = None
    thumbs: int | None = None  # +1 up, -1 down
    deleted: bool | None = None  # the log marks it deleted (Chai: deleted = regenerated)
    metadata: dict[str, Any] | None = None  # per-message extras (e.g. a CSV row's other columns)
    # Set aside by the user's edit of its turn (`--merge-history`): a request the user replaced
    # and its answers stay in the chat, out of later contexts and of the user-turn counts. Never
    # read from a log: a log's `edited` flag may mark the edited version, which is kept.
    replaced: bool = False


@dataclass(frozen=True, slots=True)
class Conversation:
    """A whole logged conversation, as a reader found it, before it is split into exchanges."""

    messages: tuple[Message, ...]
    source: str  # the file it came from (or a replay run id)
    line: int  # where it starts in that file (1-based line, or item number for JSON arrays)
    external_id: str | None = None
    model: str | None = None  # default model for assistant messages that name none
    instruction: str | None = None  # system prompt or its id, when logged outside the messages
    created_at: datetime | None = None
    thumbs: int | None = None  # conversation-level feedback (Chai's thumbs_up)
    rating: float | None = None
    feedback_text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """Content-derived id: the source's id plus the messages, so colliding ids never merge."""
        parts: list[str | int | None] = ["conversation", self.external_id, len(self.messages)]
        for m in self.messages:
            parts += (m.role, m.content, m.model)
        return content_hash(*parts)


def repeat_id(first_id: str, occurrence: int) -> str:
    """The id of the `occurrence`-th copy (2, 3, ...) of one id-less conversation in one file.

    Content alone cannot tell many users' identical chats ("hi" / "Hello!") apart, yet each is
    traffic. The first copy keeps `Conversation.id`, so ids stored before stay valid; the k-th
    copy's id depends only on the content and k, so re-reading the file finds them all stored.
    """
    return content_hash("conversation", first_id, "repeat", occurrence)


@dataclass(frozen=True, slots=True)
class Exchange:
    """One model response and everything needed to judge it (the brief's canonical record)."""

    conversation_id: str
    turn_index: int  # index of the response among the conversation's messages
    context: tuple[Message, ...]  # earlier messages, system message included
    prompt: str  # the user message this response answers
    response: str  # may be empty: a saved input waiting for replay
    model: str | None
    instruction: str | None
    created_at: datetime | None
    source: str
    external_id: str | None
    retried: bool | None = None
    edited: bool | None = None
    deleted: bool | None = None
    rating: float | None = None
    thumbs: int | None = None
    user_turns_after: int | None = None
    ended_conversation: bool | None = None
    seconds_to_next_user_message: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """Content hash: identical exchanges from any file or run are stored once."""
        return content_hash(
            "exchange",
            self.conversation_id,
            self.turn_index,
            self.prompt,
            self.response,
            self.model,
        )


@dataclass(frozen=True, slots=True)
class BattleRecord:
    """Two answers to the same prompt and which one a judge preferred."""

    prompt: str
    model_a: str
    response_a: str
    model_b: str
    response_b: str
    winner: Winner
    source: str
    line: int
    judge: str | None = None
    judge_preference: float | None = None
    external_id: str | None = None
    context: tuple[Message, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoredExchanges:
    """Exchanges read back from convoscope's own JSONL export: one conversation's rows, each
    with the conversation id and turn index it was stored under, so its id is the original's.

    Not a `Conversation`: an export may hold any subset of a conversation's turns (a tagged
    cluster), so splitting the rows again would derive other ids and other signals.
    """

    exchanges: tuple[Exchange, ...]  # in turn order
    source: str  # the file they were read from (each exchange keeps its original source)
    line: int  # where the first row is
    external_id: str | None = None  # the conversation's, as first logged
    feedback_text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # the conversation's other keys


@dataclass(frozen=True, slots=True)
class Reject:
    """A record that could not be read: where it is and why, for the rejects file."""

    source: str
    line: int  # 1-based line (JSONL/CSV) or item number (JSON arrays); 0 = the whole file
    reason: str
    field: str | None = None
    excerpt: str | None = None  # the first characters of the record, for a human to find it


@dataclass(frozen=True, slots=True)
class Truncation:
    """A file that ended mid-record: every whole record before the cut was kept."""

    source: str
    line: int  # where the incomplete record starts
    byte_offset: int  # where the data stops (JSON arrays) or the cut line starts (JSONL)
    records_kept: int


@dataclass(frozen=True, slots=True)
class UnknownRole:
    """A role name the reader did not know; its message was skipped and the role reported."""

    source: str
    line: int
    role: str


@dataclass(frozen=True, slots=True)
class Notice:
    """Something about a whole file that was read, which its user should hear of though no
    record was rejected (a warning in the summary)."""

    source: str
    message: str


Parsed = Conversation | BattleRecord | StoredExchanges | Reject | Truncation | UnknownRole | Notice
