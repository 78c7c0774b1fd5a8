"""`--merge-history`: an OpenAI chat log that repeats a chat's history with every request (a
gateway's) stored as one conversation per chat, with the signals of the chat as it went on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ingest.pipeline import IngestConfig, ingest_paths
from storage.engine import open_database
from storage.logs import iter_exchanges, table_counts


def _request(turns: list[tuple[str, str]], minute: int, **extra: object) -> str:
    """One gateway line: the chat's history so far, the new question and its answer."""
    messages = [
        {"role": role, "content": text}
        for question, answer in turns
        for role, text in (("user", question), ("assistant", answer))
    ]
    line = {"messages": messages, "model": "m1", "created_at": f"2026-01-01T10:{minute:02d}:00Z"}
    return json.dumps(line | extra)


def _ingest(path: Path, db: Path, **options: object):
    engine = open_database(f"duckdb:///{db}")
    config = IngestConfig(progress=False, rejects_path=path.parent / "rejects.jsonl", **options)
    summary = ingest_paths([path], engine=engine, config=config)
    rows = [r for batch in iter_exchanges(engine) for r in batch]
    counts = table_counts(engine)
    engine.dispose()
    return summary, rows, counts


def _gateway_log(path: Path) -> None:
    """Two chats interleaved, as users write at once: A has three requests, B two; the last
    request of A carries the user's thumbs, and a rating of A's first answer."""
    a = [("hi", "Hello!"), ("a joke?", "No."), ("please", "Knock knock.")]
    b = [("2+2?", "4"), ("and 3+3?", "6")]
    lines = [
        _request(a[:1], 0),
        _request(b[:1], 1),
        _request(a[:2], 3),  # 3 minutes after A's first request
        _request(b[:2], 4),
        _request(a[:3], 5, thumbs=-1),
    ]
    last = json.loads(lines[-1])
    last["messages"][1]["rating"] = 5  # rated after the fact: the last line says so
    lines[-1] = json.dumps(last)
    path.write_text("\n".join(lines) + "\n")


def test_merged_lines_store_each_chat_once_with_its_signals_and_request_times(
    tmp_path: Path,
) -> None:
    log = tmp_path / "gateway.jsonl"
    _gateway_log(log)
    summary, rows, counts = _ingest(log, tmp_path / "merged.duckdb", merge_history=True)
    assert (summary.conversations, summary.stored) == (2, 5)
    assert counts["conversations"] == 2
    assert summary.warnings == [
        f"{log}: --merge-history: 3 lines continued an earlier line's conversation and were "
        "merged into it"
    ]
    by_prompt = {r["prompt"]: r for r in rows}
    assert sorted(by_prompt) == ["2+2?", "a joke?", "and 3+3?", "hi", "please"]
    hi, joke, please = by_prompt["hi"], by_prompt["a joke?"], by_prompt["please"]
    assert hi["conversation_id"] == joke["conversation_id"] == please["conversation_id"]
    # Where the user went on and where they left, as the chat went: not every line's end.
    assert [(r["user_turns_after"], r["ended_conversation"]) for r in (hi, joke, please)] == [
        (2, False),
        (1, False),
        (0, True),
    ]
    # From one request to the next: 3 minutes, then 2; the chat's last answer has none.
    assert [r["seconds_to_next_user_message"] for r in (hi, joke, please)] == [180.0, 120.0, None]
    assert please["thumbs"] == -1 and hi["thumbs"] is None
    assert hi["rating"] == 5
    assert by_prompt["2+2?"]["seconds_to_next_user_message"] == 180.0
    assert [len(json.loads(r["context"])) for r in (hi, joke, please)] == [0, 2, 4]

    # The same lines give the same chats: a re-run stores nothing.
    again, _, _ = _ingest(log, tmp_path / "merged.duckdb", merge_history=True)
    assert (again.stored, again.duplicates) == (0, 5)


