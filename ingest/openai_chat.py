"""OpenAI chat logs: one `{"messages": [{"role", "content"}], "model", ...}` object per line.

Content may be a list of parts (only text parts are kept). Signals are read where a log has
them: per message (`rating`, `thumbs`, `retried`, `edited`, `deleted`, `created_at`) and per
line (`rating`, `thumbs`/`thumbs_up`, `feedback`). Every other key is kept as metadata. A
tool call with no text (`tool_calls`, `function_call`) reads as `name(arguments)`.
A JSON array of such objects is read too (streamed).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.readers import (
    FieldError,
    as_optional_text,
    checked_conversation,
    content_text,
    field_reject,
    leftover,
    not_an_object,
    read_json_conversations,
    read_signals,
)
from ingest.records import (
    Conversation,
    Message,
    Notice,
    Parsed,
    Reject,
    UnknownRole,
    canonical_role,
)

if TYPE_CHECKING:
    from ingest.readers import ReadOptions

_MESSAGE_SIGNALS = (
    "created_at",
    "model",
    "external_id",
    "retried",
    "edited",
    "deleted",
    "rating",
    "thumbs",
)
_CONVERSATION_SIGNALS = ("created_at", "external_id", "rating", "thumbs")
_FEEDBACK_KEYS = ("feedback_text", "feedback")
_INSTRUCTION_KEYS = ("instruction", "instruction_id", "system_prompt_id")


def read_openai(path: Path, *, options: ReadOptions) -> Iterator[Parsed]:
    """Conversations, Rejects, UnknownRoles (and a Truncation for a cut file), in file order,
    then a Notice when lines repeat earlier lines' conversations and go on.

    With `options.merge_history` such lines are merged instead (`_History`): a conversation
    is then held back until later lines can no longer continue it, so it comes later."""
    source = options.source_for(path)
    if options.merge_history:
        history = _History()
        for parsed in read_json_conversations(path, options, _conversation):
            if isinstance(parsed, Conversation):
                yield from history.add(parsed)
            else:
                yield parsed
        yield from history.close()
        yield from history.notices(source)
        return
    continued = _Continuations()
    for parsed in read_json_conversations(path, options, _conversation):
        if isinstance(parsed, Conversation):
            continued.check(parsed)
        yield parsed
    if continued.lines:
        yield continued.notice(source)


class _Recent:
    """A set of 8-byte digests that forgets the oldest: the last 50,000 to 100,000 added, in
    two generations, so memory stays flat on a log of millions of lines. Dropping the oldest
    digest one at a time from a dict made the ingest of 1M exchanges twice as slow: each drop
    scanned the slots emptied before it."""

    def __init__(self) -> None:
        self._recent: set[bytes] = set()
        self._older: set[bytes] = set()

    def add(self, digest: bytes) -> None:
        self._recent.add(digest)
        if len(self._recent) >= _GENERATION:
            self._older, self._recent = self._recent, set()

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._recent or digest in self._older


_GENERATION = 50_000


class _Continuations:
    """Counts lines whose messages begin with the whole of an earlier line's and go on: a
    gateway that logs the history with every request writes a 3-turn chat as 3 lines, which
    are stored as 3 conversations, 6 exchanges, the first answer 3 times and twice read as
    the one the user left after. They are stored as logged (merging them is `--merge-history`:
    two users' chats can begin alike) and the user is told. A gateway writes a chat's
    requests close together, so the recent lines are enough to find them.
    """

    def __init__(self) -> None:
        self._seen = _Recent()
        self.lines = 0
        self.first_line = 0

    def check(self, conversation: Conversation) -> None:
        messages = conversation.messages
        digests = _digests(messages, None)  # on content alone: the warning is for any line
        if any(
            digests[i] in self._seen
            for i in range(len(messages) - 1)
            if messages[i].role == "assistant"
        ):
            self.lines += 1
            self.first_line = self.first_line or conversation.line
        self._seen.add(digests[-1])

    def notice(self, source: str) -> Notice:
        return Notice(
            source,
            f"{self.lines} lines (the first at line {self.first_line}) begin with the whole "
            "conversation of an earlier line and go on, as a log that repeats the history with "
            "every request does: each line is stored as a conversation of its own, so the "
            "turns it repeats are stored again and read as where the user left. Ingest again "
            "with --merge-history to store each chat once, in its last state (a database that "
            "holds this file's lines already keeps them: use a new one), or log each "
            "conversation once (or as CSV, one row per turn with a conversation_id)",
        )


class _History:
    """Merges the lines of a log that repeats a chat's history with every request
    (`--merge-history`): a line whose messages begin with the whole of a held line's (with the
    same `external_id`, or none) replaces it, and the chat is stored once, in its last state.

    A line is held until `_HELD_CHARS` characters of newer lines (or `_HELD_LINES` lines) have
    come in: a gateway writes a chat's requests close together, and a line stored already is
    never taken back. Merged, the chat starts at its first line with that line's
    `created_at`; messages with no time of their own get their line's (the request's), so
    `seconds_to_next_user_message` is the time from one request to the next; conversation
    feedback is the last line's, else an earlier one's. The same lines give the same chats,
    so a re-run stores nothing new.

    A line of the same conversation id that sends a held line's last request again with
    another answer is a regeneration: the earlier answer stays in the chat as `retried`. One
    that sends the held line's history up to its last request with another request in its place
    (and an answer) is an edit (a chat UI's "edit" button): the replaced request and its answers
    stay in the chat, set aside (`Message.replaced`), the answers `edited`. Only the last
    request is recognised as edited: a line that goes back further (edits an earlier message)
    is a conversation of its own. With no id, either is as likely two users' chats that began
    alike, and a false retry or edit would teach the reward model that a good answer was
    rejected: such a line, like one that continues a state another line continued already, is a
    conversation of its own, counted in a Notice.
    """

    def __init__(self) -> None:
        # By the digest of its last line's messages, oldest first. An OrderedDict lets the
        # oldest go in constant time: a dict's first key is found by scanning the slots
        # emptied before it, which took 3 of 20 s to read 100K lines.
        self._held: OrderedDict[bytes, _Chat] = OrderedDict()
        self._requests: dict[bytes, bytes] = {}  # a held answered line's last request → its key
        self._befores: dict[bytes, bytes] = {}  # its history before that request → its key
        self._chars = 0
        self._gone = _Recent()  # digests of chats let go, or continued by a held line
        self.merged = 0
        self.retried = 0
        self.edited = 0
        self.late = 0
        self.first_late = 0

    def add(self, conversation: Conversation) -> Iterator[Conversation]:
        """The held conversations this one lets go (oldest first); it is held itself."""
        digests = _digests(conversation.messages, conversation.external_id)
        request = _last_request(conversation)  # the same in the chat it joins: same messages
        chat = (
            self._goes_on(conversation, digests)
            or self._regenerates(conversation, digests, request)
            or self._edits(conversation, digests, request)
        )
        if chat is None:
            chat = _Chat(_stamped(conversation, 0))
            if any(digest in self._gone for digest in digests[:-1]):
                self.late += 1
                self.first_late = self.first_late or conversation.line
        if digests[-1] in self._held:  # the same chat twice (two users'): the first is let go
            self._held.move_to_end(digests[-1], last=False)
            yield self._let_go()
        self._hold(chat, digests, request)
        while self._chars > _HELD_CHARS or len(self._held) > _HELD_LINES:
            yield self._let_go()

    def close(self) -> Iterator[Conversation]:
        """Every conversation still held, at the end of the file."""
        while self._held:
            yield self._let_go()

    def _goes_on(self, line: Conversation, digests: list[bytes]) -> _Chat | None:
        """The held chat this line goes on from (the longest), now ending with it."""
        for digest in reversed(digests[:-1]):
            if digest in self._held:
                chat = self._take(digest)
                chat.line = _continued(chat.line, line)
                self.merged += 1
                return chat
        return None

    def _regenerates(self, line: Conversation, digests: list[bytes], request: int) -> _Chat | None:
        """The held chat of the same conversation id whose last request (`request`, the index
        of the line's last user message) this line sends again, now ending with this line's
        answer, the earlier one retried."""
        if line.external_id is None or request == len(line.messages) - 1:
            return None
        key = self._requests.get(digests[request])
        if key is None:
            return None
        chat = self._take(key)
        answers = chat.line.messages[request + 1 :]
        chat.aside += [(request + 1, replace(m, retried=True)) for m in answers]
        shared = replace(chat.line, messages=chat.line.messages[: request + 1])
        chat.line = _continued(shared, line)
        self.merged += 1
        self.retried += 1
        return chat

    def _edits(self, line: Conversation, digests: list[bytes], request: int) -> _Chat | None:
        """The held chat of the same conversation id whose history before its last request
        this line sends with another request in its place, now ending with this line's request
        and answer; the replaced request and its answers (regenerated ones too) set aside."""
        if line.external_id is None or request == len(line.messages) - 1:
            return None
        key = self._befores.get(_before(digests, request, line.external_id))
        if key is None:
            return None
        chat = self._take(key)
        # The held line's request is at `request` too (the same history comes before it).
        messages = chat.conversation().messages
        cut = request + sum(1 for at, _ in chat.aside if at <= request)
        old_request, *answers = messages[cut:]
        chat.aside = [(at, m) for at, m in chat.aside if at <= request]
        chat.aside.append((request, replace(old_request, replaced=True)))
        chat.aside += [(request, replace(m, edited=True, replaced=True)) for m in answers]
        shared = replace(chat.line, messages=chat.line.messages[:request])
        chat.line = _continued(shared, line)
        self.merged += 1
        self.edited += 1
        return chat

    def _hold(self, chat: _Chat, digests: list[bytes], request: int) -> None:
        chat.chars = _chars(chat.line) + sum(len(m.content) for _, m in chat.aside)
        self._held[digests[-1]] = chat
        self._chars += chat.chars
        if request < len(chat.line.messages) - 1:
            self._requests[digests[request]] = digests[-1]
            chat.request = digests[request]
            chat.before = _before(digests, request, chat.line.external_id)
            self._befores[chat.before] = digests[-1]

    def _take(self, digest: bytes) -> _Chat:
        """The held chat under `digest`, no longer held."""
        chat = self._held.pop(digest)
        self._chars -= chat.chars
        self._gone.add(digest)
        if chat.request is not None and self._requests.get(chat.request) == digest:
            del self._requests[chat.request]
        if chat.before is not None and self._befores.get(chat.before) == digest:
            del self._befores[chat.before]
        return chat

    def _let_go(self) -> Conversation:
        """The oldest held chat, no longer held."""
        return self._take(next(iter(self._held))).conversation()

    def notices(self, source: str) -> Iterator[Notice]:
        if self.merged:
            how = []
            if self.retried:
                how.append(
                    f"{self.retried} of them regenerated the last answer: it is stored as retried"
                )
            if self.edited:
                how.append(
                    f"{self.edited} of them edited the last message: its earlier answer is "
                    "stored as edited"
                )
            yield Notice(
                source,
                f"--merge-history: {self.merged} lines continued an earlier line's "
                "conversation and were merged into it" + (f" ({'; '.join(how)})" if how else ""),
            )
        if self.late:
            yield Notice(
                source,
                f"--merge-history: {self.late} lines (the first at line {self.first_late}) "
                "continue a conversation that was stored before them (more than "
                f"{_HELD_CHARS // 10**6}M characters of log earlier) or that another line "
                "had continued already (with no conversation id: a regenerated answer, an edited "
                "message, or two chats that began alike): each is stored as a conversation of "
                "its own",
            )


@dataclass(slots=True)
class _Chat:
    """A held chat: its last line (merged with the earlier ones), and the messages set aside
    (answers the user regenerated, requests the user edited and their answers), each with the
    position in that line it came before, in order."""

    line: Conversation
    aside: list[tuple[int, Message]] = field(default_factory=list)
    request: bytes | None = None  # the digest of the line's last request, when answered
    before: bytes | None = None  # the digest of the history before it, when answered
    chars: int = 0  # the characters held, counted when it is held

    def conversation(self) -> Conversation:
        """The chat as stored: the last line with the messages set aside in their places."""
        if not self.aside:
            return self.line
        messages: list[Message] = []
        aside = iter(self.aside)
        pending = next(aside, None)
        for position, message in enumerate(self.line.messages):
            while pending is not None and pending[0] == position:
                messages.append(pending[1])
                pending = next(aside, None)
            messages.append(message)
        return replace(self.line, messages=tuple(messages))


def _last_request(conversation: Conversation) -> int:
    """The index of the conversation's last user message (every conversation read has one)."""
    messages = conversation.messages
    return next(i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "user")


_HELD_CHARS = 50_000_000  # about 50-100 MB of held text
_HELD_LINES = 100_000


def _digests(messages: tuple[Message, ...], external_id: str | None) -> list[bytes]:
    """8-byte digests of the first 1, 2, ... messages (roles and texts), after the
    conversation's external id: equal digests are the same history of the same conversation."""
    digest = _opened(external_id)
    digests = []
    for message in messages:
        text = message.content.encode("utf-8", "surrogatepass")
        digest.update(b"%s %d:" % (message.role.encode(), len(text)) + text)
        digests.append(digest.digest())
    return digests


def _opened(external_id: str | None) -> hashlib.blake2b:
    """A digest of the conversation's external id, the history of no messages yet."""
    digest = hashlib.blake2b(digest_size=8)
    external = (external_id or "").encode("utf-8", "surrogatepass")
    digest.update(b"%d:" % len(external) + external)
    return digest


def _before(digests: list[bytes], at: int, external_id: str | None) -> bytes:
    """The digest of the first `at` messages (`digests` being `_digests`'), `at` 0 included: an
    edit of a chat's first request keeps only its id."""
    return digests[at - 1] if at else _opened(external_id).digest()


def _chars(conversation: Conversation) -> int:
    return sum(len(message.content) for message in conversation.messages)


def _stamped(conversation: Conversation, start: int) -> Conversation:
    """The conversation with its line's `created_at` on the request that line logs (its last
    user message, unless an earlier line sent it) and the answer, from `start` on, where they
    have no time of their own: earlier turns were sent before, at a time the line does not say.
    """
    when = conversation.created_at
    messages = conversation.messages
    first = max(_last_request(conversation), start)
    if when is None or all(m.created_at for m in messages[first:]):
        return conversation
    stamped = tuple(m if m.created_at else replace(m, created_at=when) for m in messages[first:])
    return replace(conversation, messages=messages[:first] + stamped)


def _continued(earlier: Conversation, later: Conversation) -> Conversation:
    """`later` (whose messages begin with all of `earlier`'s) as the rest of `earlier`."""
    start = len(earlier.messages)
    later = _stamped(later, start)
    messages = (
        tuple(  # the shared turns as the later line logs them, at the earlier lines' times
            replace(new, created_at=old.created_at)
            if old.created_at and not new.created_at
            else new
            for old, new in zip(earlier.messages, later.messages[:start], strict=True)
        )
        + later.messages[start:]
    )
    return replace(
        later,
        messages=messages,
        line=earlier.line,
        created_at=earlier.created_at or later.created_at,
        thumbs=later.thumbs if later.thumbs is not None else earlier.thumbs,
        rating=later.rating if later.rating is not None else earlier.rating,
        feedback_text=later.feedback_text or earlier.feedback_text,
        metadata={**earlier.metadata, **later.metadata},
    )


def _conversation(
    record: Any, number: int, source: str, unknown: list[UnknownRole]
) -> Conversation | Reject:
    if not isinstance(record, dict):
        return not_an_object(source, number, record)
    try:
        raw_messages = record.get("messages")
        if not isinstance(raw_messages, list):
            raise FieldError("messages", "expected a list of {role, content} messages")
        messages = []
        for i, raw in enumerate(raw_messages):
            parsed = _message(raw, i)
            if isinstance(parsed, str):
                unknown.append(UnknownRole(source=source, line=number, role=parsed))
            else:
                messages.append(parsed)
        signals, used = read_signals(record, "", _CONVERSATION_SIGNALS)
        if "external_id" not in signals and "conversation_id" in record:
            signals["external_id"] = as_optional_text(record["conversation_id"], "conversation_id")
            used.add("conversation_id")
        model = as_optional_text(record.get("model"), "model")
        feedback = _first_text(record, _FEEDBACK_KEYS)
        instruction = _first_text(record, _INSTRUCTION_KEYS)
        used |= {"messages", "model", *_FEEDBACK_KEYS, *_INSTRUCTION_KEYS}
        conversation = Conversation(
            messages=tuple(messages),
            source=source,
            line=number,
            model=model,
            instruction=instruction,
            feedback_text=feedback,
            metadata=leftover(record, used),
            **signals,
        )
    except FieldError as err:
        return field_reject(source, number, err, record)
    return checked_conversation(conversation, record)


def _message(raw: Any, index: int) -> Message | str:
    """The Message, or the role name as logged when it is unknown (the message is skipped).

    Field names for errors (`messages[3].content`) are built only when needed: this runs for
    every message of a log, and most messages are a plain role and string content.
    """
    if not isinstance(raw, dict):
        raise FieldError(f"messages[{index}]", "expected an object with role and content")
    raw_role = raw.get("role")
    if not isinstance(raw_role, str):
        raise FieldError(f"messages[{index}].role", "expected a role name")
    role = canonical_role(raw_role)
    if role is None:
        return raw_role
    content = raw.get("content")
    if not isinstance(content, str):
        content = content_text(content, f"messages[{index}].content")
    if len(raw) == 2 and "content" in raw:  # nothing but role and content: no signals to read
        return Message(role=role, content=content)
    name = f"messages[{index}]"
    signals, used = read_signals(raw, name, _MESSAGE_SIGNALS)
    extra = leftover(raw, used | {"role", "content"})
    if not content and extra:
        content = _calls_text(extra)
    return Message(role=role, content=content, metadata=extra or None, **signals)


def _calls_text(extra: dict[str, Any]) -> str:
    """`name(arguments)` per tool call of a message with no text, so a context that shows it
    says what the model did rather than nothing; the calls themselves stay in metadata."""
    calls = extra.get("tool_calls")
    calls = calls if isinstance(calls, list) else [extra.get("function_call")]
    lines = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            arguments = function.get("arguments")
            lines.append(f"{function['name']}({arguments if isinstance(arguments, str) else ''})")
    return "\n".join(lines)


def _first_text(record: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        if key in record:
            return as_optional_text(record[key], key)
    return None
