"""Chai-style feedback logs: conversations whose messages carry `sender`, `content`, `sent_date`.

A record is one conversation (a JSONL line or an item of a JSON array):
`{"conversation_id", "user_id", "bot_id", "thumbs_up", "text", "messages": [{"sender",
"content", "sent_date", "deleted", "metadata": {"model_name"}}]}`.

Who sent a message is decided, first match wins, by: a `role` key; an `is_user` flag; a
`sender_type` ("user"/"bot"); `sender` equal to the conversation's `user_id` (user) or `bot_id`
/ `bot_name` (bot); `sender` itself a role name ("user", "bot"); otherwise, when the
conversation names its user, any other sender is the bot, and when it names only its bot, any
other sender is the user. A sender none of these settle is reported as an UnknownRole.

`deleted: true` on a bot message means the user regenerated it: `retried` and `deleted` are
both set. `thumbs_up` (true → +1, false → -1) and the free-text `text` feedback belong to the
conversation; `ingest.exchanges` decides which response they apply to.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.readers import (
    FieldError,
    as_bool,
    as_optional_text,
    as_text,
    as_thumbs_up,
    checked_conversation,
    field_reject,
    leftover,
    not_an_object,
    read_json_conversations,
    read_signals,
)
from ingest.records import (
    Conversation,
    Message,
    Parsed,
    Reject,
    Role,
    UnknownRole,
    canonical_role,
)

if TYPE_CHECKING:
    from ingest.readers import ReadOptions

_MESSAGE_LISTS = ("messages", "conversation")
_MESSAGE_SIGNALS = ("created_at", "external_id", "edited", "rating", "thumbs")
# Keys read into canonical fields. `user_id`, `bot_id` and `bot_name` tell the senders apart
# and are kept as metadata too: who the user and the bot were is worth exporting.
_CONVERSATION_USED = frozenset(
    {
        "conversation_id",
        "id",
        "thumbs_up",
        "text",
        "feedback",
        "model",
        "model_name",
        *_MESSAGE_LISTS,
    }
)


def read_chai(path: Path, *, options: ReadOptions) -> Iterator[Parsed]:
    """Conversations, Rejects, UnknownRoles (and a Truncation for a cut file), in file order."""
    return read_json_conversations(path, options, _conversation)


def _conversation(
    record: Any, number: int, source: str, unknown: list[UnknownRole]
) -> Conversation | Reject:
    if not isinstance(record, dict):
        return not_an_object(source, number, record)
    try:
        list_name = next((k for k in _MESSAGE_LISTS if k in record), "messages")
        raw_messages = record.get(list_name)
        if not isinstance(raw_messages, list):
            raise FieldError(list_name, "expected a list of messages")
        user_id = as_optional_text(record.get("user_id"), "user_id")
        bot_ids = {as_optional_text(record.get(key), key) for key in ("bot_id", "bot_name")} - {
            None
        }
        messages = []
        for i, raw in enumerate(raw_messages):
            parsed = _message(raw, f"{list_name}[{i}]", user_id, bot_ids)
            if isinstance(parsed, str):
                unknown.append(UnknownRole(source=source, line=number, role=parsed))
            else:
                messages.append(parsed)
        signals, used = read_signals(record, "", ("created_at", "rating"))
        external_id = record.get("conversation_id", record.get("id"))
        feedback_key = "text" if "text" in record else "feedback"
        conversation = Conversation(
            messages=tuple(messages),
            source=source,
            line=number,
            external_id=as_optional_text(external_id, "conversation_id"),
            model=as_optional_text(record.get("model_name", record.get("model")), "model_name"),
            thumbs=as_thumbs_up(record.get("thumbs_up"), "thumbs_up"),
            feedback_text=as_optional_text(record.get(feedback_key), feedback_key),
            metadata=leftover(record, _CONVERSATION_USED | used),
            **signals,
        )
    except FieldError as err:
        return field_reject(source, number, err, record)
    return checked_conversation(conversation, record, list_name)


def _message(raw: Any, name: str, user_id: str | None, bot_ids: set[str]) -> Message | str:
    """The Message, or the sender as logged when its role cannot be told (message skipped)."""
    if not isinstance(raw, dict):
        raise FieldError(name, "expected an object with sender and content")
    sender = as_optional_text(raw.get("sender"), f"{name}.sender")
    role = _role(raw, name, sender, user_id, bot_ids)
    if role is None:
        return sender or str(raw.get("role", raw.get("sender_type", "")))
    content = as_text(raw.get("content"), f"{name}.content")
    signals, used = read_signals(raw, name, _MESSAGE_SIGNALS)
    deleted = as_bool(raw.get("deleted"), f"{name}.deleted")
    meta = raw.get("metadata") or {}
    if not isinstance(meta, dict):
        raise FieldError(f"{name}.metadata", "expected an object")
    model = as_optional_text(
        meta.get("model_name", raw.get("model")), f"{name}.metadata.model_name"
    )
    extra = leftover(raw, used | {"sender", "role", "is_user", "sender_type", "content"})
    extra = leftover(extra, {"deleted", "metadata", "model"})
    extra.update(leftover(meta, {"model_name"}))
    return Message(
        role=role,
        content=content,
        model=model,
        retried=deleted if role == "assistant" else None,
        deleted=deleted,
        metadata=extra or None,
        **signals,
    )


def _role(
    raw: dict[str, Any], name: str, sender: str | None, user_id: str | None, bot_ids: set[str]
) -> Role | None:
    if isinstance(raw.get("role"), str):
        return canonical_role(raw["role"])
    is_user = as_bool(raw.get("is_user"), f"{name}.is_user")
    if is_user is not None:
        return "user" if is_user else "assistant"
    if isinstance(raw.get("sender_type"), str):
        return canonical_role(raw["sender_type"])
    if sender is None:
        raise FieldError(f"{name}.sender", "missing: cannot tell who sent the message")
    if sender == user_id:
        return "user"
    if sender in bot_ids:
        return "assistant"
    if (alias := canonical_role(sender)) is not None:
        return alias
    if user_id is not None:
        return "assistant"
    if bot_ids:
        return "user"
    return None