def test_without_the_option_each_line_is_a_conversation_and_the_user_is_told(
    tmp_path: Path,
) -> None:
    log = tmp_path / "gateway.jsonl"
    _gateway_log(log)
    summary, rows, _ = _ingest(log, tmp_path / "lines.duckdb")
    assert (summary.conversations, summary.stored) == (5, 9)
    (warning,) = summary.warnings
    assert "3 lines (the first at line 3) begin with the whole conversation" in warning
    assert "--merge-history" in warning
    ended = [r["prompt"] for r in rows if r["ended_conversation"]]
    assert sorted(ended) == ["2+2?", "a joke?", "and 3+3?", "hi", "please"]


def test_a_regenerated_answer_in_a_conversation_is_kept_as_retried(tmp_path: Path) -> None:
    """Lines of one conversation id that send the last request again with another answer:
    the user regenerated it, the strongest label a log gives. The earlier answer stays in
    the chat as retried, and the chat goes on from the new one."""
    hi, q, q2 = ("hi", "Hello!"), ("q", "a"), ("q2", "b")
    lines = [
        _request([hi], 0, conversation_id="c1"),
        _request([hi, q], 1, conversation_id="c1"),
        _request([hi, ("q", "a2")], 2, conversation_id="c1"),  # regenerated
        _request([hi, ("q", "a2"), q2], 3, conversation_id="c1"),
        _request([hi, ("q", "a2"), ("q2", "b2")], 4, conversation_id="c1"),  # again
    ]
    log = tmp_path / "retries.jsonl"
    log.write_text("\n".join(lines) + "\n")
    summary, rows, counts = _ingest(log, tmp_path / "retries.duckdb", merge_history=True)
    assert counts["conversations"] == 1
    assert summary.warnings == [
        f"{log}: --merge-history: 4 lines continued an earlier line's conversation and were "
        "merged into it (2 of them regenerated the last answer: it is stored as retried)"
    ]
    by_answer = {r["response"]: r for r in rows}
    assert [(r["response"], r["retried"]) for r in sorted(rows, key=lambda r: r["turn_index"])] == [
        ("Hello!", None),
        ("a", True),
        ("a2", None),
        ("b", True),
        ("b2", None),
    ]
    assert by_answer["b2"]["ended_conversation"] and not by_answer["b"]["ended_conversation"]
    # What the user built on: the regenerated answers are left out of later contexts.
    context = [m["content"] for m in json.loads(by_answer["b2"]["context"])]
    assert context == ["hi", "Hello!", "q", "a2"]
    assert by_answer["a2"]["seconds_to_next_user_message"] == 60.0  # sent at 2, q2 at 3
    again, _, _ = _ingest(log, tmp_path / "retries.duckdb", merge_history=True)
    assert again.stored == 0


def _edits_log(path: Path) -> None:
    """Two chats whose users edit their last message (a chat UI's "edit" button): the gateway
    logs the history before that message with the edited one in its place. In c1 the second
    request is edited and the chat goes on; in c2 the first and only one is."""
    hi = ("hi", "Hello!")
    lines = [
        _request([hi], 0, conversation_id="c1"),
        _request([hi, ("capital of Autralia?", "Sorry, which country?")], 1, conversation_id="c1"),
        _request([hi, ("capital of Australia?", "Canberra.")], 3, conversation_id="c1"),
        _request(
            [hi, ("capital of Australia?", "Canberra."), ("thanks", "You're welcome.")],
            4,
            conversation_id="c1",
        ),
        _request([("helo", "?")], 5, conversation_id="c2"),
        _request([("hello", "Hi!")], 6, conversation_id="c2"),
    ]
    path.write_text("\n".join(lines) + "\n")


