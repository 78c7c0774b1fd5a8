"""ShareGPT conversations: `{"id", "conversations": [{"from", "value"}]}`, as a JSON array or JSONL.

Arrays are streamed item by item (`ingest.files`), so a multi-gigabyte dump needs the memory
of one conversation; a truncated dump keeps every whole conversation and reports the cut. The
per-item work is kept to a dict lookup per message so reading costs little over parsing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.readers import (
    FieldError,
    checked_conversation,
    field_reject,
    not_an_object,
    read_json_conversations,
)
from ingest.records import (
    Conversation,
    Message,
    Parsed,
    Reject,
    UnknownRole,
    canonical_role,
)

if TYPE_CHECKING:
    from ingest.readers import ReadOptions

_USED = frozenset({"id", "conversations", "model"})


def read_sharegpt(path: Path, *, options: ReadOptions) -> Iterator[Parsed]:
    """Conversations, Rejects, UnknownRoles and at most one Truncation, in file order."""
    return read_json_conversations(path, options, _conversation)


def _conversation(
    record: Any, number: int, source: str, unknown: list[UnknownRole]
) -> Conversation | Reject:
    if not isinstance(record, dict):
        return not_an_object(source, number, record)
    try:
        turns = record.get("conversations")
        if not isinstance(turns, list):
            raise FieldError("conversations", "expected a list of {from, value} turns")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise FieldError(f"conversations[{i}]", "expected an object with from and value")
            raw_role = turn.get("from")
            value = turn.get("value")
            if not isinstance(raw_role, str):
                raise FieldError(f"conversations[{i}].from", "expected a role name")
            if not isinstance(value, str):
                raise FieldError(f"conversations[{i}].value", "expected a string")
            role = canonical_role(raw_role)
            if role is None:
                unknown.append(UnknownRole(source=source, line=number, role=raw_role))
                continue
            messages.append(Message(role=role, content=value))
        external_id = record.get("id")
        model = record.get("model")
        conversation = Conversation(
            messages=tuple(messages),
            source=source,
            line=number,
            external_id=None if external_id is None else str(external_id),
            model=model if isinstance(model, str) else None,
            metadata={k: v for k, v in record.items() if k not in _USED},
        )
    except FieldError as err:
        return field_reject(source, number, err, record)
    return checked_conversation(conversation, record, "conversations")
