"""Splitting conversations into exchanges, and the signals read off their structure."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ingest.exchanges import battle_exchanges, split_conversation
from ingest.readers import read_file
from ingest.records import BattleRecord, Conversation, Message

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def conversation(*messages: Message, **kwargs: object) -> Conversation:
    return Conversation(messages=messages, source="test", line=1, **kwargs)  # type: ignore[arg-type]


def test_multi_turn_context_prompt_and_structure_signals() -> None:
    conv = conversation(
        Message("system", "You are terse."),
        Message("user", "q1", created_at=at(0)),
        Message("assistant", "a1", created_at=at(2), model="m1"),
        Message("user", "q2", created_at=at(32)),
        Message("assistant", "a2", created_at=at(35)),
        model="default-model",
        external_id="ext-1",
    )
    first, second = split_conversation(conv)
    assert (first.turn_index, first.prompt, first.response) == (2, "q1", "a1")
    assert [m.content for m in first.context] == ["You are terse."]
    assert [m.content for m in second.context] == ["You are terse.", "q1", "a1"]
    assert first.instruction == second.instruction == "You are terse."
    assert (first.model, second.model) == ("m1", "default-model")
    assert (first.user_turns_after, second.user_turns_after) == (1, 0)
    assert (first.ended_conversation, second.ended_conversation) == (False, True)
    assert first.seconds_to_next_user_message == 30.0
    assert second.seconds_to_next_user_message is None
    assert first.created_at == at(2) and first.external_id == "ext-1"
    assert first.conversation_id == second.conversation_id == conv.id
    assert first.id != second.id
    assert first.retried is None and first.rating is None  # unknown stays None, never 0


def test_greeting_is_context_not_an_exchange() -> None:
    conv = conversation(
        Message("assistant", "Hi! I'm Luna."),
        Message("user", "hey"),
        Message("assistant", "what's up?"),
    )
    (only,) = split_conversation(conv)
    assert only.prompt == "hey" and [m.content for m in only.context] == ["Hi! I'm Luna."]


def test_chai_retry_from_a_real_file(tmp_path: Path) -> None:
    record = {
        "user_id": "u",
        "bot_id": "b",
        "thumbs_up": False,
        "text": "meh",
        "messages": [
            {"sender": "u", "content": "tell me a story", "sent_date": 1_700_000_000},
            {"sender": "b", "content": "Once...", "sent_date": 1_700_000_004, "deleted": True},
            {"sender": "b", "content": "Long ago...", "sent_date": 1_700_000_009, "deleted": False},
            {"sender": "u", "content": "and then?", "sent_date": 1_700_000_069},
            {"sender": "b", "content": "The end.", "sent_date": 1_700_000_070},
        ],
    }
    path = tmp_path / "chai.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    (conv,) = list(read_file(path))
    retried, kept, last = split_conversation(conv)
    assert (retried.retried, retried.deleted, retried.ended_conversation) == (True, True, False)
    assert (kept.retried, kept.deleted) == (False, False)
    assert retried.prompt == kept.prompt == "tell me a story"
    assert [m.content for m in last.context] == ["tell me a story", "Long ago..."]  # no retry
    assert kept.seconds_to_next_user_message == 60.0
    assert retried.seconds_to_next_user_message == 65.0
    # thumbs_up: false applies to the last kept response only
    assert (retried.thumbs, kept.thumbs, last.thumbs) == (None, None, -1)
    assert last.ended_conversation is True


def test_tool_calls_are_steps_of_a_turn_not_answers(tmp_path: Path) -> None:
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
    }
    record = {
        "thumbs": 1,
        "messages": [
            {"role": "user", "content": "weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21C"},
            {"role": "assistant", "content": "It is sunny."},
            {"role": "user", "content": "and tomorrow?"},
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "forecast", "arguments": "{}"},
            },
            {"role": "function", "name": "forecast", "content": "rain"},
            {"role": "assistant", "content": "Rain."},
        ],
    }
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    (conv,) = list(read_file(path))  # tool and function roles are known, not reported
    first, second = split_conversation(conv)
    assert (first.prompt, first.response, second.response) == (
        "weather in Oslo?",
        "It is sunny.",
        "Rain.",
    )
    assert first.ended_conversation is False and first.user_turns_after == 1
    assert first.metadata["tool_steps"] == [
        {"role": "assistant", "content": 'weather({"city": "Oslo"})', "tool_calls": [call]},
        {"role": "tool", "content": "sunny, 21C", "tool_call_id": "c1"},
    ]
    assert [s["content"] for s in second.metadata["tool_steps"]] == ["forecast({})", "rain"]
    # a later turn sees the whole tool use in its context; the conversation's thumbs go to the
    # last answer, not to a tool call
    assert [m.role for m in second.context] == ["user", "assistant", "tool", "assistant"]
    assert (first.thumbs, second.thumbs) == (None, 1)


def test_per_message_feedback_wins_over_conversation_feedback() -> None:
    conv = conversation(
        Message("user", "q"),
        Message("assistant", "a", thumbs=1),
        Message("user", "q2"),
        Message("assistant", "b"),
        thumbs=-1,
        rating=2.0,
    )
    first, last = split_conversation(conv)
    assert (first.thumbs, last.thumbs) == (1, None)
    assert last.rating == 2.0  # no response carries a rating: the conversation's applies


def test_unanswered_prompt_is_a_saved_input() -> None:
    conv = conversation(
        Message("system", "sys"),
        Message("user", "first"),
        Message("user", "replay me"),
        instruction="prompt-v3",
    )
    (saved,) = split_conversation(conv)
    assert (saved.prompt, saved.response, saved.turn_index) == ("replay me", "", 3)
    assert [m.content for m in saved.context] == ["sys", "first"]
    assert saved.instruction == "prompt-v3"
    assert saved.user_turns_after is None and saved.ended_conversation is None


def test_a_last_question_left_unanswered_is_a_saved_input() -> None:
    conv = conversation(
        Message("user", "q1"),
        Message("assistant", "", metadata={"tool_calls": [{"function": {"name": "f"}}]}),
        Message("tool", "42"),
        Message("assistant", "a1"),
        Message("user", "q2", created_at=at(5)),  # the log stops here: it was dropped
    )
    answered, saved = split_conversation(conv)
    assert (answered.response, answered.user_turns_after) == ("a1", 1)
    assert (saved.prompt, saved.response, saved.turn_index) == ("q2", "", 5)
    assert [m.content for m in saved.context] == ["q1", "", "42", "a1"]
    assert saved.created_at == at(5) and saved.user_turns_after is None


def test_no_user_message_no_exchange() -> None:
    assert split_conversation(conversation(Message("assistant", "hello?"))) == []


def test_battle_exchanges_share_ids_for_identical_answers() -> None:
    def battle(model_b: str, response_b: str, battle_id: str) -> BattleRecord:
        return BattleRecord(
            prompt="p",
            model_a="base",
            response_a="base answer",
            model_b=model_b,
            response_b=response_b,
            winner="a",
            source="b.jsonl",
            line=1,
            external_id=battle_id,
        )

    a1, b1 = battle_exchanges(battle("m1", "answer 1", "m1:0"))
    a2, b2 = battle_exchanges(battle("m2", "answer 2", "m2:0"))
    assert a1.id == a2.id and a1.conversation_id == a2.conversation_id
    assert b1.id != b2.id and b1.conversation_id != a1.conversation_id
    assert (b1.prompt, b1.response, b1.model, b1.turn_index) == ("p", "answer 1", "m1", 1)
    assert b1.ended_conversation is None and b1.user_turns_after is None
    plain = conversation(Message("user", "p"), Message("assistant", "answer 1", model="m1"))
    assert split_conversation(plain)[0].conversation_id == b1.conversation_id


def test_content_ids_never_change() -> None:
    """Ids are how a re-ingest finds what is stored: a changed hash would store every exchange
    of an old database a second time. These values are the ones every release so far computed."""
    from ingest.records import content_hash

    assert content_hash("exchange", "c1", 3, "Hi é \udc80", None, 1.5, True) == (
        "143a58af751bc40d574f26ec3eb4498c"
    )
    conv = Conversation(
        messages=(Message(role="user", content="Hi"), Message(role="assistant", content="Hello")),
        source="f.jsonl",
        line=1,
        external_id="x",
    )
    assert conv.id == content_hash(
        "conversation", "x", 2, "user", "Hi", None, "assistant", "Hello", None
    )
    assert split_conversation(conv)[0].id == content_hash(
        "exchange", conv.id, 1, "Hi", "Hello", None
    )