def test_an_edited_last_message_is_merged_and_its_earlier_answer_kept_as_edited(
    tmp_path: Path,
) -> None:
    """The answer to the message before the edit is what the user rejected by editing: stored
    `edited`, not as where they left, and out of what later turns were built on."""
    log = tmp_path / "edits.jsonl"
    _edits_log(log)
    summary, rows, counts = _ingest(log, tmp_path / "edits.duckdb", merge_history=True)
    assert (summary.conversations, counts["conversations"], summary.stored) == (2, 2, 6)
    assert summary.warnings == [
        f"{log}: --merge-history: 4 lines continued an earlier line's conversation and were "
        "merged into it (2 of them edited the last message: its earlier answer is stored as "
        "edited)"
    ]
    signals = [
        (r["prompt"], r["edited"], r["user_turns_after"], r["ended_conversation"])
        for r in sorted(rows, key=lambda r: (r["created_at"], r["turn_index"]))
    ]
    assert signals == [
        ("hi", None, 2, False),  # the edited message is not a turn of its own: the edit is
        ("capital of Autralia?", True, 2, False),
        ("capital of Australia?", None, 1, False),
        ("thanks", None, 0, True),
        ("helo", True, 1, False),
        ("hello", None, 0, True),
    ]
    by_answer = {r["response"]: r for r in rows}
    assert len({r["conversation_id"] for r in rows}) == 2
    assert not any(r["retried"] for r in rows)
    # The model answering the edit saw the chat without the replaced turn, and so did later ones.
    context = {a: [m["content"] for m in json.loads(by_answer[a]["context"])] for a in by_answer}
    assert context["Canberra."] == context["Sorry, which country?"] == ["hi", "Hello!"]
    assert context["You're welcome."] == ["hi", "Hello!", "capital of Australia?", "Canberra."]
    assert context["Hi!"] == context["?"] == []
    # From the answer the user rejected to their edit: 2 minutes.
    assert by_answer["Sorry, which country?"]["seconds_to_next_user_message"] == 120.0
    assert by_answer["Canberra."]["seconds_to_next_user_message"] == 60.0

    again, _, _ = _ingest(log, tmp_path / "edits.duckdb", merge_history=True)
    assert (again.stored, again.duplicates) == (0, 6)


def test_an_edit_after_a_regeneration_sets_both_answers_aside(tmp_path: Path) -> None:
    """The user regenerates an answer, then edits the request instead: both answers were
    rejected, the first one twice."""
    hi = ("hi", "Hello!")
    lines = [
        _request([hi, ("q", "a")], 0, conversation_id="c1"),
        _request([hi, ("q", "a2")], 1, conversation_id="c1"),  # regenerated
        _request([hi, ("q!", "b")], 2, conversation_id="c1"),  # edited
    ]
    log = tmp_path / "both.jsonl"
    log.write_text("\n".join(lines) + "\n")
    summary, rows, _ = _ingest(log, tmp_path / "both.duckdb", merge_history=True)
    (merged,) = summary.warnings
    assert "(1 of them regenerated the last answer: it is stored as retried; 1 of" in merged
    assert [
        (r["prompt"], r["response"], r["retried"], r["edited"], r["ended_conversation"])
        for r in sorted(rows, key=lambda r: r["turn_index"])
    ] == [
        ("hi", "Hello!", None, None, False),
        ("q", "a", True, True, False),
        ("q", "a2", None, True, False),
        ("q!", "b", None, None, True),
    ]


def test_without_the_option_an_edited_message_is_a_conversation_of_its_own(
    tmp_path: Path,
) -> None:
    """Unchanged without --merge-history: each line is stored as logged."""
    log = tmp_path / "edits.jsonl"
    _edits_log(log)
    summary, rows, counts = _ingest(log, tmp_path / "lines.duckdb")
    assert (summary.conversations, counts["conversations"], summary.stored) == (6, 6, 10)
    (warning,) = summary.warnings
    assert "3 lines (the first at line 2) begin with the whole conversation" in warning
    assert not any(r["edited"] or r["retried"] for r in rows)
    ended = sorted(r["prompt"] for r in rows if r["ended_conversation"])
    assert ended == [
        "capital of Australia?",
        "capital of Autralia?",
        "hello",
        "helo",
        "hi",
        "thanks",
    ]


