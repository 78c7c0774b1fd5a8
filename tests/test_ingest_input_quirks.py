"""Readers on the quirks of real input files (BOMs, odd Unicode, time zones, sloppy CSV headers),
each on a real file written to tmp_path."""

from __future__ import annotations

import csv
import gzip
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ingest.detect import detect_format
from ingest.exchanges import split_conversation
from ingest.pipeline import IngestConfig, IngestSummary, ingest_paths
from ingest.readers import ReadOptions, read_file
from ingest.records import Conversation, Message, Reject, content_hash
from storage.engine import open_database
from storage.logs import iter_exchanges
from tests.test_ingest_readers import of, openai_line, write_jsonl


def write_csv_rows(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)


def test_time_zone_offsets_are_converted_to_utc(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [openai_line("q", "a", created_at="2024-01-01T10:00:30+02:00")],
    )
    (conv,) = list(read_file(path))
    assert conv.created_at.tzinfo is UTC
    # SQLite's naive column stores the wall clock: it must be UTC's, not the writer's +02:00.
    assert conv.created_at.replace(tzinfo=None) == datetime(2024, 1, 1, 8, 0, 30)


def test_output_text_and_refusal_parts_are_kept(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "responses.jsonl",
        [
            openai_line("hi", [{"type": "output_text", "text": "Hello", "annotations": []}]),
            openai_line("do it", [{"type": "refusal", "refusal": "I can't"}]),
        ],
    )
    answers = [conv.messages[1].content for conv in read_file(path)]
    assert answers == ["Hello", "I can't"]


BOM = b"\xef\xbb\xbf"


def test_a_utf8_bom_is_skipped_in_jsonl_json_arrays_and_csv(tmp_path: Path) -> None:
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_bytes(BOM + (json.dumps(openai_line("q", "a")) + "\n").encode())
    array = tmp_path / "sg.json"
    item = {
        "id": "x",
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
    }
    array.write_bytes(BOM + json.dumps([item]).encode())
    table = tmp_path / "excel.csv"
    table.write_bytes(BOM + b"prompt,response\r\nq,a\r\n")
    gzipped = tmp_path / "sg.json.gz"
    gzipped.write_bytes(gzip.compress(array.read_bytes()))
    for path in (jsonl, array, table, gzipped):
        (conv,) = list(read_file(path))
        assert [m.content for m in conv.messages] == ["q", "a"], path
    assert [type(p) for p in read_file(array, format="sharegpt")] == [Conversation]
    assert detect_format(array) == "sharegpt"
    headerless_name = tmp_path / "excel.txt"  # detected by its header, not its name
    headerless_name.write_bytes(table.read_bytes())
    assert detect_format(headerless_name) == "csv"


def test_detection_looks_past_a_first_record_that_fits_no_format(tmp_path: Path) -> None:
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": []}, openai_line("q", "a")])
    assert detect_format(chat) == "openai"
    parsed = list(read_file(chat))
    assert [(r.line, r.reason) for r in of(Reject, parsed)] == [(1, "no messages")]
    assert len(of(Conversation, parsed)) == 1
    array = tmp_path / "chat.json"
    array.write_text(json.dumps([{"messages": []}, 7, openai_line("q", "a")]), encoding="utf-8")
    assert detect_format(array) == "openai"
    battle = {"prompt": "p", "model_a": "m1", "response_a": "r1", "model_b": "m2"}
    battles = write_jsonl(
        tmp_path / "battles.jsonl",
        [battle, {**battle, "response_b": "r2", "winner": "model_a"}],
    )
    assert detect_format(battles) == "battles"


def test_a_pretty_printed_object_is_said_to_be_one(tmp_path: Path) -> None:
    """A dataset's dict of splits (clinc150.json) read as "JSON lines whose first record is
    not a JSON object ... Pass --format": it is no JSON lines, and no --format reads it."""
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": [["book a flight", "travel"]]}, indent=4))
    with pytest.raises(ValueError, match="one JSON object spread over many lines") as raised:
        detect_format(splits)
    assert "--format" not in str(raised.value) and "jq -c" in str(raised.value)
    one_line = tmp_path / "one.jsonl"  # a JSON line that fits no format still reads as one
    one_line.write_text(json.dumps({"train": [["book a flight", "travel"]]}) + "\n")
    with pytest.raises(ValueError, match="JSON lines whose first record has keys"):
        detect_format(one_line)


