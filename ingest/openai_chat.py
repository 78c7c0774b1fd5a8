"""OpenAI chat logs: one `{"messages": [{"role", "content"}], "model", ...}` object per line.

Content may be a list of parts (only text parts are kept). Signals are read where a log has
them: per message (`rating`, `thumbs`, `retried`, `edited`, `deleted`, `created_at`) and per
line (`rating`, `thumbs`/`thumbs_up`, `feedback`). Every other key is kept as metadata. A
tool call with no text (`tool_calls`, `function_call`) reads as `name(arguments)`.
A JSON array of such objects is read too (streamed).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
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
    then a Notice when lines repeat earlier lines' conversations and go on."""
    continued = _Continuations()
    for parsed in read_json_conversations(path, options, _conversation):
        if isinstance(parsed, Conversation):
            continued.check(parsed)
        yield parsed
    if continued.lines:
        yield continued.notice(options.source_for(path))


class _Continuations:
    """Counts lines whose messages begin with the whole of an earlier line's and go on: a
    gateway that logs the history with every request writes a 3-turn chat as 3 lines, which
    are stored as 3 conversations, 6 exchanges, the first answer 3 times and twice read as
    the one the user left after. Reading them as one conversation would take every earlier
    line back once a longer one shows up, so they are stored as logged and the user is told.

    Remembers the last 50,000 to 100,000 lines as 8-byte digests, in two generations (a
    gateway writes a chat's requests close together), so memory stays flat on a log of
    millions of lines. Dropping the oldest digest one at a time from a dict made the ingest
    of 1M exchanges twice as slow: each drop scanned the slots emptied before it.
    """

    def __init__(self) -> None:
        self._recent: set[bytes] = set()
        self._older: set[bytes] = set()
        self.lines = 0
        self.first_line = 0

    def check(self, conversation: Conversation) -> None:
        digest = hashlib.blake2b(digest_size=8)
        found = False
        last = len(conversation.messages) - 1
        for i, message in enumerate(conversation.messages):
            text = message.content.encode("utf-8", "surrogatepass")
            digest.update(b"%s %d:" % (message.role.encode(), len(text)) + text)
            if not found and i < last and message.role == "assistant":
                seen = digest.digest()
                found = seen in self._recent or seen in self._older
        if found:
            self.lines += 1
            self.first_line = self.first_line or conversation.line
        self._recent.add(digest.digest())
        if len(self._recent) >= _GENERATION:
            self._older, self._recent = self._recent, set()

    def notice(self, source: str) -> Notice:
        return Notice(
            source,
            f"{self.lines} lines (the first at line {self.first_line}) begin with the whole "
            "conversation of an earlier line and go on, as a log that repeats the history with "
            "every request does: each line is stored as a conversation of its own, so the "
            "turns it repeats are stored again and read as where the user left. Log each "
            "conversation once, in its last state (or as CSV, one row per turn with a "
            "conversation_id)",
        )


_GENERATION = 50_000


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