def test_lines_of_other_conversations_or_too_late_are_not_merged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line with another conversation id never merges; nor does one that comes after the
    chat it continues was stored, or, with no conversation id, after another line continued
    it (a regenerated answer, or two users): each is stored as it is, and counted."""
    from ingest import openai_chat

    monkeypatch.setattr(openai_chat, "_HELD_LINES", 2)  # hold two lines, not 100,000
    first = [("hi", "Hello!")]
    lines = [
        _request(first, 0, conversation_id="c1"),
        _request([*first, ("q", "a")], 1, conversation_id="c2"),  # another chat: not merged
        _request([*first, ("q", "a")], 2, conversation_id="c1"),  # c1 goes on: merged
        _request([("p", "r")], 3),
        _request([("p", "r"), ("p2", "r2")], 4),  # merged
        _request([("p", "r"), ("p2", "r3")], 5),  # no id: a branch, not a retry
        _request([("x", "y")], 6),
        _request([("z", "w")], 7),
        _request([("u", "v")], 8),  # a third line held: x is let go, the oldest
        _request([("x", "y"), ("x2", "y2")], 9),  # too late
    ]
    log = tmp_path / "mixed.jsonl"
    log.write_text("\n".join(lines) + "\n")
    summary, rows, counts = _ingest(log, tmp_path / "mixed.duckdb", merge_history=True)
    assert counts["conversations"] == 8
    merged, late = summary.warnings
    assert "2 lines continued" in merged and "retried" not in merged
    assert late.startswith(f"{log}: --merge-history: 2 lines (the first at line 6) continue")
    answers = sorted((r["prompt"], r["response"], r["user_turns_after"]) for r in rows)
    assert answers == [
        ("hi", "Hello!", 1),  # c1, merged
        ("hi", "Hello!", 1),  # c2
        ("p", "r", 1),  # merged
        ("p", "r", 1),  # the branch
        ("p2", "r2", 0),
        ("p2", "r3", 0),
        ("q", "a", 0),
        ("q", "a", 0),
        ("u", "v", 0),
        ("x", "y", 0),  # stored before its continuation came
        ("x", "y", 1),
        ("x2", "y2", 0),
        ("z", "w", 0),
    ]
    assert not any(r["retried"] for r in rows)


def test_the_option_on_a_format_without_histories_is_named_as_ignored(tmp_path: Path) -> None:
    log = tmp_path / "sharegpt.json"
    chat = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "Hello!"}]
    log.write_text(json.dumps([{"id": "s1", "conversations": chat}]))
    summary, _, _ = _ingest(log, tmp_path / "s.duckdb", merge_history=True)
    assert summary.stored == 1
    assert summary.warnings == [
        f"{log}: --merge-history ignored: it merges OpenAI chat logs' lines (this file is sharegpt)"
    ]


def test_retry_rates_count_the_answers_that_were_not_retried(tmp_path: Path) -> None:
    """A regeneration found by --merge-history marks one answer retried and leaves the rest
    of the log unmarked: the UI's retry rate, over known answers only, read 100 %. In a source
    that marks retries the unmarked answers count as not retried; a log that marks none
    stays unknown."""
    from storage.views import ViewFilter, overview

    chat = [{"role": "user", "content": "Plan a trip"}]
    lines = [
        {"conversation_id": "c1", "messages": [*chat, {"role": "assistant", "content": "No."}]},
        {"conversation_id": "c1", "messages": [*chat, {"role": "assistant", "content": "Day 1"}]},
    ]
    for i in range(3):
        lines.append(
            {
                "conversation_id": f"other{i}",
                "messages": [
                    {"role": "user", "content": f"question {i}"},
                    {"role": "assistant", "content": f"answer {i}"},
                ],
            }
        )
    gateway = tmp_path / "gateway.jsonl"
    gateway.write_text("".join(json.dumps(line) + "\n" for line in lines))
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"messages": [*chat, {"role": "assistant", "content": "Hi"}]}))
    db = f"duckdb:///{tmp_path / 'rates.duckdb'}"
    engine = open_database(db)
    config = IngestConfig(progress=False, rejects_path=tmp_path / "r.jsonl", merge_history=True)
    ingest_paths([gateway], engine=engine, config=config)
    stored = [row["retried"] for batch in iter_exchanges(engine) for row in batch]
    assert sorted(stored, key=str) == [None] * 4 + [True]  # one regeneration marked
    figures = overview(engine, None, ViewFilter(), scorer=None)
    assert figures["retry_rate"] == pytest.approx(1 / 5)
    ingest_paths(
        [plain],
        engine=engine,
        config=IngestConfig(progress=False, rejects_path=tmp_path / "r2.jsonl"),
    )
    figures = overview(engine, None, ViewFilter(), scorer=None)
    assert figures["retry_rate"] == pytest.approx(1 / 5)  # the other log says nothing of it
    engine.dispose()