def test_an_empty_or_scalar_array_says_what_it_holds(tmp_path: Path) -> None:
    """`[ ]` used to read as "an array whose first item has keys []"."""
    empty = tmp_path / "empty.json"
    empty.write_bytes(BOM + b"[ \n ]")
    with pytest.raises(ValueError, match="is an empty JSON array: no records to ingest"):
        detect_format(empty)
    numbers = tmp_path / "numbers.json"
    numbers.write_text("[1, 2]")
    with pytest.raises(ValueError, match="first item is not a JSON object"):
        detect_format(numbers)


def test_a_quote_left_open_at_the_end_of_a_csv_is_a_reject(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_bytes(b'prompt,response\r\nfirst,ok\r\nsecond,"bad\r\nthird,x\r\n')
    parsed = list(read_file(path))
    assert [c.messages[1].content for c in of(Conversation, parsed)] == ["ok"]
    (reject,) = of(Reject, parsed)
    assert reject.line == 3 and reject.reason.startswith("unterminated quoted field")


def test_invalid_utf8_inside_a_multi_line_cell_rejects_the_whole_row(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_bytes(b'prompt,response\nq1,a1\nq2,"line one\nline \xff two\nline three"\nq3,a3\n')
    parsed = list(read_file(path))
    # It was stored with the bad line cut out of its answer: "line one\nline three".
    assert [c.messages[0].content for c in of(Conversation, parsed)] == ["q1", "q3"]
    (reject,) = of(Reject, parsed)
    assert reject.line == 4 and "inside the row from line 3: the row is skipped" in reject.reason


def test_a_stray_quote_inside_a_quoted_csv_cell_is_a_reject(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_bytes(b'prompt,response\r\n"he said "hi" ok",x\r\nnext,y\r\n')
    parsed = list(read_file(path))
    assert [c.messages[0].content for c in of(Conversation, parsed)] == ["next"]
    (reject,) = of(Reject, parsed)
    assert reject.line == 2 and "expected after" in reject.reason


def test_csv_headers_match_fields_whatever_their_case_and_spaces(tmp_path: Path) -> None:
    path = tmp_path / "sheet.csv"
    path.write_text("Prompt, Response ,MODEL\nq,a,m1\n", encoding="utf-8")
    (conv,) = list(read_file(path))
    assert [m.content for m in conv.messages] == ["q", "a"]
    assert conv.messages[1].model == "m1" and conv.messages[1].metadata is None
    exact = tmp_path / "both.csv"
    exact.write_text("Prompt,prompt,response\nloose,exact,a\n", encoding="utf-8")
    (conv,) = list(read_file(exact))
    assert conv.messages[0].content == "exact"  # the exact name wins
    assert conv.messages[1].metadata == {"Prompt": "loose"}


def test_a_mapped_column_is_found_exactly_then_without_stray_spaces(tmp_path: Path) -> None:
    path = tmp_path / "spaced.csv"
    path.write_text("question, answer\nq,a\n", encoding="utf-8")
    for column in (" answer", "answer"):  # as named, and as `--map` passes it (stripped)
        mapping = {"prompt": "question", "response": column}
        (conv,) = list(read_file(path, options=ReadOptions(mapping=mapping)))
        assert [m.content for m in conv.messages] == ["q", "a"]


def test_a_row_without_a_time_does_not_take_the_first_rows_time(tmp_path: Path) -> None:
    first = datetime(2024, 1, 1, 10, 0, tzinfo=UTC)
    table = pa.table(
        {
            "conversation_id": ["c1", "c1", "c2"],
            "prompt": ["q1", "q2", "solo"],
            "response": ["a1", "a2", "s"],
            "created_at": [first, None, first],
        }
    )
    path = tmp_path / "log.parquet"
    pq.write_table(table, path)
    timed, solo = (split_conversation(conv) for conv in read_file(path))
    assert [e.created_at for e in timed] == [first, None]
    assert [e.created_at for e in solo] == [first]


SURROGATE = "contains an unpaired surrogate \\ud83d, not valid Unicode"
NUL = "contains a NUL character (\\u0000), which databases cannot store"


def test_lone_surrogates_and_nul_reject_their_record_in_every_json_format(tmp_path: Path) -> None:
    lone, nul = "lone \ud83d x", "nul \x00 x"
    battle = {"prompt": "p", "model_a": "m1", "response_a": "r1", "model_b": "m2"}
    cases = {
        "chat.jsonl": (
            openai_line(lone, "2"),
            openai_line("q", [{"type": "text", "text": nul}]),
            openai_line("q", "a", team={"name": lone}),
            ["messages[0].content", "messages[1].content[0].text", "team.name"],
        ),
        "sg.jsonl": (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": lone}]},
            {"conversations": [{"from": "human", "value": nul}]},
            {"model": lone, "conversations": [{"from": "human", "value": "q"}]},
            ["conversations[1].value", "conversations[0].value", "model"],
        ),
        "chai.jsonl": (
            {"bot_id": "b", "messages": [{"sender": "u", "content": lone}]},
            {"bot_id": "b", "messages": [{"sender": "u", "content": "q"}], "text": nul},
            {"bot_id": lone, "messages": [{"sender": "u", "content": "q"}]},
            ["messages[0].content", "text", "bot_id"],
        ),
        "battles.jsonl": (
            {**battle, "response_b": lone, "winner": "a"},
            {**battle, "response_b": "r2", "winner": "a", "judge": nul},
            {**battle, "response_b": "r2", "winner": "a", lone: 1},
            ["response_b", "judge", "lone \\ud83d x"],  # a field name the rejects file can hold
        ),
    }
    for name, (*bad, fields) in cases.items():
        path = tmp_path / name
        # json.dumps escapes them as \ud83d and \u0000, as real logs hold them; the last line
        # is the first one repaired, a good record after the bad ones.
        lines = [json.dumps(record) for record in bad]
        path.write_text("\n".join([*lines, lines[0].replace("\\ud83d", "ok")]) + "\n")
        parsed = list(read_file(path))
        rejects = of(Reject, parsed)
        reasons = [SURROGATE, NUL, SURROGATE]
        assert [(r.line, r.field, r.reason) for r in rejects] == [
            (line, field, reason)
            for line, (field, reason) in enumerate(zip(fields, reasons, strict=True), 1)
        ], name
        assert all(r.excerpt.encode("utf-8") for r in rejects)  # the rejects file can hold them
        assert len(parsed) == 4, name  # the good record is kept


def test_lone_surrogates_and_nul_reject_their_row_in_csv_and_parquet(tmp_path: Path) -> None:
    table = pa.table({"prompt": ["ok", "a\x00b", "fine"], "note": ["x", "y", "z\x00"]})
    pq.write_table(table, tmp_path / "log.parquet")
    parsed = list(read_file(tmp_path / "log.parquet"))
    assert [c.messages[0].content for c in of(Conversation, parsed)] == ["ok"]
    assert [(r.line, r.field, r.reason) for r in of(Reject, parsed)] == [
        (2, "prompt", NUL),
        (3, "note", NUL),
    ]
    path = tmp_path / "log.csv"
    context = json.dumps([{"role": "user", "content": "lone \ud83d"}])
    write_csv_rows(path, [["prompt", "context"], ["q", context], ["q2", ""]])
    parsed = list(read_file(path))
    assert [c.messages[0].content for c in of(Conversation, parsed)] == ["q2"]
    assert [(r.line, r.field, r.reason) for r in of(Reject, parsed)] == [
        (2, "context[0].content", SURROGATE)
    ]


def test_ingest_stores_the_good_records_around_a_lone_surrogate(tmp_path: Path) -> None:
    log = tmp_path / "chat.jsonl"
    log.write_text(
        json.dumps(openai_line("lone \ud83d x", "2"))
        + "\n"
        + json.dumps(openai_line("q", "a"))
        + "\n",
        encoding="utf-8",
    )
    engine = open_database(f"sqlite:///{tmp_path / 'x.sqlite'}")
    rejects = tmp_path / "rejects.jsonl"
    config = IngestConfig(rejects_path=rejects, progress=False)
    summary = ingest_paths([log], engine=engine, config=config)
    assert (summary.stored, summary.rejected) == (1, 1)
    (reject,) = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert (reject["line"], reject["field"], reject["reason"]) == (
        1,
        "messages[0].content",
        SURROGATE,
    )
    assert "lone \\ud83d x" in reject["excerpt"]


def test_a_lone_surrogate_in_a_json_array_rejects_its_item_as_in_jsonl(tmp_path: Path) -> None:
    """ijson's C backend turned "\\ud83d" into "?" (stored silently), merged "\\ud83d\\u0041" into
    another character and failed the whole file on "\\udc00": an array item is now rejected by
    field and reason as its JSONL line is, and the items around it are stored."""

    def item(n: int, answer: str, **extra: str) -> dict:
        turns = [{"from": "human", "value": f"q{n}"}, {"from": "gpt", "value": answer}]
        return {"id": str(n), "conversations": turns, **extra}

    items = [item(1, "a"), item(2, "x HIGH y"), item(3, "PAIRLESS"), item(4, "a", model="LOW")]
    text = json.dumps([*items, item(5, "\U0001f600")], indent=1)  # a real pair: kept
    escapes = {"HIGH": "\\ud83d", "PAIRLESS": "\\ud83d\\u0041", "LOW": "\\udc00"}
    for word, escape in escapes.items():
        text = text.replace(word, escape)
    log = tmp_path / "sg.json"
    log.write_text(text, encoding="utf-8")
    rejects = tmp_path / "rejects.jsonl"
    engine = open_database(f"sqlite:///{tmp_path / 'x.sqlite'}")
    config = IngestConfig(rejects_path=rejects, progress=False)
    summary = ingest_paths([log], engine=engine, config=config)
    engine.dispose()
    assert (summary.stored, summary.rejected, summary.warnings) == (2, 3, [])
    found = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert [(r["file"], r["line"], r["field"], r["reason"]) for r in found] == [
        (str(log), 2, "conversations[1].value", SURROGATE),
        (str(log), 3, "conversations[1].value", SURROGATE),
        (str(log), 4, "model", SURROGATE.replace("ud83d", "udc00")),
    ]
    assert "x \\ud83d y" in found[0]["excerpt"]
    answers = [conv.messages[1].content for conv in of(Conversation, list(read_file(log)))]
    assert answers == ["a", "\U0001f600"]


def test_a_lone_low_surrogate_in_an_arrays_first_item_costs_only_that_item(
    tmp_path: Path,
) -> None:
    """Format detection read array items with yajl, which raised on "\\udc00": the whole file
    went unread. It is detected as usual, and only the item holding the escape is rejected."""
    turns = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    items = [
        {"id": "1", "model": "LOW", "conversations": turns},
        {"id": "2", "conversations": turns},
    ]
    log = tmp_path / "sg.json"
    log.write_text(json.dumps(items).replace("LOW", "\\udc00"), encoding="utf-8")
    assert detect_format(log) == "sharegpt"
    rejects = tmp_path / "rejects.jsonl"
    engine = open_database(f"duckdb:///{tmp_path / 'x.duckdb'}")
    config = IngestConfig(rejects_path=rejects, progress=False)
    summary = ingest_paths([log], engine=engine, config=config)
    engine.dispose()
    assert (summary.stored, summary.rejected, summary.unread_files) == (1, 1, 0)
    (reject,) = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert (reject["line"], reject["field"], reject["reason"]) == (
        1,
        "model",
        SURROGATE.replace("ud83d", "udc00"),
    )


def test_an_unanswered_csv_row_keeps_its_model_and_id(tmp_path: Path) -> None:
    path = tmp_path / "inputs.csv"
    path.write_text("prompt,response,model,external_id\nanswered,yes,m1,e1\nopen,,m4,e2\n")
    exchanges = [e for conv in read_file(path) for e in split_conversation(conv)]
    assert [(e.prompt, e.response, e.model, e.external_id) for e in exchanges] == [
        ("answered", "yes", "m1", "e1"),
        ("open", "", "m4", "e2"),  # a saved input, for the model it was meant for
    ]


IMAGE_ONLY = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]


def _ingest_into(tmp_path: Path, *logs: Path) -> tuple[IngestSummary, list[dict[str, Any]], Path]:
    """Ingest into one DuckDB file under tmp_path: the summary, the stored exchanges by turn,
    the rejects file."""
    engine = open_database(f"duckdb:///{tmp_path / 'x.duckdb'}")
    rejects = tmp_path / "rejects.jsonl"
    summary = ingest_paths(
        list(logs), engine=engine, config=IngestConfig(rejects_path=rejects, progress=False)
    )
    rows = sorted(
        (r for batch in iter_exchanges(engine) for r in batch),
        key=lambda r: (r["source"], r["turn_index"]),
    )
    engine.dispose()
    return summary, rows, rejects


def test_an_answer_to_a_user_message_with_no_text_is_left_out_and_counted(
    tmp_path: Path,
) -> None:
    """A user message of images only (OpenAI) or of whitespace (ShareGPT) is no prompt: its
    answer is not an exchange, and an unanswered one is no saved input. The rest of the
    conversation is stored under the ids it always had, the empty turn in its context."""
    chat = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": IMAGE_ONLY},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "q3"},
        {"role": "assistant", "content": "a3"},
    ]
    openai = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": chat, "model": "m1"}, {"messages": [chat[0]], "model": "m1"}],
    )
    turns = [("human", "hi"), ("gpt", "Hello!"), ("human", " \n")]
    sharegpt = write_jsonl(
        tmp_path / "sharegpt.jsonl",
        [{"id": "s1", "conversations": [{"from": f, "value": v} for f, v in turns]}],
    )
    summary, rows, _ = _ingest_into(tmp_path, openai, sharegpt)
    assert (summary.rejected, summary.stored) == (0, 4)
    assert summary.empty_prompts == 2
    assert summary.warnings == [
        f"{log}: 1 exchanges left out: the user message each answers has no text (empty, "
        "whitespace, or only images); it stays in later turns' context"
        for log in (openai, sharegpt)
    ]
    by_answer = {(r["source"], r["response"]): r for r in rows}
    assert sorted(by_answer) == [
        (str(openai), ""),  # a saved input: an empty response is no missing prompt
        (str(openai), "a1"),
        (str(openai), "a3"),
        (str(sharegpt), "Hello!"),
    ]
    # The ids are the ones the conversation's exchanges always had: the whole conversation,
    # empty turn included, names it, and each answer keeps its place in it.
    messages = tuple(Message(m["role"], m["content"] if m is not chat[2] else "") for m in chat)
    conversation_id = Conversation(messages, source=str(openai), line=1).id
    a1, a3 = by_answer[str(openai), "a1"], by_answer[str(openai), "a3"]
    assert (a1["turn_index"], a3["turn_index"]) == (1, 5)
    assert a1["id"] == content_hash("exchange", conversation_id, 1, "q1", "a1", "m1")
    assert a3["id"] == content_hash("exchange", conversation_id, 5, "q3", "a3", "m1")
    assert [m["content"] for m in json.loads(a3["context"])] == ["q1", "a1", "", "A cat."]
    assert a1["user_turns_after"] == 2  # the empty message was a turn all the same

    again, _, _ = _ingest_into(tmp_path, openai, sharegpt)
    assert (again.stored, again.duplicates, again.empty_prompts) == (0, 4, 2)


