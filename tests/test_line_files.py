"""The line reader behind `reward --file` and `route --file`: bad lines cost only themselves."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from app.line_files import NotLineDelimited, read_line_file


@pytest.mark.parametrize(
    ("line", "field", "reason"),
    [
        (b"{nope", None, "not JSON"),
        (b"[1, 2]", None, "expected a JSON object with prompt, response"),
        (b'{"prompt": "p"}', "response", "missing"),
        (b'{"prompt": "p", "response": null}', "response", "must be a string, not NoneType"),
        (b'{"prompt": ["p"], "response": "r"}', "prompt", "must be a string, not list"),
        (b'{"prompt": "\xff", "response": "r"}', None, "not valid UTF-8"),
    ],
)
def test_a_bad_line_is_named_and_its_neighbours_kept(
    tmp_path: Path, line: bytes, field: str | None, reason: str
) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(
        b'{"prompt": "a", "response": "b"}\n' + line + b'\n\n{"prompt": "c", "response": "d"}\n'
    )
    records, rejects = read_line_file(path, ("prompt", "response"))
    assert [(r.line, r.fields) for r in records] == [
        (1, {"prompt": "a", "response": "b"}),
        (4, {"prompt": "c", "response": "d"}),
    ]
    assert len(rejects) == 1
    reject = rejects[0]
    assert (reject.file, reject.line, reject.field) == (str(path), 2, field)
    assert reject.reason.startswith(reason)
    assert str(reject).startswith(f"{path}:2: ")


def test_a_gzipped_file_is_read_as_ingest_reads_it_and_a_cut_one_keeps_its_lines(
    tmp_path: Path,
) -> None:
    """`reward --file battles.jsonl.gz` rejected every line as "not valid UTF-8", where
    `ingest` reads the same file: gzip is read transparently, and a stream cut short keeps
    the lines before the cut, with a reject where it ends."""
    lines = b"".join(
        json.dumps({"prompt": f"p{i}", "response": "r" * 500 + str(i)}).encode() + b"\n"
        for i in range(200)
    )
    whole = tmp_path / "pairs.jsonl.gz"
    whole.write_bytes(gzip.compress(lines))
    records, rejects = read_line_file(whole, ("prompt", "response"))
    assert (len(records), rejects) == (200, [])
    assert records[199].fields["prompt"] == "p199"

    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    records, rejects = read_line_file(cut, ("prompt", "response"))
    assert 0 < len(records) < 200 and [r.line for r in records] == list(range(1, len(records) + 1))
    assert [(r.line, r.field) for r in rejects] == [(len(records) + 1, None)]
    assert rejects[0].reason.startswith("the file could not be read past here (EOFError")


def test_plain_lines_are_the_plain_field(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text('  How do I sort a list?  \n{"prompt": "Plan a trip"}\n{"text": "x"}\n')
    records, rejects = read_line_file(path, ("prompt",), plain_field="prompt")
    assert [(r.line, r.fields["prompt"]) for r in records] == [
        (1, "How do I sort a list?"),
        (2, "Plan a trip"),
    ]
    assert [(r.line, r.field, r.reason) for r in rejects] == [(3, "prompt", "missing")]


def test_a_utf8_bom_is_no_part_of_the_first_line(tmp_path: Path) -> None:
    """A file saved with a BOM (Windows editors, Excel) lost its first line to `reward
    --file` as "not JSON", and `route --file` routed that line's JSON text as the prompt."""
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "Plan a trip", "response": "Go"}\n')
    records, rejects = read_line_file(path, ("prompt", "response"))
    assert [r.fields for r in records] == [{"prompt": "Plan a trip", "response": "Go"}]
    assert rejects == []
    records, rejects = read_line_file(path, ("prompt",), plain_field="prompt")
    assert [r.fields for r in records] == [{"prompt": "Plan a trip"}] and rejects == []
    path.write_bytes(b"\xef\xbb\xbfHow do I sort a list?\n")
    records, _ = read_line_file(path, ("prompt",), plain_field="prompt")
    assert [r.fields for r in records] == [{"prompt": "How do I sort a list?"}]


def test_a_line_with_the_alternative_fields_must_have_all_of_them(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        '{"prompt": "p", "response": "r", "winner": "model_a"}\n'
        '{"prompt": "p", "response_a": "x", "response_b": "y", "winner": "model_b"}\n'
        '{"prompt": "p", "response_a": "x", "winner": null}\n'
        '{"prompt": "p", "response_a": "x", "response_b": "y", "winner": null}\n'
        '{"prompt": "p", "response": "r", "response_a": "x", "response_b": "y"}\n'
    )
    records, rejects = read_line_file(
        path,
        ("prompt", "response"),
        alternative=("prompt", "response_a", "response_b"),
        optional=("winner",),
    )
    assert [(r.line, r.fields) for r in records] == [
        (1, {"prompt": "p", "response": "r", "winner": "model_a"}),
        (2, {"prompt": "p", "response_a": "x", "response_b": "y", "winner": "model_b"}),
        (4, {"prompt": "p", "response_a": "x", "response_b": "y"}),
    ]
    # A pair's answer beside a battle's was read as the battle, the pair's answer dropped.
    both = "given with response_a, response_b: a line holds prompt, response or prompt, "
    assert [(r.line, r.field, r.reason) for r in rejects] == [
        (3, "response_b", "missing"),
        (5, "response", both + "response_a, response_b, not both"),
    ]


def test_an_optional_field_that_is_no_string_is_a_bad_line(tmp_path: Path) -> None:
    """`"winner": 1` was dropped as if no judge had decided: the battle left the agreement
    with the judge without a word; `"model_a": 5` lost the expert's name the same way."""
    path = tmp_path / "battles.jsonl"
    path.write_text(
        '{"prompt": "p", "response_a": "x", "response_b": "y", "winner": 1}\n'
        '{"prompt": "p", "response_a": "x", "response_b": "y", "model_a": 5}\n'
        '{"prompt": "p", "response_a": "x", "response_b": "y", "winner": null}\n'
    )
    records, rejects = read_line_file(
        path,
        ("prompt", "response"),
        alternative=("prompt", "response_a", "response_b"),
        optional=("winner", "model_a"),
    )
    assert [r.line for r in records] == [3]
    assert [(r.line, r.field, r.reason) for r in rejects] == [
        (1, "winner", "must be a string or null, not int"),
        (2, "model_a", "must be a string or null, not int"),
    ]


@pytest.mark.parametrize("opening", ["[", "{"])
def test_a_json_document_over_many_lines_is_no_file_of_lines(tmp_path: Path, opening: str) -> None:
    """Its lines are no records: as plain text, `"prompt": "a",` and `}` were prompts."""
    path = tmp_path / "prompts.json"
    records = [{"prompt": "Plan a trip"}, {"prompt": "Sort a list"}]
    path.write_text(json.dumps(records if opening == "[" else records[0], indent=2) + "\n")
    with pytest.raises(NotLineDelimited, match=rf"^{path}:1: the file is one JSON document"):
        read_line_file(path, ("prompt",), plain_field="prompt")
    path.write_text('\n{"prompt": "Plan a trip"}\n{\n')  # a stray `{` later is a bad line
    records_read, rejects = read_line_file(path, ("prompt",), plain_field="prompt")
    assert [r.line for r in records_read] == [2] and [r.line for r in rejects] == [3]
