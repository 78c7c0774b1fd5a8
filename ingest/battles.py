"""Judged battles: `prompt`, `model_a`, `response_a`, `model_b`, `response_b`, `winner` per line.

As in AlpacaEval's annotations: `winner` is `model_a` | `model_b` | `tie` (also `a` | `b`, and
Arena's `tie (bothbad)`), `judge_preference` runs from 1.0 (a surely better) to 2.0 (b surely
better), `battle_id` is the source's own id. Other keys are kept as metadata.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.files import Record, iter_json_records
from ingest.readers import (
    FieldError,
    as_float,
    as_optional_text,
    as_text,
    field_reject,
    leftover,
    not_an_object,
    unstorable_text,
)
from ingest.records import BattleRecord, Parsed, Reject, Winner

if TYPE_CHECKING:
    from ingest.readers import ReadOptions

_WINNERS: dict[str, Winner] = {
    "model_a": "a",
    "a": "a",
    "model_b": "b",
    "b": "b",
    "tie": "tie",
    "tie (bothbad)": "tie",
}
_USED = frozenset(
    {
        "prompt",
        "model_a",
        "response_a",
        "model_b",
        "response_b",
        "winner",
        "judge",
        "judge_preference",
        "battle_id",
    }
)


def read_battles(path: Path, *, options: ReadOptions) -> Iterator[Parsed]:
    """BattleRecords and Rejects (and a Truncation for a cut file), in file order."""
    source = options.source_for(path)
    for item in iter_json_records(path, source=source, max_line_bytes=options.max_line_bytes):
        if type(item) is not Record:
            yield item
            continue
        yield parse_battle(item.value, item.number, source)


def parse_winner(raw: object) -> Winner | None:
    """`a`, `b` or `tie` for a winner as logged (model_a, B, "tie (bothbad)"); None if unknown."""
    return _WINNERS.get(raw.strip().lower()) if isinstance(raw, str) else None


def parse_battle(record: Any, number: int, source: str) -> BattleRecord | Reject:
    """One battles line (already decoded) as a BattleRecord, or the Reject saying why not;
    `number` and `source` say where it is. `convoscope export --format battles` checks with it
    that each line it writes reads back as the battle it was."""
    if not isinstance(record, dict):
        return not_an_object(source, number, record)
    try:
        prompt = as_text(record.get("prompt"), "prompt")
        if not prompt.strip():
            raise FieldError("prompt", "empty prompt")
        raw_winner = record.get("winner")
        winner = parse_winner(raw_winner)
        if winner is None:
            raise FieldError("winner", f"expected model_a, model_b or tie, got {raw_winner!r}")
        unstorable = unstorable_text(record)
        if unstorable is not None:
            raise unstorable
        return BattleRecord(
            prompt=prompt,
            model_a=as_text(record.get("model_a"), "model_a"),
            response_a=as_text(record.get("response_a"), "response_a"),
            model_b=as_text(record.get("model_b"), "model_b"),
            response_b=as_text(record.get("response_b"), "response_b"),
            winner=winner,
            source=source,
            line=number,
            judge=as_optional_text(record.get("judge"), "judge"),
            judge_preference=as_float(record.get("judge_preference"), "judge_preference"),
            external_id=as_optional_text(record.get("battle_id"), "battle_id"),
            metadata=leftover(record, _USED),
        )
    except FieldError as err:
        return field_reject(source, number, err, record)