def test_a_conversation_whose_user_messages_are_all_empty_is_rejected(tmp_path: Path) -> None:
    openai = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            openai_line("q", "a"),
            openai_line(IMAGE_ONLY, "A cat."),
            {"messages": [{"role": "user", "content": ""}, {"role": "user", "content": " "}]},
        ],
    )
    sharegpt = write_jsonl(
        tmp_path / "sharegpt.jsonl",
        [
            {
                "id": "s1",
                "conversations": [{"from": "human", "value": "\t"}, {"from": "gpt", "value": "?"}],
            }
        ],
    )
    summary, rows, rejects = _ingest_into(tmp_path, openai, sharegpt)
    assert (summary.stored, summary.rejected) == (1, 3)
    assert [r["prompt"] for r in rows] == ["q"]
    reason = "no user message (missing prompt): every user message is empty"
    assert [
        (r["file"], r["line"], r["field"], r["reason"])
        for r in map(json.loads, rejects.read_text(encoding="utf-8").splitlines())
    ] == [
        (str(openai), 2, "messages", reason),
        (str(openai), 3, "messages", reason),
        (str(sharegpt), 1, "conversations", reason),
    ]
    assert summary.empty_prompts == 0  # rejected whole: nothing of them was left out


def test_a_thumbs_value_on_another_scale_is_a_reject_not_a_thumbs_up(tmp_path: Path) -> None:
    """`"thumbs": 0.5` (or 3) was read by its sign and stored as a thumbs up: a score on some
    other scale became the strongest "good" a log gives. It is a reject naming the field and
    pointing at `rating`; +1, -1, 1.0, true and 0 (none given) still read as before."""

    def answer(thumbs: Any) -> dict[str, Any]:
        return {"role": "assistant", "content": "a", "thumbs": thumbs}

    lines = [
        {"messages": [{"role": "user", "content": f"q{i}"}, answer(value)]}
        for i, value in enumerate([1, -1, 1.0, True, 0, 0.5, 3])
    ]
    parsed = list(read_file(write_jsonl(tmp_path / "chat.jsonl", lines)))
    conversations, rejects = of(Conversation, parsed), of(Reject, parsed)
    assert [c.messages[1].thumbs for c in conversations] == [1, -1, 1, 1, None]
    assert [(r.line, r.field) for r in rejects] == [
        (6, "messages[1].thumbs"),
        (7, "messages[1].thumbs"),
    ]
    assert "rating" in rejects[0].reason and "0.5" in rejects[0].reason
    csv_log = tmp_path / "rated.csv"
    write_csv_rows(csv_log, [["prompt", "response", "thumbs"], ["q", "a", "2"], ["p", "b", "-1"]])
    parsed = list(read_file(csv_log))
    assert [c.messages[1].thumbs for c in of(Conversation, parsed)] == [-1]
    assert [(r.line, r.field) for r in of(Reject, parsed)] == [(2, "thumbs")]
